"""The weights and settings of a diffusers DiT (`DiTTransformer2DModel`) in onestep's `DiT`,
whose parameter names are the official DiT's: what `DiT.from_diffusers` reads.

diffusers is not imported: these read the model's modules and config. The blocks must be the
ada_norm_zero self-attention blocks that onestep_kernels.integrations.diffusers.fuse takes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onestep_kernels.errors import ArgumentError
from onestep_kernels.integrations.diffusers import check_block


def dit_config(model: nn.Module) -> dict:
    """onestep DiT constructor arguments equivalent to a diffusers DiTTransformer2DModel."""
    cfg = model.config
    blocks = model.transformer_blocks
    check_block(blocks[0], "0")
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
        check_block(block, str(i))
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
