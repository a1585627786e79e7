"""diffusers' DiT, PixArt-alpha/sigma and SD3/SD3.5 on onestep's fused ops:
`DiTTransformer2DModel` (BasicTransformerBlock, norm_type "ada_norm_zero"),
`PixArtTransformer2DModel` (norm_type "ada_norm_single": a per-block scale-shift table on the
timestep embedding, and cross-attention to the text between the self-attention and the MLP),
`SD3Transformer2DModel` (JointTransformerBlock: image and text streams, each an adaLN-Zero
half-block around one joint attention), `FluxTransformer2DModel` (its double-stream blocks
like SD3's; its single-stream blocks: one modulated LayerNorm feeding the attention and the MLP
in parallel), and any model whose `transformer_blocks` (and `single_transformer_blocks`) are
such blocks.

    from onestep_kernels.integrations.diffusers import fuse, unfuse
    fuse(pipe.transformer)                  # in place; same outputs within float tolerance
    unfuse(pipe.transformer)                # the blocks' own forwards again

A drop-in by construction: the fused forward calls each block's own modules for every matrix
product and attention (attn1, the feed-forward's Linears, the norm's embedder and Linear), so
hooks, peft's LoRA layers, diffusers' layerwise casting and accelerate's offload on them apply,
and fuses what lies between them. Whenever something is attached to a module that the fused
path would skip (a hook on norm1, norm3, ff or its GELU; a forward replaced on one of them;
feed-forward chunking; a global module hook), that block runs diffusers' own forward for the
call. A fused model pickles (`torch.save(model)`, `copy.deepcopy`) and stays fused;
`save_pretrained` writes the weights only, so a model loaded with `from_pretrained` is unfused:
call `fuse` on it again.

diffusers is not imported: `fuse` reads the model's modules. (Its weights in onestep's own DiT
are onestep_models.diffusers_dit's business: `DiT.from_diffusers`.)
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers import dit_block_forward, dit_block_tail, linear_then_gelu
from ..ops.layernorm_modulate import layernorm_modulate
from ..torch_compat import observed


def _linear_like(module: nn.Module | None) -> bool:
    """An nn.Linear (or a subclass: quantized linears), or an adapter around one (peft's LoRA
    layers keep the Linear as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None),
                                                       nn.Linear)


def _feed_forward_problems(block: nn.Module, name: str = "ff") -> list[str]:
    net = getattr(getattr(block, name, None), "net", [])
    gelu = net[0] if len(net) else None
    what = "its feed-forward" if name == "ff" else f"its {name}"
    if not (len(net) == 3 and getattr(gelu, "approximate", None) == "tanh"
            and _linear_like(getattr(gelu, "proj", None)) and _linear_like(net[2])):
        return [f"{what} is not Linear -> GELU(tanh) -> Dropout -> Linear"]
    if getattr(net[1], "p", 0.0) != 0.0:
        return [f"{what} has dropout"]
    return []


def _plain_layer_norm_exactly(module: nn.Module | None) -> bool:
    """nn.LayerNorm itself (not FP32LayerNorm or another subclass) without affine parameters."""
    return type(module) is nn.LayerNorm and not module.elementwise_affine


def _adaln_problems(norm: nn.Module | None, name: str, chunks: int, dim: int) -> list[str]:
    """An adaLN norm that projects the conditioning (SiLU, then a Linear to chunks x dim) and
    modulates a LayerNorm without affine parameters: AdaLayerNormZero (6 chunks),
    SD35AdaLayerNormZeroX (9), AdaLayerNormContinuous (2)."""
    linear = getattr(norm, "linear", None)
    if not (isinstance(getattr(norm, "silu", None), nn.SiLU) and _linear_like(linear)
            and getattr(linear, "out_features", None) == chunks * dim
            and _plain_layer_norm_exactly(getattr(norm, "norm", None))
            and getattr(norm, "emb", None) is None):
        return [(f"its {name} is not SiLU -> Linear(dim, {chunks} dim) modulating a "
                 "LayerNorm without affine parameters")]
    return []


def _plain_layer_norm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.LayerNorm) and not module.elementwise_affine


