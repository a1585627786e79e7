"""`fuse` as a drop-in for diffusers' DiT (issue 30): whatever diffusers, peft and accelerate
attach to a block's modules still applies, each case compared with the unfused model carrying
the same attachments. On the parent commit: layerwise casting raised a dtype error, pickling an
AttributeError, LoRA added before `fuse` was refused, hooks on norm1/norm3/ff/its GELU never
fired, feed-forward chunking was ignored, and accelerate's offload handed a kernel a meta
tensor."""

import copy
import io

import pytest
import torch
from conftest import assert_close_rel
from fused_vs_unfused import count_module_calls
from test_diffusers import inputs, make_model

from onestep_kernels.integrations import diffusers as integration
from onestep_kernels.integrations.diffusers import fuse


def run(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def pair(generator):
    """(unfused model, a fused copy, inputs)."""
    model = make_model(generator)
    return model, fuse(copy.deepcopy(model)), inputs(generator)


def on_the_fused_path(model) -> bool:
    return all(integration.module_path_reason(b) is None for b in model.transformer_blocks)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_fused_model_pickles_and_stays_fused_and_unfuse_restores_it(generator, how):
    model, fused, (x, t, y) = pair(generator)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
    else:
        again = copy.deepcopy(fused)
    assert integration.is_fused(again)
    for block in again.transformer_blocks:  # each block's forward is its own, not the original's
        assert block.forward.block is block
    ref = run(model, x, t, y)
    assert_close_rel(run(again, x, t, y), ref, torch.float32, "reloaded fused output")
    assert integration.unfuse(again) is again and not integration.is_fused(again)
    assert "forward" not in again.transformer_blocks[0].__dict__
    assert torch.equal(run(again, x, t, y), ref)  # diffusers' own forward: bit-identical


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16,
                                     torch.bfloat16])
def test_layerwise_casting_in_inference(generator, storage):
    """diffusers replaces each Linear's forward to upcast its stored weight: the fused path
    calls fc1 as a module then (no weight read around it) and stays fused."""
    model, fused, (x, t, y) = pair(generator)
    for m in (model, fused):
        m.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    assert on_the_fused_path(fused)
    assert_close_rel(run(fused, x, t, y), run(model, x, t, y), torch.float32,
                     f"fused output, {storage} storage")


def test_layerwise_casting_in_training(generator):
    """bf16 storage, fp32 compute, gradients into the bf16 parameters: the fused gradients
    within twice the unfused model's own error against float64 (the same stored weights)."""
    from conftest import rel_error

    model, fused, (x, t, y) = pair(generator)
    reference = copy.deepcopy(model).double()
    grads = []
    for m in (model, fused):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        m.train()
        torch.manual_seed(0)  # (training drops labels at random: the same ones in each run)
        m(x, timestep=t, class_labels=y).sample.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    with torch.no_grad():  # the float64 model on the weights as stored
        stored = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            p.copy_(stored[name].double())
    reference.train()
    torch.manual_seed(0)
    reference(x.double(), timestep=t.double(), class_labels=y).sample.square().sum().backward()
    exact = {n: p.grad for n, p in reference.named_parameters()}
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, ref in grads[0].items():
        if name.endswith("to_k.bias"):  # zero in theory: rounding noise on every side
            continue
        assert_close_rel(grads[1][name].double(), exact[name], ref.dtype, f"d{name}",
                         torch_error=rel_error(ref.double(), exact[name]))


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2"]


@pytest.mark.parametrize("when", ["before fuse", "after fuse"])
def test_peft_lora_before_or_after_fuse(generator, when):
    peft = pytest.importorskip("peft")
    model, _, (x, t, y) = pair(generator)
    config = peft.LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    adapted = peft.inject_adapter_in_model(config, model)  # LoRA weights random: it shows
    base = run(make_model(torch.Generator().manual_seed(0)), x, t, y)
    fused = copy.deepcopy(adapted)
    if when == "before fuse":
        fuse(fused)
    else:
        fuse(fused)
        unfused_again = integration.unfuse(copy.deepcopy(fused))
        assert not integration.is_fused(unfused_again)
    assert on_the_fused_path(fused)
    ref = run(adapted, x, t, y)
    assert (ref - base).abs().max() > 1e-3
    assert_close_rel(run(fused, x, t, y), ref, torch.float32, f"LoRA {when}")


