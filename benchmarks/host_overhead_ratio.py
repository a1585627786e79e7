"""Host time per call on tiny tensors as ratios to F.layer_norm's, measured in one process:
40 rounds of 500 calls for each call, in a new random order every round, with and without
autograd, and the DiT blocks (width 32, 4 tokens; 60 rounds of 100 calls). Two estimates of
each ratio: the best round's time over the baseline's best (the least disturbed rounds; many
short rounds find the quiet moments of a shared machine), and the median over rounds of the
ratio within a round (paired: the load of the moment divides out), with its 10th-90th
percentile range. A steadier companion to `pytest benchmarks/test_host_overhead.py` for the
issue's targets (the ops at most 3x F.layer_norm, FusedDiTBlock at most the reference block).

    python benchmarks/host_overhead_ratio.py [--device cuda] [--profile] [--opcodes]

On CUDA the calls are launches that queue work (their host time, the GPU barely busy);
`--profile` adds where the host time of a few calls goes (cProfile, by own time);
`--opcodes` the Python bytecode one call of each executes (sys.settrace opcode events), by
function: a count that does not move with the machine's load, unlike the times.
"""

import argparse
import collections
import cProfile
import pstats
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import onestep_kernels as ok
from onestep_kernels.layers import DiTBlock, FusedDiTBlock


def round_us(calls: dict, rounds: int = 40, repeat: int = 500) -> dict:
    """Each call's time per call (us) in every round; the calls in a new order each round."""
    times = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(300):
            call()
    names = list(calls)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            call = calls[name]
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            times[name].append((time.perf_counter() - start) / repeat * 1e6)
    return times


def best_us(calls: dict, rounds: int = 40, repeat: int = 500) -> dict:
    return {name: min(t) for name, t in round_us(calls, rounds, repeat).items()}


def ratios(times: dict, name: str, base: str) -> str:
    """best over best, and the median (10th-90th percentile) of the rounds' own ratios."""
    paired = sorted(t / b for t, b in zip(times[name], times[base]))
    n = len(paired)
    return (f"{min(times[name]) / min(times[base]):5.2f}x best, "
            f"{statistics.median(paired):5.2f}x paired ({paired[n // 10]:.2f}-"
            f"{paired[(9 * n) // 10]:.2f})")


def opcodes(call, top: int = 12) -> tuple[int, list]:
    """Python opcodes one call executes (after warm-up), in all and by function."""
    for _ in range(3):
        call()
    counts = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return sum(counts.values()), counts.most_common(top)


