"""diffusers' DiT (`DiTTransformer2DModel`, BasicTransformerBlock with norm_type
"ada_norm_zero") on onestep's fused ops.

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

from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers import dit_block_forward
from ..torch_compat import observed


def _linear_like(module: nn.Module | None) -> bool:
    """An nn.Linear (or a subclass: quantized linears), or an adapter around one (peft's LoRA
    layers keep the Linear as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None),
                                                       nn.Linear)


def check_block(block: nn.Module, name: str) -> None:
    """Raise ValueError unless `block` is the ada_norm_zero self-attention block fuse handles,
    naming every pattern it lacks."""
    problems = []
    norm_type = getattr(block, "norm_type", None)
    if norm_type != "ada_norm_zero":
        problems.append(f"norm_type {norm_type!r} (need 'ada_norm_zero')")
    elif getattr(getattr(block, "norm1", None), "emb", None) is None:
        problems.append("its AdaLayerNormZero has no timestep/label embedder")
    if getattr(block, "attn2", None) is not None or getattr(block, "only_cross_attention", False):
        problems.append("it has cross-attention")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("it has a per-block positional embedding")
    if norm_type == "ada_norm_zero" and (getattr(block, "norm3", None) is None
                                         or block.norm3.elementwise_affine):
        problems.append("its MLP norm (norm3) is missing or affine")  # (other norm types
        # lay their norms out otherwise: the norm_type alone says what is missing there)
    net = getattr(getattr(block, "ff", None), "net", [])
    gelu = net[0] if len(net) else None
    if not (len(net) == 3 and getattr(gelu, "approximate", None) == "tanh"
            and _linear_like(getattr(gelu, "proj", None)) and _linear_like(net[2])):
        problems.append("its feed-forward is not Linear -> GELU(tanh) -> Dropout -> Linear")
    elif getattr(net[1], "p", 0.0) != 0.0:
        problems.append("its feed-forward has dropout")
    if problems:
        raise ArgumentError(f"model: block {name} cannot be fused: " + "; ".join(problems))


def _skipped_modules(block: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a block that the fused path does not call (it fuses what they compute)."""
    net = block.ff.net
    return (block.norm1, block.norm1.norm, block.norm3, block.ff, net[0], net[1])


def module_path_reason(block: nn.Module) -> str | None:
    """Why this call of a fused block must run diffusers' own forward, or None: something is
    attached to a module the fused path skips, or feed-forward chunking is on."""
    if getattr(block, "_chunk_size", None) is not None:
        return "feed-forward chunking"
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
        if module_path_reason(block) is not None:
            return type(block).forward(
                block, hidden_states, attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs)
        norm1 = block.norm1
        emb = norm1.linear(norm1.silu(norm1.emb(timestep, class_labels,
                                                hidden_dtype=hidden_states.dtype)))
        kwargs = dict(cross_attention_kwargs or {})
        kwargs.pop("scale", None)

        def attention(h: Tensor) -> Tensor:
            return block.attn1(h, attention_mask=attention_mask, **kwargs)

        return dit_block_forward(hidden_states, emb, attention, block.ff.net[0].proj,
                                 block.ff.net[2], eps=norm1.norm.eps,
                                 mlp_norm_eps=block.norm3.eps)


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArgumentError("model: expected a diffusers DiTTransformer2DModel "
                            "(a module with transformer_blocks)")
    return blocks


def fuse(model: nn.Module) -> nn.Module:
    """Make every block of a diffusers DiT run on onestep's fused ops, in place; returns model.

    Checks every block first and changes nothing if one cannot be fused (ValueError naming it
    and what it lacks). Parameters, state_dict and the model's own forward are untouched;
    fusing a fused model again changes nothing."""
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        check_block(block, str(i))
    for block in blocks:
        block.forward = FusedForward(block)
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
