"""What the diffusers integration tests compare, once: a model against its fused copy."""

import torch
from conftest import assert_close_rel


def count_module_calls(model: torch.nn.Module) -> dict[str, int]:
    """A forward hook on every submodule; the returned dict counts each one's calls by name."""
    seen: dict[str, int] = {}
    for name, module in model.named_modules():
        module.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, seen.get(name, 0) + 1))
    return seen


def assert_same_outputs_and_gradients(model, fused, inputs: dict, what: str) -> None:
    """Both models' `.sample` on `inputs` and every parameter's gradient of its squared sum
    agree in fp32 (a gradient the unfused model does not get, the fused one does not either;
    the key projections' biases are skipped: their gradient is zero in theory, rounding noise
    on both sides)."""
    results = []
    for m in (model, fused):
        out = m(**inputs).sample
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    assert_close_rel(out, ref, torch.float32, f"fused {what} output")
    for name, g in ref_grads.items():
        if g is None:
            assert grads[name] is None, name
            continue
        if "to_k.bias" in name or "add_k_proj.bias" in name:
            continue
        assert_close_rel(grads[name], g, torch.float32, f"d{name}")