# The block patterns fuse runs: BasicTransformerBlock's norm_type, or the block class, -> the
# model family it comes from.
PATTERNS = {"ada_norm_zero": "DiT", "ada_norm_single": "PixArt", "joint": "SD3",
            "flux_double": "Flux", "flux_single": "Flux"}


def check_block(block: nn.Module, name: str) -> str:
    """The pattern of `block` (a key of PATTERNS), or ValueError naming every part of the
    pattern it lacks: DiT's ada_norm_zero self-attention block, PixArt's ada_norm_single
    block (self-attention, optional cross-attention, a per-block scale-shift table), or SD3's
    JointTransformerBlock (two token streams, joint attention)."""
    kind = type(block).__name__
    if kind in ("JointTransformerBlock", "FluxTransformerBlock"):
        return _check_joint_block(block, name)
    if kind == "FluxSingleTransformerBlock":
        return _check_flux_single_block(block, name)
    problems = []
    norm_type = getattr(block, "norm_type", None)
    if norm_type not in ("ada_norm_zero", "ada_norm_single"):
        problems.append(f"norm_type {norm_type!r} (need one of 'ada_norm_zero', "
                        "'ada_norm_single')")
    elif norm_type == "ada_norm_zero":
        if getattr(getattr(block, "norm1", None), "emb", None) is None:
            problems.append("its AdaLayerNormZero has no timestep/label embedder")
        if getattr(block, "attn2", None) is not None:
            problems.append("it has cross-attention (fused for ada_norm_single blocks only)")
        if not _plain_layer_norm(getattr(block, "norm3", None)):
            problems.append("its MLP norm (norm3) is missing or affine")
    else:  # ada_norm_single
        table = getattr(block, "scale_shift_table", None)
        if table is None or tuple(table.shape) != (6, getattr(block, "dim", -1)):
            problems.append("it has no (6, dim) scale_shift_table")
        if not (_plain_layer_norm(getattr(block, "norm1", None))
                and _plain_layer_norm(getattr(block, "norm2", None))):
            problems.append("its norms (norm1, norm2) are not LayerNorms without affine "
                            "parameters")
    if getattr(block, "only_cross_attention", False):
        problems.append("its first attention is cross-attention")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("it has a per-block positional embedding")
    problems += _feed_forward_problems(block)
    if problems:
        raise ArgumentError(f"model: block {name} cannot be fused: " + "; ".join(problems))
    return norm_type


def _check_flux_single_block(block: nn.Module, name: str) -> str:
    """Flux's single-stream block: one modulated LayerNorm feeding the attention and a
    GELU(tanh) MLP in parallel, their outputs concatenated into one gated projection."""
    dim = getattr(getattr(block, "proj_out", None), "out_features", -1)
    problems = _adaln_problems(getattr(block, "norm", None), "norm", 3, dim)
    act = getattr(block, "act_mlp", None)
    if not (_linear_like(getattr(block, "proj_mlp", None)) and isinstance(act, nn.GELU)
            and act.approximate == "tanh" and _linear_like(getattr(block, "proj_out", None))):
        problems.append("its MLP is not proj_mlp (Linear) -> GELU(tanh), into a Linear proj_out")
    if problems:
        raise ArgumentError(f"model: block {name} cannot be fused: " + "; ".join(problems))
    return "flux_single"


def _check_joint_block(block: nn.Module, name: str) -> str:
    """SD3's (and SD3.5's) JointTransformerBlock and Flux's double-stream block: each stream an
    adaLN-Zero half-block around one joint attention; SD3's last block's context stream
    (context_pre_only) only feeds it."""
    dim = getattr(getattr(block, "norm2", None), "normalized_shape", (-1,))[0]
    dual = getattr(block, "use_dual_attention", False)  # (Flux's blocks have neither)
    problems = _adaln_problems(getattr(block, "norm1", None), "norm1", 9 if dual else 6, dim)
    pre_only = getattr(block, "context_pre_only", False)
    problems += _adaln_problems(getattr(block, "norm1_context", None), "norm1_context",
                                2 if pre_only else 6, dim)
    norms = ("norm2",) if pre_only else ("norm2", "norm2_context")
    if not all(_plain_layer_norm_exactly(getattr(block, n, None)) for n in norms):
        problems.append(f"its {' and '.join(norms)} are not LayerNorms without affine "
                        "parameters")
    problems += _feed_forward_problems(block, "ff")
    if not pre_only:
        problems += _feed_forward_problems(block, "ff_context")
    if problems:
        raise ArgumentError(f"model: block {name} cannot be fused: " + "; ".join(problems))
    return "flux_double" if type(block).__name__ == "FluxTransformerBlock" else "joint"


