"""diffusers' DiT (`DiTTransformer2DModel`, BasicTransformerBlock with norm_type
"ada_norm_zero") on onestep's fused ops.

    from onestep_kernels.integrations.diffusers import fuse
    fuse(pipe.transformer)                  # in place; same outputs within float tolerance

diffusers is not imported: `fuse` reads the model's modules. (Its weights in onestep's own DiT
are onestep_models.diffusers_dit's business: `DiT.from_diffusers`.)
"""

from __future__ import annotations

import types

from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers import dit_block_forward


def check_block(block: nn.Module, name: str) -> None:
    """Raise ValueError unless `block` is the ada_norm_zero self-attention block fuse handles."""
    problems = []
    if getattr(block, "norm_type", None) != "ada_norm_zero":
        problems.append(f"norm_type {getattr(block, 'norm_type', None)!r} (need 'ada_norm_zero')")
    if getattr(block, "attn2", None) is not None or getattr(block, "only_cross_attention", False):
        problems.append("it has cross-attention")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("it has a per-block positional embedding")
    if getattr(block.norm1, "emb", None) is None:
        problems.append("its AdaLayerNormZero has no timestep/label embedder")
    if getattr(block, "norm3", None) is None or block.norm3.elementwise_affine:
        problems.append("its MLP norm is missing or affine")
    net = getattr(getattr(block, "ff", None), "net", [])
    gelu = net[0] if len(net) else None
    if not (len(net) == 3 and getattr(gelu, "approximate", None) == "tanh"
            and isinstance(net[2], nn.Linear)):
        problems.append("its feed-forward is not Linear -> GELU(tanh) -> Dropout -> Linear")
    elif net[1].p != 0.0:
        problems.append("its feed-forward has dropout")
    if problems:
        raise ArgumentError(f"model: block {name} cannot be fused: " + "; ".join(problems))


def _fused_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                   encoder_hidden_states: Tensor | None = None,
                   encoder_attention_mask: Tensor | None = None, timestep: Tensor | None = None,
                   cross_attention_kwargs: dict | None = None,
                   class_labels: Tensor | None = None, added_cond_kwargs: dict | None = None):
    """BasicTransformerBlock.forward for ada_norm_zero on onestep's fused ops: the block's own
    modules (attn1, the feed-forward's Linears) are called as modules, so adapters on them
    (LoRA through peft, hooks) apply."""
    norm1 = self.norm1
    emb = norm1.linear(norm1.silu(norm1.emb(timestep, class_labels,
                                            hidden_dtype=hidden_states.dtype)))
    kwargs = dict(cross_attention_kwargs or {})
    kwargs.pop("scale", None)

    def attention(h: Tensor) -> Tensor:
        return self.attn1(h, attention_mask=attention_mask, **kwargs)

    return dit_block_forward(hidden_states, emb, attention, self.ff.net[0].proj, self.ff.net[2],
                             eps=norm1.norm.eps, mlp_norm_eps=self.norm3.eps)


def fuse(model: nn.Module) -> nn.Module:
    """Make every block of a diffusers DiT run on onestep's fused ops, in place; returns model.

    Checks every block first and changes nothing if one cannot be fused (ValueError naming it).
    Parameters, state_dict and the model's own forward are untouched."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ArgumentError("model: expected a diffusers DiTTransformer2DModel "
                            "(a module with transformer_blocks)")
    for i, block in enumerate(blocks):
        check_block(block, str(i))
    for block in blocks:
        block.forward = types.MethodType(_fused_forward, block)
    return model
