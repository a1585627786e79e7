"""Where the DiT block's time goes on a GPU: torch.profiler's kernel table for the reference
and the fused block (bf16, DiT-XL/2 width), and fc1's bias + GELU done three ways.

    python benchmarks/profile_block.py [--batches 32 128] [--rows 14]

Prints, per block and batch, the wall time per forward (the host's share included), the GPU's
busy time, and the kernels by GPU time; then fc1 + bias + GELU(tanh) as PyTorch's Linear and
GELU, a bias-free product then onestep's bias_gelu_tanh (each backend), and cuBLASLt's GELU
epilogue (torch._addmm_activation), each with its error against a float64 reference.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import onestep_gpu_check as gpu_check
import onestep_kernels as ok
from onestep_kernels import timing


def wall_ms(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def kernel_table(fn, rows: int, host_rows: int = 0) -> str:
    busy, lines = gpu_check.kernel_table(fn, torch.device("cuda"), rows, host_rows)
    return "\n".join(f"  {line}" for line in lines)


def blocks(batches, rows: int) -> None:
    s = gpu_check.gpu_setting()
    reference, fused = gpu_check.rows._blocks(s)
    for B in batches:
        x, c = gpu_check.rows._rand(s, B, s.N, s.D), gpu_check.rows._rand(s, B, s.D)
        for name, block in (("reference", reference), ("fused", fused)):
            with torch.no_grad():
                ms = wall_ms(lambda b=block: b(x, c))
                print(f"\n{name} block, B={B} forward: {ms:.3f} ms wall")
                print(kernel_table(lambda b=block: b(x, c), rows))
            if B != min(batches):
                continue
            xg, dout = x.clone().requires_grad_(), gpu_check.rows._rand(s, B, s.N, s.D)
            step = gpu_check.rows._training_step(block, xg, c, dout)
            print(f"\n{name} block, B={B} forward+backward: {wall_ms(step):.3f} ms wall")
            print(kernel_table(step, rows, host_rows=12))


def bias_gelu(batches) -> None:
    torch.manual_seed(0)
    D, Fh = 1152, 4608
    w = (torch.randn(Fh, D, device="cuda") * D ** -0.5).bfloat16()
    b = (torch.randn(Fh, device="cuda") * 0.1).bfloat16()
    for B in batches:
        h = torch.randn(B * 256, D, device="cuda").bfloat16()
        exact = F.gelu(F.linear(h.double(), w.double(), b.double()), approximate="tanh")
        ways = {"F.linear(bias) + F.gelu": lambda: F.gelu(F.linear(h, w, b), approximate="tanh"),
                "_addmm_activation(gelu)": lambda: torch._addmm_activation(b, h, w.t(),
                                                                          use_gelu=True)}
        for backend in ("triton", "cuda", "reference"):
            ways[f"F.linear + bias_gelu_tanh[{backend}]"] = (
                lambda be=backend: ok.bias_gelu_tanh(F.linear(h, w), b, backend=be))
        print(f"\nfc1 + bias + GELU(tanh), ({B * 256}, {D}) x ({D}, {Fh}), bf16")
        with torch.no_grad():
            for name, fn in ways.items():
                try:
                    ms = timing.queued(fn, torch.device("cuda"))
                    err = ((fn().double() - exact).norm() / exact.norm()).item()
                    print(f"  {name:40s} {ms * 1e3:8.4f} ms  rel err {err:.2e}")
                except Exception as error:  # noqa: BLE001 - one way failing still reports the rest
                    print(f"  {name:40s} failed: {error!r}"[:200])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_block: no CUDA device here")
        return
    blocks(args.batches, args.rows)
    bias_gelu(args.batches)


if __name__ == "__main__":
    main()