def _skipped_modules(block: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a block that the fused path does not call (it fuses what they compute)."""
    kind = type(block).__name__
    if kind == "FluxSingleTransformerBlock":
        return (block.norm, block.norm.norm, block.act_mlp)
    if kind in ("JointTransformerBlock", "FluxTransformerBlock"):
        skipped = [block.norm1, block.norm1.norm, block.norm1_context,
                   block.norm1_context.norm, block.norm2, block.ff, *block.ff.net[:2]]
        if not getattr(block, "context_pre_only", False):
            skipped += [block.norm2_context, block.ff_context, *block.ff_context.net[:2]]
        return tuple(skipped)
    net = block.ff.net
    if block.norm_type == "ada_norm_single":
        return (block.norm1, block.norm2, block.ff, net[0], net[1])
    return (block.norm1, block.norm1.norm, block.norm3, block.ff, net[0], net[1])


def module_path_reason(block: nn.Module, cross_attention_kwargs: dict | None = None
                       ) -> str | None:
    """Why this call of a fused block must run diffusers' own forward, or None: something is
    attached to a module the fused path skips, feed-forward chunking is on, or the call
    brings GLIGEN inputs."""
    if getattr(block, "_chunk_size", None) is not None:
        return "feed-forward chunking"
    if cross_attention_kwargs and cross_attention_kwargs.get("gligen") is not None:
        return "GLIGEN inputs"
    for module in _skipped_modules(block):
        if observed(module):
            return f"{type(module).__name__} is hooked or wrapped"
    return None


class FusedForward:
    """A block's fused forward, set as the block's `forward` (an instance attribute, which
    nn.Module's __call__ reads): a plain object, so that a fused model pickles and deep-copies
    and stays fused; `unfuse` removes it."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 encoder_hidden_states: Tensor | None = None,
                 encoder_attention_mask: Tensor | None = None, timestep: Tensor | None = None,
                 cross_attention_kwargs: dict | None = None,
                 class_labels: Tensor | None = None, added_cond_kwargs: dict | None = None):
        block = self.block
        if module_path_reason(block, cross_attention_kwargs) is not None:
            return type(block).forward(
                block, hidden_states, attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs)
        kwargs = dict(cross_attention_kwargs or {})
        kwargs.pop("scale", None)
        kwargs.pop("gligen", None)

        def attention(h: Tensor) -> Tensor:
            return block.attn1(h, attention_mask=attention_mask, **kwargs)

        net = block.ff.net
        if block.norm_type == "ada_norm_single":  # PixArt
            B, D = hidden_states.shape[0], hidden_states.shape[-1]
            modulation = (block.scale_shift_table[None]
                          + timestep.reshape(B, 6, -1)).reshape(B, 6 * D)
            cross = None
            if block.attn2 is not None:
                def cross(h: Tensor) -> Tensor:
                    return block.attn2(h, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=encoder_attention_mask, **kwargs)
            return dit_block_forward(hidden_states, modulation, attention, net[0].proj, net[2],
                                     eps=block.norm1.eps, mlp_norm_eps=block.norm2.eps,
                                     cross_attention=cross)
        norm1 = block.norm1
        emb = norm1.linear(norm1.silu(norm1.emb(timestep, class_labels,
                                                hidden_dtype=hidden_states.dtype)))
        return dit_block_forward(hidden_states, emb, attention, net[0].proj, net[2],
                                 eps=norm1.norm.eps, mlp_norm_eps=block.norm3.eps)


class FusedJointForward(FusedForward):
    """SD3's JointTransformerBlock.forward on onestep's fused ops: each stream's modulated
    LayerNorm one op, the block's own joint attention (and SD3.5's second attention) called as
    modules, then each stream's gated residual + modulated LayerNorm one op, fc1's bias and
    GELU one op (layers.dit_block_tail)."""

    def __call__(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                 joint_attention_kwargs: dict | None = None):
        block = self.block
        if module_path_reason(block) is not None:
            return type(block).forward(block, hidden_states, encoder_hidden_states, temb,
                                       joint_attention_kwargs)
        kwargs = joint_attention_kwargs or {}
        norm1, norm_c = block.norm1, block.norm1_context
        mod = norm1.linear(norm1.silu(temb)).chunk(9 if block.use_dual_attention else 6, dim=1)
        h = layernorm_modulate(hidden_states, mod[0], mod[1], norm1.norm.eps)
        if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            scale_c, shift_c = norm_c.linear(
                norm_c.silu(temb).to(encoder_hidden_states.dtype)).chunk(2, dim=1)
            h_c = layernorm_modulate(encoder_hidden_states, shift_c, scale_c, norm_c.norm.eps)
        else:
            mod_c = norm_c.linear(norm_c.silu(temb)).chunk(6, dim=1)
            h_c = layernorm_modulate(encoder_hidden_states, mod_c[0], mod_c[1], norm_c.norm.eps)
        attn_output, context_attn_output = block.attn(hidden_states=h,
                                                      encoder_hidden_states=h_c, **kwargs)
        x, branch, gate = hidden_states, attn_output, mod[2]
        if block.use_dual_attention:  # SD3.5: a second self-attention, its own modulation
            h2 = layernorm_modulate(hidden_states, mod[6], mod[7], norm1.norm.eps)
            x = x + mod[2].unsqueeze(1) * attn_output
            branch, gate = block.attn2(hidden_states=h2, **kwargs), mod[8]
        net = block.ff.net
        x = dit_block_tail(x, branch, gate, mod[3], mod[4], mod[5], net[0].proj, net[2],
                           mlp_norm_eps=block.norm2.eps)
        if block.context_pre_only:
            return None, x
        net = block.ff_context.net
        x_c = dit_block_tail(encoder_hidden_states, context_attn_output, mod_c[2], mod_c[3],
                             mod_c[4], mod_c[5], net[0].proj, net[2],
                             mlp_norm_eps=block.norm2_context.eps)
        return x_c, x


class _FluxForward(FusedForward):
    """The call of both Flux blocks (the same arguments): diffusers' own forward where
    module_path_reason says so, the fused one (`fused`) otherwise."""

    def __call__(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None,
                 joint_attention_kwargs: dict | None = None):
        block = self.block
        if module_path_reason(block) is not None:
            return type(block).forward(block, hidden_states, encoder_hidden_states, temb,
                                       image_rotary_emb, joint_attention_kwargs)
        return self.fused(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                          joint_attention_kwargs or {})


class FusedFluxDoubleForward(_FluxForward):
    """Flux's double-stream block on onestep's fused ops: as SD3's joint block (the rotary
    embedding passed to the block's own attention, an IP-adapter's third output added to the
    image stream), each stream's end one dit_block_tail."""

    def fused(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
              image_rotary_emb: tuple[Tensor, Tensor] | None, kwargs: dict):
        block = self.block
        norm1, norm_c = block.norm1, block.norm1_context
        mod = norm1.linear(norm1.silu(temb)).chunk(6, dim=1)
        mod_c = norm_c.linear(norm_c.silu(temb)).chunk(6, dim=1)
        h = layernorm_modulate(hidden_states, mod[0], mod[1], norm1.norm.eps)
        h_c = layernorm_modulate(encoder_hidden_states, mod_c[0], mod_c[1], norm_c.norm.eps)
        outputs = block.attn(hidden_states=h, encoder_hidden_states=h_c,
                             image_rotary_emb=image_rotary_emb, **kwargs)
        net = block.ff.net
        x = dit_block_tail(hidden_states, outputs[0], mod[2], mod[3], mod[4], mod[5],
                           net[0].proj, net[2], mlp_norm_eps=block.norm2.eps)
        if len(outputs) == 3:  # an IP-adapter's image attention
            x = x + outputs[2]
        net = block.ff_context.net
        x_c = dit_block_tail(encoder_hidden_states, outputs[1], mod_c[2], mod_c[3], mod_c[4],
                             mod_c[5], net[0].proj, net[2], mlp_norm_eps=block.norm2_context.eps)
        if x_c.dtype == torch.float16:
            x_c = x_c.clip(-65504, 65504)
        return x_c, x


class FusedFluxSingleForward(_FluxForward):
    """Flux's single-stream block on onestep's fused ops: the modulated LayerNorm one op,
    proj_mlp's bias and GELU one op, the gated residual of proj_out one op; the attention and
    the three Linears called as modules."""

    def fused(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
              image_rotary_emb: tuple[Tensor, Tensor] | None, kwargs: dict):
        block = self.block
        text_tokens = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm = block.norm
        shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
        h = layernorm_modulate(x, shift, scale, norm.norm.eps)
        mlp = linear_then_gelu(h, block.proj_mlp)
        attn = block.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **kwargs)
        out = block.proj_out(torch.cat([attn, mlp], dim=2))
        if x.dtype == out.dtype == gate.dtype:
            x = torch.addcmul(x, gate.unsqueeze(1), out)
        else:  # (autocast: diffusers' own expression, its dtypes)
            x = x + gate.unsqueeze(1) * out
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x[:, :text_tokens], x[:, text_tokens:]


