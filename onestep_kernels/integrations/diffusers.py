"""diffusers' DiT and PixArt-alpha/sigma on onestep's fused ops: `DiTTransformer2DModel`
(BasicTransformerBlock, norm_type "ada_norm_zero") and `PixArtTransformer2DModel` (norm_type
"ada_norm_single": a per-block scale-shift table on the timestep embedding, and cross-attention
to the text between the self-attention and the MLP), and any model whose `transformer_blocks`
are such blocks.

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

from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers import dit_block_forward
from ..torch_compat import observed


def _linear_like(module: nn.Module | None) -> bool:
    """An nn.Linear (or a subclass: quantized linears), or an adapter around one (peft's LoRA
    layers keep the Linear as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None),
                                                       nn.Linear)


def _feed_forward_problems(block: nn.Module) -> list[str]:
    net = getattr(getattr(block, "ff", None), "net", [])
    gelu = net[0] if len(net) else None
    if not (len(net) == 3 and getattr(gelu, "approximate", None) == "tanh"
            and _linear_like(getattr(gelu, "proj", None)) and _linear_like(net[2])):
        return ["its feed-forward is not Linear -> GELU(tanh) -> Dropout -> Linear"]
    if getattr(net[1], "p", 0.0) != 0.0:
        return ["its feed-forward has dropout"]
    return []


def _plain_layer_norm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.LayerNorm) and not module.elementwise_affine


# The block patterns fuse runs: diffusers' norm_type -> the model family it comes from.
PATTERNS = {"ada_norm_zero": "DiT", "ada_norm_single": "PixArt"}


def check_block(block: nn.Module, name: str) -> str:
    """The pattern of `block` (a key of PATTERNS), or ValueError naming every part of the
    pattern it lacks: DiT's ada_norm_zero self-attention block, or PixArt's ada_norm_single
    block (self-attention, optional cross-attention, a per-block scale-shift table)."""
    problems = []
    norm_type = getattr(block, "norm_type", None)
    if norm_type not in PATTERNS:
        problems.append(f"norm_type {norm_type!r} (need one of "
                        f"{', '.join(repr(k) for k in PATTERNS)})")
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


def _skipped_modules(block: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a block that the fused path does not call (it fuses what they compute)."""
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


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArgumentError("model: expected a diffusers DiT or PixArt transformer "
                            "(DiTTransformer2DModel, PixArtTransformer2DModel: a module with "
                            "transformer_blocks)")
    return blocks


def fuse(model: nn.Module, strict: bool = True) -> nn.Module:
    """Make the blocks of a diffusers DiT or PixArt-alpha/sigma transformer run on onestep's
    fused ops, in place; returns model.

    strict: check every block first and change nothing if one cannot be fused (ValueError
    naming it and what it lacks); strict=False fuses the blocks that can be and warns once
    naming the others and why. Parameters, state_dict and the model's own forward are
    untouched; fusing a fused model again changes nothing."""
    blocks = _blocks(model)
    refused = {}
    for i, block in enumerate(blocks):
        try:
            check_block(block, str(i))
        except ArgumentError as err:
            if strict:
                raise
            refused[i] = str(err).split("cannot be fused: ", 1)[1]
    for i, block in enumerate(blocks):
        if i not in refused:
            block.forward = FusedForward(block)
    if refused:
        warnings.warn(f"fuse: {len(refused)} of {len(blocks)} blocks left unfused: "
                      + "; ".join(f"block {i}: {why}" for i, why in refused.items()),
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
    blocks = getattr(model, "transformer_blocks", None) or []
    return any(isinstance(block.__dict__.get("forward"), FusedForward) for block in blocks)