def profile(calls: dict, names: list, repeat: int = 2000, lines: int = 18) -> None:
    for name in names:
        for _ in range(200):
            calls[name]()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeat):
            calls[name]()
        profiler.disable()
        print(f"\n--- {name}: {repeat} calls, by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(lines)


def triton_launchers(randn) -> None:
    """onestep's Python around each Triton launch (DiT-XL/2 width, a few rows), the launch
    itself replaced by a no-op: the part of a GPU op call that is onestep's own, measurable
    without a GPU (on one, Triton's launch path comes on top)."""
    try:
        from onestep_kernels import tuning
        from onestep_kernels.ops import bias_gelu_tanh as bias_gelu_op
        from onestep_kernels.ops import gated_residual_layernorm_modulate as gated_op
        from onestep_kernels.ops import layernorm_modulate as layernorm_op
    except ImportError:
        return

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    select, select_variants = tuning.select, tuning.select_variants
    tuning.select = lambda kernel, options, key: (NoLaunch(), select(kernel, options, key)[1])
    tuning.select_variants = lambda kernel, options, key: (
        NoLaunch(), select_variants(kernel, options, key)[1])
    try:
        B, N, D = 2, 3, 1152
        x, y, dy = randn(B, N, D), randn(B, N, D), randn(B, N, D)
        gate, shift, scale = randn(B, D), randn(B, D), randn(B, D)
        out, res = torch.empty_like(x), torch.empty_like(x)
        dx, dy_out = torch.empty_like(x), torch.empty_like(x)
        dmod = torch.empty(3, B, D, device=x.device)  # the modulation gradients, stacked
        stats = torch.empty(2, B, N, device=x.device)
        u, b = randn(B * N, 4 * D), randn(4 * D)
        calls = {
            "layernorm_modulate fwd": lambda: layernorm_op._triton_fwd(
                x, shift, scale, out, stats, 1e-6),
            "layernorm_modulate bwd": lambda: layernorm_op._triton_bwd(
                dy, x, scale, stats, dx, dmod[:2], 1e-6),
            "gated_residual_layernorm_modulate fwd": lambda: gated_op._triton_fwd(
                x, y, gate, shift, scale, res, out, stats, 1e-6),
            "gated_residual_layernorm_modulate bwd": lambda: gated_op._triton_bwd(
                dy, dy, x, y, gate, scale, stats, dx, dy_out, dmod, 1e-6),
            "bias_gelu_tanh fwd": lambda: bias_gelu_op._triton_fwd(u, b, torch.empty_like(u)),
        }
        print("\nonestep's Python around a Triton launch (the launch a no-op):")
        for name, us in best_us(calls).items():
            print(f"{name:46s} {us:7.2f} us")
    finally:
        tuning.select, tuning.select_variants = select, select_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--opcodes", action="store_true")
    args = parser.parse_args()
    # (not torch.set_default_device: its TorchFunctionMode would run inside every call)
    def randn(*shape):
        return torch.randn(*shape, device=args.device)

    B, N, D = 2, 3, 16
    x, y = randn(B, N, D), randn(B, N, D)
    shift, scale, gate = randn(B, D), randn(B, D), randn(B, D)
    u, b, q = randn(8, D), randn(D), randn(1, 2, 4, D)
    xg, ug, qg = (t.clone().requires_grad_() for t in (x, u, q))
    calls = {
        "F.layer_norm": lambda: F.layer_norm(x, (D,)),
        "layernorm_modulate": lambda: ok.layernorm_modulate(x, shift, scale),
        "gated_residual_layernorm_modulate":
            lambda: ok.gated_residual_layernorm_modulate(x, y, gate, shift, scale),
        "bias_gelu_tanh": lambda: ok.bias_gelu_tanh(u, b),
        "attention": lambda: ok.attention(q, q, q),
        "F.layer_norm (autograd)": lambda: F.layer_norm(xg, (D,)),
        "layernorm_modulate (autograd)": lambda: ok.layernorm_modulate(xg, shift, scale),
        "gated_residual_layernorm_modulate (autograd)":
            lambda: ok.gated_residual_layernorm_modulate(xg, y, gate, shift, scale),
        "bias_gelu_tanh (autograd)": lambda: ok.bias_gelu_tanh(ug, b),
        "attention (autograd)": lambda: ok.attention(qg, q, q),
    }
    times = round_us(calls)
    print(f"{'per call':46s} {'best':>7s}     ratio to F.layer_norm's")
    for name, t in times.items():
        base = "F.layer_norm (autograd)" if "autograd" in name else "F.layer_norm"
        print(f"{name:46s} {min(t):7.2f} us  {ratios(times, name, base)}")
    torch.manual_seed(0)
    reference = DiTBlock(32, 2).to(args.device)
    fused = FusedDiTBlock(32, 2).to(args.device)
    fused.load_state_dict(reference.state_dict())
    xb, c = randn(1, 4, 32), randn(1, 32)
    xbg = xb.clone().requires_grad_()
    with torch.no_grad():
        blocks = round_us({"reference DiTBlock": lambda: reference(xb, c),
                           "FusedDiTBlock": lambda: fused(xb, c)}, rounds=60, repeat=100)
    blocks.update({f"{k} (autograd)": v for k, v in round_us(
        {"reference DiTBlock": lambda: reference(xbg, c),
         "FusedDiTBlock": lambda: fused(xbg, c)}, rounds=60, repeat=100).items()})
    print(f"\n{'per call':46s} {'best':>7s}     ratio to the reference block's")
    for name, t in blocks.items():
        base = name.replace("FusedDiTBlock", "reference DiTBlock")
        print(f"{name:46s} {min(t):7.1f} us  {ratios(blocks, name, base)}")
    triton_launchers(randn)
    if args.opcodes:
        calls.update({"reference DiTBlock (autograd)": lambda: reference(xbg, c),
                      "FusedDiTBlock (autograd)": lambda: fused(xbg, c)})
        print("\nPython opcodes per call (the busiest functions after each):")
        for name, call in calls.items():
            total, top = opcodes(call)
            print(f"{name:46s} {total:6d}   " + ", ".join(f"{f} {n}" for f, n in top[:4]))
    if args.profile:
        calls.update({"FusedDiTBlock": lambda: fused(xb, c),
                      "FusedDiTBlock (autograd)": lambda: fused(xbg, c)})
        profile(calls, ["layernorm_modulate", "layernorm_modulate (autograd)",
                        "gated_residual_layernorm_modulate"])
        with torch.no_grad():
            profile(calls, ["FusedDiTBlock"], repeat=300, lines=30)
        profile(calls, ["FusedDiTBlock (autograd)"], repeat=300, lines=30)


if __name__ == "__main__":
    main()