def test_peft_lora_added_to_a_fused_model(generator):
    peft = pytest.importorskip("peft")
    model, fused, (x, t, y) = pair(generator)
    config = peft.LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    adapted = peft.inject_adapter_in_model(config, model)
    torch.manual_seed(0)
    fused_adapted = peft.inject_adapter_in_model(config, fused)
    assert integration.is_fused(fused_adapted)
    assert_close_rel(run(fused_adapted, x, t, y), run(adapted, x, t, y), torch.float32,
                     "LoRA after fuse")


def test_hooks_on_every_submodule_fire_as_often_as_unfused(generator):
    model, fused, (x, t, y) = pair(generator)
    counts = []
    for m in (model, fused):
        counts.append(count_module_calls(m))
        run(m, x, t, y)
    assert counts[1] == counts[0]
    assert counts[0]["transformer_blocks.0.ff"] == 1 and counts[0]["transformer_blocks.1.norm3"] == 1


@pytest.mark.parametrize("where", ["ff", "ff.net.0", "norm1", "norm3"])
def test_a_hook_that_rewrites_a_skipped_modules_output_applies(generator, where):
    """A hook on a module the fused path would skip takes that block onto diffusers' path."""
    model, fused, (x, t, y) = pair(generator)
    outputs = []
    for m in (model, fused):
        for block in m.transformer_blocks:
            block.get_submodule(where).register_forward_hook(
                lambda mod, args, out: (out[0] * 0.5,) + tuple(out[1:])
                if isinstance(out, tuple) else out * 0.5)
        outputs.append(run(m, x, t, y))
    assert not on_the_fused_path(fused)
    assert torch.equal(outputs[1], outputs[0])  # the same forward, the same operations


def test_feed_forward_chunking(generator):
    model, fused, (x, t, y) = pair(generator)
    calls = []
    for m in (model, fused):
        for block in m.transformer_blocks:
            block.set_chunk_feed_forward(2, dim=1)
        count = [0]
        for block in m.transformer_blocks:
            block.ff.register_forward_hook(lambda *a, count=count: count.__setitem__(0, count[0] + 1))
        calls.append((count, run(m, x, t, y)))
    assert calls[1][0][0] == calls[0][0][0] == 16  # 8 chunks of 2 tokens, in each of 2 blocks
    assert torch.equal(calls[1][1], calls[0][1])


@pytest.mark.parametrize("grad", [False, True])
def test_accelerate_cpu_offload(generator, grad):
    accelerate = pytest.importorskip("accelerate")
    model, fused, (x, t, y) = pair(generator)
    results = []
    for m in (model, fused):
        accelerate.cpu_offload(m, execution_device="cpu")
        with torch.set_grad_enabled(grad):
            results.append(m(x, timestep=t, class_labels=y).sample)
    assert on_the_fused_path(fused)  # offload hooks the Linears, which the fused path calls
    assert_close_rel(results[1], results[0], torch.float32, "offloaded fused output")


def test_float64_and_autocast_keep_the_unfused_dtypes(generator):
    model, fused, (x, t, y) = pair(generator)
    ref64 = run(model.double(), x.double(), t.double(), y)
    out64 = run(fused.double(), x.double(), t.double(), y)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref64, rtol=1e-10, atol=1e-12)
    model.float()
    fused.float()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            ref, out = run(model, x, t, y), run(fused, x, t, y)
        assert out.dtype == ref.dtype
        assert_close_rel(out.float(), ref.float(), dtype, f"autocast {dtype}")


def test_a_refusal_names_exactly_what_the_block_lacks(generator):
    """PixArt's blocks (ada_norm_single, cross-attention) were told their AdaLayerNormZero had
    no embedder, though their norm1 is a plain LayerNorm; they are fused now. A Stable
    Diffusion-style block (layer_norm, GEGLU) is told its norm type and its feed-forward."""
    from diffusers.models.attention import BasicTransformerBlock

    pixart = BasicTransformerBlock(48, 2, 24, cross_attention_dim=48, norm_type="ada_norm_single",
                                   activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                   norm_elementwise_affine=False)  # (as PixArt's config has it)
    assert integration.check_block(pixart, "0") == "ada_norm_single"
    sd = BasicTransformerBlock(48, 2, 24, cross_attention_dim=48, norm_type="layer_norm",
                               activation_fn="geglu")
    with pytest.raises(ValueError) as refused:
        integration.check_block(sd, "3")
    assert str(refused.value) == (
        "model: block 3 cannot be fused: norm_type 'layer_norm' (need one of 'ada_norm_zero', "
        "'ada_norm_single'); its feed-forward is not Linear -> GELU(tanh) -> Dropout -> Linear")