FUSED_FORWARDS = {"ada_norm_zero": FusedForward, "ada_norm_single": FusedForward,
                  "joint": FusedJointForward, "flux_double": FusedFluxDoubleForward,
                  "flux_single": FusedFluxSingleForward}


def _named_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's blocks by the names errors give them: transformer_blocks by index, then
    Flux's single_transformer_blocks by path."""
    _blocks(model)  # (refuses a model without them)
    named = {str(i): block for i, block in enumerate(model.transformer_blocks)}
    single = getattr(model, "single_transformer_blocks", None)
    if isinstance(single, nn.ModuleList):
        named.update({f"single_transformer_blocks.{i}": b for i, b in enumerate(single)})
    return named


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks: transformer_blocks, then Flux's single_transformer_blocks."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArgumentError("model: expected a diffusers DiT, PixArt, SD3 or Flux transformer "
                            "(DiTTransformer2DModel, PixArtTransformer2DModel, "
                            "SD3Transformer2DModel, FluxTransformer2DModel: a module with "
                            "transformer_blocks)")
    single = getattr(model, "single_transformer_blocks", None)
    return list(blocks) + (list(single) if isinstance(single, nn.ModuleList) else [])


def fuse(model: nn.Module, strict: bool = True) -> nn.Module:
    """Make the blocks of a diffusers DiT, PixArt-alpha/sigma, SD3/SD3.5 or Flux transformer
    run on onestep's fused ops, in place; returns model.

    strict: check every block first and change nothing if one cannot be fused (ValueError
    naming it and what it lacks); strict=False fuses the blocks that can be and warns once
    naming the others and why. Parameters, state_dict and the model's own forward are
    untouched; fusing a fused model again changes nothing."""
    blocks = _named_blocks(model)
    refused, patterns = {}, {}
    for name, block in blocks.items():
        try:
            patterns[name] = check_block(block, name)
        except ArgumentError as err:
            if strict:
                raise
            refused[name] = str(err).split("cannot be fused: ", 1)[1]
    for name, pattern in patterns.items():
        blocks[name].forward = FUSED_FORWARDS[pattern](blocks[name])
    if refused:
        warnings.warn(f"fuse: {len(refused)} of {len(blocks)} blocks left unfused: "
                      + "; ".join(f"block {name}: {why}" for name, why in refused.items()),
                      stacklevel=2)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse`: every block runs diffusers' own forward again; returns model."""
    for block in _blocks(model):
        if isinstance(block.__dict__.get("forward"), FusedForward):
            del block.__dict__["forward"]
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether `fuse` has made the model's blocks run on onestep's ops."""
    try:
        blocks = _blocks(model)
    except ArgumentError:
        return False
    return any(isinstance(block.__dict__.get("forward"), FusedForward) for block in blocks)
