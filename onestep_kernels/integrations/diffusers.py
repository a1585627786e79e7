"""diffusers' DiT (`DiTTransformer2DModel`, BasicTransformerBlock with norm_type
"ada_norm_zero") on onestep's fused ops, and its weights in onestep's DiT.

    from onestep_kernels.integrations.diffusers import fuse
    fuse(pipe.transformer)                  # in place; same outputs within float tolerance

    from onestep_models.dit import DiT
    dit = DiT.from_diffusers(pipe.transformer)   # uses dit_config / dit_state_dict below

diffusers is imported by neither function: they read the model's modules and config.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers import dit_block_forward


def _check_block(block: nn.Module, name: str) -> None:
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
        _check_block(block, str(i))
    for block in blocks:
        block.forward = types.MethodType(_fused_forward, block)
    return model


def dit_config(model: nn.Module) -> dict:
    """onestep DiT constructor arguments equivalent to a diffusers DiTTransformer2DModel."""
    cfg = model.config
    blocks = model.transformer_blocks
    _check_block(blocks[0], "0")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ArgumentError(f"model: out_channels {out_channels} is neither in_channels nor "
                            "twice it")
    emb = blocks[0].norm1.emb
    return dict(
        input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        hidden_size=hidden, depth=cfg.num_layers, num_heads=cfg.num_attention_heads,
        mlp_ratio=blocks[0].ff.net[0].proj.out_features / hidden,
        class_dropout_prob=emb.class_embedder.dropout_prob, num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * cfg.in_channels,
        timestep_freq_shift=int(emb.time_proj.downscale_freq_shift),
        mlp_norm_eps=blocks[0].norm3.eps,
    )


def dit_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of a diffusers DiT under onestep DiT's (= the official DiT's) names.

    diffusers keeps a timestep/label embedder in every block where DiT has one: they must all be
    equal (as in models converted from official checkpoints), or this raises ValueError."""
    blocks = model.transformer_blocks
    emb0 = blocks[0].norm1.emb
    reference = emb0.state_dict()
    for i, block in enumerate(blocks):
        _check_block(block, str(i))
        for key, value in block.norm1.emb.state_dict().items():
            if not torch.equal(value, reference[key]):
                raise ArgumentError(f"model: block {i}'s timestep/label embedder differs from "
                                    f"block 0's ({key}); onestep's DiT has one shared embedder")
    sd = {
        "pos_embed": model.pos_embed.pos_embed.detach().clone(),
        "x_embedder.proj.weight": model.pos_embed.proj.weight,
        "x_embedder.proj.bias": model.pos_embed.proj.bias,
        "t_embedder.mlp.0.weight": emb0.timestep_embedder.linear_1.weight,
        "t_embedder.mlp.0.bias": emb0.timestep_embedder.linear_1.bias,
        "t_embedder.mlp.2.weight": emb0.timestep_embedder.linear_2.weight,
        "t_embedder.mlp.2.bias": emb0.timestep_embedder.linear_2.bias,
        "y_embedder.embedding_table.weight": emb0.class_embedder.embedding_table.weight,
        "final_layer.adaLN_modulation.1.weight": model.proj_out_1.weight,
        "final_layer.adaLN_modulation.1.bias": model.proj_out_1.bias,
        "final_layer.linear.weight": model.proj_out_2.weight,
        "final_layer.linear.bias": model.proj_out_2.bias,
    }
    for i, block in enumerate(blocks):
        attn, ff = block.attn1, block.ff.net
        prefix = f"blocks.{i}."
        sd[prefix + "attn.qkv.weight"] = torch.cat([attn.to_q.weight, attn.to_k.weight,
                                                    attn.to_v.weight])
        sd[prefix + "attn.qkv.bias"] = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
        sd[prefix + "attn.proj.weight"] = attn.to_out[0].weight
        sd[prefix + "attn.proj.bias"] = attn.to_out[0].bias
        sd[prefix + "mlp.fc1.weight"] = ff[0].proj.weight
        sd[prefix + "mlp.fc1.bias"] = ff[0].proj.bias
        sd[prefix + "mlp.fc2.weight"] = ff[2].weight
        sd[prefix + "mlp.fc2.bias"] = ff[2].bias
        sd[prefix + "adaLN_modulation.1.weight"] = block.norm1.linear.weight
        sd[prefix + "adaLN_modulation.1.bias"] = block.norm1.linear.bias
    return {k: v.detach().clone() for k, v in sd.items()}