@pytest.mark.slow
def test_torch_compile_fullgraph_of_a_fused_model(generator):
    model, fused, (x, t, y) = pair(generator)
    compiled = torch.compile(fused, fullgraph=True)
    assert_close_rel(run(compiled, x, t, y), run(model, x, t, y), torch.float32,
                     "compiled fused output")


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_diffusers_group_offloading(generator, offload_type, monkeypatch):
    """diffusers' group offloading wraps the blocks' (or their layers') forwards with its own
    hooks; on the CPU both devices are the CPU, which runs every hook and move (through
    accelerate's send_to_device: diffusers imports it only where accelerate is installed)."""
    pytest.importorskip("accelerate")
    from diffusers.hooks import apply_group_offloading

    model, fused, (x, t, y) = pair(generator)
    fused_calls = []
    block_forward = integration.dit_block_forward
    monkeypatch.setattr(integration, "dit_block_forward",
                        lambda *a, **k: fused_calls.append(1) or block_forward(*a, **k))
    results = []
    for m in (model, fused):
        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        # (DiT does not declare group-offloading support; PixArt's enable_group_offload does
        # the same as this call)
        apply_group_offloading(m, onload_device=torch.device("cpu"), offload_type=offload_type,
                               **kwargs)
        results.append(run(m, x, t, y))
    assert len(fused_calls) == 2  # (diffusers' hook wraps the fused forward of each block)
    assert_close_rel(results[1], results[0], torch.float32, f"{offload_type} group offloading")


def test_accelerate_model_offload_hook(generator):
    """What a pipeline's enable_model_cpu_offload installs on each model."""
    accelerate = pytest.importorskip("accelerate")
    model, fused, (x, t, y) = pair(generator)
    results = []
    for m in (model, fused):
        accelerate.cpu_offload_with_hook(m, execution_device="cpu")
        results.append(run(m, x, t, y))
    assert on_the_fused_path(fused)
    assert_close_rel(results[1], results[0], torch.float32, "model offload")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_keeps_the_unfused_dtype_and_values(generator, dtype):
    """A model and inputs in fp16/bf16 without autocast (as a pipeline loads it with
    torch_dtype): the fused output has the unfused dtype, within twice the unfused model's
    own error against float64."""
    from conftest import rel_error

    model, fused, (x, t, y) = pair(generator)
    exact = run(copy.deepcopy(model).double(), x.double(), t.double(), y)
    ref = run(model.to(dtype), x.to(dtype), t, y)
    out = run(fused.to(dtype), x.to(dtype), t, y)
    assert out.dtype == ref.dtype == dtype
    assert_close_rel(out.double(), exact, dtype, f"{dtype} output",
                     torch_error=rel_error(ref.double(), exact))


@pytest.mark.parametrize("part", ["", "transformer_blocks.0", "transformer_blocks.0.ff",
                                  "transformer_blocks.0.attn1", "transformer_blocks.0.norm1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_mixed_dtypes_without_autocast_end_as_unfused(generator, part, dtype):
    """Without autocast, the whole model (fed fp32 latents) or one block or one of its modules
    cast to another dtype: the fused model ends as the unfused one does, a RuntimeError naming
    both dtypes (PyTorch's own, from the first product that meets them), never an output of
    its own or a native kernel handed a mix."""
    model, fused, (x, t, y) = pair(generator)
    outcomes = []
    for m in (model, fused):
        m.get_submodule(part).to(dtype)
        with pytest.raises(RuntimeError) as error:
            run(m, x, t, y)
        outcomes.append(str(error.value))
    names = {torch.bfloat16: "BFloat16", torch.float64: "ouble"}[dtype]  # (Double or double)
    for message in outcomes:
        assert "the same" in message and names in message, message
