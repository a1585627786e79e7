"""The GPU pass's benchmark rows: each contender timed beside the ceilings of the same run.

Benchmark rows are bf16 at DiT-XL/2 shapes (width 1152, 16 heads of 72, N=256 tokens). Every
contender of a row is timed in the same process as the row's ceilings: the device copy rate
(a read and a write per byte) and a bf16 GEMM. Each contender gets two CUDA-event times
(onestep_kernels.timing): `ms`, per call back to back with the queue full (the throughput:
rates, ceilings and targets read it), and `alone_ms`, one call with the queue empty (the
host's launch time included: the latency targets of one-step sampling read it). A contender
that fails records its error instead of stopping the pass. Each row lists the issue's targets
it covers with the measured value and whether it is met.

`smoke_setting()` runs every row on the CPU in fp32 at tiny shapes without torch.compile:
numbers that mean nothing, plumbing that the test suite checks.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import onestep_kernels as ok
from onestep_kernels import measure, timing
from onestep_kernels.dispatch import OPS
from onestep_kernels.errors import headline
from onestep_kernels.op_spec import Sizes, dit_sizes


@dataclass(frozen=True)
class Setting:
    device: torch.device
    dtype: torch.dtype
    D: int            # width
    H: int            # heads
    N: int            # tokens
    batches: tuple    # (training/throughput batch, large batch)
    latency_batches: tuple
    mb_batch: int     # batch of the memory-bound rows
    attention_shapes: tuple  # (B, H, N, Dh)
    dit: str          # DiT_models name
    dit_input: int    # latent side
    copy_mib: int
    gemm: int
    compile: bool
    slt: str = "slt-S"  # the SLT size of the slt row (onestep_models.slt.SLT_SIZES)
    slt_batch: int = 128  # its candidates (of dit_input / 2 squared tokens)
    slt_digits_batch: int = 64  # the row's digits-size case: slt-tiny's candidates (16 tokens)
    screen: str = "slt-screen"  # the screening row's SLT size
    screen_candidates: int = 128

    @property
    def Dh(self) -> int:
        return self.D // self.H


def gpu_setting() -> Setting:
    return Setting(torch.device("cuda"), torch.bfloat16, 1152, 16, 256, (32, 128), (1, 8), 128,
                   ((32, 16, 256, 72), (32, 12, 256, 64), (8, 16, 1024, 72), (4, 16, 4096, 64)),
                   "DiT-XL/2", 32, 512, 8192, True)


def smoke_setting() -> Setting:
    return Setting(torch.device("cpu"), torch.float32, 64, 4, 16, (2, 3), (1,), 3,
                   ((2, 4, 16, 16), (1, 2, 24, 8)), "DiT-S/8", 16, 8, 128, False,
                   slt="slt-tiny", slt_batch=2, slt_digits_batch=2, screen="slt-screen-tiny",
                   screen_candidates=4)


def peak_bytes(fn: Callable, device: torch.device) -> int | None:
    """Peak memory allocated during fn beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    timing.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    timing.sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def describe_error(err: BaseException) -> dict:
    """A failure as a record: the error's first line, and where its root cause was raised (the
    innermost exception of the chain, its last frames: an inductor AssertionError has no
    message, only a place)."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    frames = traceback.extract_tb(root.__traceback__)[-4:]
    return {"error": headline(err), "root_cause": headline(root),
            "raised_at": [f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '')[:120]}"
                          for f in frames]}


class Row:
    """The records of one row: contenders' times and rates, and the targets they meet."""

    def __init__(self, name: str, setting: Setting, ceilings: dict):
        self.name, self.s, self.ceilings = name, setting, ceilings
        self.records: list[dict] = []
        self.targets: list[dict] = []
        self.out = Path(".")
        self.deadline = float("inf")  # perf_counter() time after which no new work starts

    def time(self, case: str, contender: str, fn: Callable, *, amount: float = 0.0,
             unit: str = "", memory: bool = False, latency: bool = False) -> float | None:
        """Records fn's time per call queued (`ms`: back to back, the throughput; rates and
        ceilings are read from it) and alone (`alone_ms`: host launch + GPU, the latency of
        one call; see onestep_kernels.timing). Returns the queued seconds, or with `latency`
        the alone ones; None if fn failed (the record says why)."""
        entry = {"case": case, "contender": contender}
        try:
            seconds = timing.queued(fn, self.s.device)
            alone = timing.alone(fn, self.s.device)
            entry["ms"] = round(seconds * 1e3, 4)
            entry["alone_ms"] = round(alone * 1e3, 4)
            if amount:
                entry[unit] = round(amount / seconds / 1e9, 1)
                ceiling = self.ceilings.get(unit)
                if ceiling:
                    entry["of_ceiling"] = round(amount / seconds / 1e9 / ceiling, 3)
            if latency:
                seconds = alone
            peak = peak_bytes(fn, self.s.device) if memory else None
            if peak is not None:
                entry["peak_mib"] = round(peak / 2**20, 1)
        except Exception as err:  # noqa: BLE001 - one contender's failure is a result
            entry.update(describe_error(err))
            seconds = None
        self.records.append(entry)
        return seconds

    def target(self, what: str, value: float | None, bound: float, at_least: bool = True) -> None:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        self.targets.append({"target": what, "value": None if value is None else round(value, 3),
                             "bound": bound, "met": met})

    def add(self, **entry) -> None:
        self.records.append(entry)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _compiled(fn: Callable, setting: Setting, **kwargs) -> Callable | None:
    return torch.compile(fn, **kwargs) if setting.compile else None


def _rand(setting: Setting, *shape: int, scale: float = 1.0, grad: bool = False):
    t = (torch.randn(shape, device=setting.device) * scale).to(setting.dtype)
    return t.requires_grad_(grad)


# ---------------------------------------------------------------------------- rows

def row_ceilings(row: Row) -> None:
    s = row.s
    n = s.copy_mib * 2**20 // 4
    src, dst = torch.randn(n, device=s.device), torch.empty(n, device=s.device)
    seconds = row.time("device copy", "copy_", lambda: dst.copy_(src), amount=8 * n, unit="GB/s")
    a, b = _rand(s, s.gemm, s.gemm), _rand(s, s.gemm, s.gemm)
    gemm = row.time(f"GEMM {s.gemm}^3", "torch.mm", lambda: torch.mm(a, b),
                    amount=2 * s.gemm**3, unit="GFLOP/s")
    if seconds:
        row.ceilings["GB/s"] = 8 * n / seconds / 1e9
    if gemm:
        row.ceilings["GFLOP/s"] = 2 * s.gemm**3 / gemm / 1e9


def _blocks(s: Setting):
    from onestep_kernels.layers import DiTBlock, FusedDiTBlock

    torch.manual_seed(0)
    reference = DiTBlock(s.D, s.H)
    with torch.no_grad():
        for p in reference.parameters():  # adaLN-Zero's zero init would skip the branches
            p.normal_(0, 0.02)
    reference = reference.to(s.device, s.dtype)
    fused = FusedDiTBlock(s.D, s.H).to(s.device, s.dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _roofline_forward(row: Row, B: int, reference) -> float | None:
    """The block forward if its matrix products ran at cuBLAS's speed, its attention at
    SDPA's, and its memory-bound steps moved their bytes at the copy rate (bias+GELU folded
    into fc1): LN-modulate 2, gated residual + LN-modulate 4, the MLP's gated residual 3
    rows of B*N*D elements."""
    s = row.s
    x, c = _rand(s, B * s.N, s.D), _rand(s, B, s.D)
    q = _rand(s, B, s.H, s.N, s.Dh)
    a, m = reference.attn, reference.mlp
    u = _rand(s, B * s.N, m.fc1.out_features)
    parts = [lambda: F.linear(x, a.qkv.weight, a.qkv.bias), lambda: F.linear(x, a.proj.weight,
             a.proj.bias), lambda: F.linear(x, m.fc1.weight, m.fc1.bias),
             lambda: F.linear(u, m.fc2.weight, m.fc2.bias),
             lambda: F.linear(c, reference.adaLN_modulation[1].weight),
             lambda: F.scaled_dot_product_attention(q, q, q)]
    times = [timing.queued(p, s.device) for p in parts]
    copy_rate = row.ceilings.get("GB/s")
    if copy_rate is None:
        return None
    moved = 9 * B * s.N * s.D * x.element_size()
    total = sum(times) + moved / (copy_rate * 1e9)
    row.add(case=f"B={B} forward", contender="roofline", ms=round(total * 1e3, 4),
            parts_ms=[round(t * 1e3, 4) for t in times])
    return total


def row_block(row: Row) -> None:
    s = row.s
    reference, fused = _blocks(s)
    contenders = {"eager": reference, "onestep": fused}
    if s.device.type == "cuda":  # the LayerNorm kernels before issue 31, to time against
        contenders["onestep, padded LayerNorm kernels"] = _WithBackend(fused, "triton_padded")
    if s.compile:
        contenders["torch.compile"] = torch.compile(copy.deepcopy(reference))
        contenders["onestep + torch.compile"] = torch.compile(copy.deepcopy(fused))
    for B in s.batches:
        x, c = _rand(s, B, s.N, s.D), _rand(s, B, s.D)
        forward = {}
        with torch.no_grad():
            for name, block in contenders.items():
                forward[name] = row.time(f"B={B} forward", name, lambda b=block: b(x, c))
        roof = _roofline_forward(row, B, reference)
        xg, dout = x.clone().requires_grad_(), _rand(s, B, s.N, s.D)
        training = {name: row.time(f"B={B} forward+backward", name,
                                   _training_step(block, xg, c, dout), memory=True)
                    for name, block in contenders.items()}
        ours = forward["onestep"]
        row.target(f"block fwd B={B}: speed-up over eager >= 1.25",
                   _ratio(forward["eager"], ours), 1.25)
        row.target(f"block fwd B={B}: speed-up over torch.compile >= 1.05",
                   _ratio(forward.get("torch.compile"), ours), 1.05)
        row.target(f"block fwd B={B}: time / roofline <= 1.2", _ratio(ours, roof), 1.2,
                   at_least=False)
        row.target(f"block fwd B={B}: onestep+compile / onestep eager time <= 1.0",
                   _ratio(forward.get("onestep + torch.compile"), ours), 1.0, at_least=False)
        row.target(f"block fwd+bwd B={B}: speed-up over eager >= 1.15",
                   _ratio(training["eager"], training["onestep"]), 1.15)
        row.target(f"block fwd+bwd B={B}: speed-up over torch.compile >= 1.0",
                   _ratio(training.get("torch.compile"), training["onestep"]), 1.0)
        peaks = {r["contender"]: r.get("peak_mib") for r in row.records
                 if r["case"] == f"B={B} forward+backward"}
        row.target(f"block fwd+bwd B={B}: peak memory / eager's <= 1.0",
                   _ratio(peaks.get("onestep"), peaks.get("eager")), 1.0, at_least=False)


class _WithBackend(torch.nn.Module):
    """A block whose ops run on `backend` where they have one (dispatch.use_backend)."""

    def __init__(self, block: torch.nn.Module, backend: str):
        super().__init__()
        self.block, self.backend = block, backend

    def forward(self, *args):
        with ok.use_backend(self.backend):
            return self.block(*args)


def _training_step(block, x: torch.Tensor, c: torch.Tensor, dout: torch.Tensor) -> Callable:
    """A block's forward and backward from fresh gradients, back-propagating `dout` (a dense
    gradient, as the next block would give; a sum's is an expanded scalar)."""
    def step():
        block.zero_grad(set_to_none=True)
        block(x, c).backward(dout)
    return step


def _dit(s: Setting, fused: bool):
    from onestep_models.dit import DiT_models

    torch.manual_seed(0)
    model = DiT_models[s.dit](input_size=s.dit_input, num_classes=1000, fused=fused)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(s.device, s.dtype).eval()


def row_dit(row: Row) -> None:
    """DiT forward throughput at the training batch, and one-step latency at small batches."""
    from onestep_kernels.cuda_graph import CUDAGraphed

    s = row.s
    reference, fused = _dit(s, False), _dit(s, True)
    fused.load_state_dict(reference.state_dict())
    graphed = CUDAGraphed(fused)
    compiled = _compiled(copy.deepcopy(reference), s)
    compiled_graph = _compiled(copy.deepcopy(reference), s, mode="reduce-overhead")
    results = {}
    for B in (s.batches[0], *s.latency_batches):
        x = _rand(s, B, 4, s.dit_input, s.dit_input)
        t = torch.rand(B, device=s.device).to(s.dtype) * 999
        y = torch.randint(0, 1000, (B,), device=s.device)
        contenders = {"eager": reference, "onestep": fused, "onestep + CUDA graph": graphed}
        if B == s.batches[0]:
            contenders["torch.compile"] = compiled
        else:
            contenders['torch.compile(mode="reduce-overhead")'] = compiled_graph
        for name, model in contenders.items():
            if model is None:
                continue
            with torch.no_grad():  # the small batches are latency: one call alone
                results[B, name] = row.time(f"{s.dit} B={B} forward", name,
                                            lambda m=model: m(x, t, y),
                                            latency=B in s.latency_batches)
    B = s.batches[0]
    row.target(f"{s.dit} fwd B={B}: speed-up over eager >= 1.2",
               _ratio(results.get((B, "eager")), results.get((B, "onestep"))), 1.2)
    row.target(f"{s.dit} fwd B={B}: speed-up over torch.compile >= 1.05",
               _ratio(results.get((B, "torch.compile")), results.get((B, "onestep"))), 1.05)
    for B in s.latency_batches:
        row.target(f"{s.dit} B={B} latency: CUDA graph / compile(reduce-overhead) <= 1.0",
                   _ratio(results.get((B, "onestep + CUDA graph")),
                          results.get((B, 'torch.compile(mode="reduce-overhead")'))), 1.0,
                   at_least=False)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _memory_bound_cases(s: Setting):
    """For each memory-bound op (OpSpec.memory_bound): (name, eager expression, the public
    function, its example's arguments with gradients, bytes moved forward, backward). The
    bytes count each tensor read or written once: forward its inputs and results, backward the
    results' gradients, what the backward reads (OpSpec.saved) and the inputs' gradients."""
    sizes = dit_sizes(s.mb_batch, s.D, s.H, s.N)
    generator = torch.Generator(device=s.device).manual_seed(0)
    for op in OPS.values():
        spec = op.spec
        if not spec.memory_bound or spec.eager is None:
            continue
        args, kwargs = spec.example(sizes, s.device, s.dtype, generator)
        inputs = [t.detach().clone().requires_grad_() for t in args]
        params = tuple(kind(1) for _, kind in spec.params)  # (sizes do not depend on them)
        outputs = spec.allocate("reference", True, *inputs, *params)
        returned = outputs[:spec.returns]
        saved = op.saved_of((*inputs, *params), outputs)
        forward = _bytes(inputs) + _bytes(returned)
        backward = _bytes(returned) + _bytes(saved) + _bytes(inputs)
        yield (op.name, spec.eager, op.public, inputs, forward, backward)


def kernel_table(fn: Callable, device: torch.device, rows: int = 14, host_rows: int = 0,
                 calls: int = 5) -> tuple[float, list[str]]:
    """Where fn's time goes, under torch.profiler: (the device's busy ms per call, lines of its
    kernels by time per call), and with host_rows the host's operations by their own time (a
    synchronisation or an allocation shows there). On the CPU the 'kernels' are operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    timing.sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        timing.sync(device)
    averages = prof.key_averages()
    work = "CUDA" if device.type == "cuda" else "CPU"
    kernels = sorted((e for e in averages if e.device_type.name == work),
                     key=lambda e: -_self_us(e, work))
    busy = sum(_self_us(e, work) for e in kernels) / calls / 1e3
    lines = [f"busy {busy:.4f} ms per call"]
    lines += [f"{_self_us(e, work) / calls / 1e3:8.4f} ms x{e.count // calls:<3d} {e.key[:110]}"
              for e in kernels[:rows]]
    host = sorted((e for e in averages if e.device_type.name == "CPU"),
                  key=lambda e: -e.self_cpu_time_total)
    lines += [f"host {e.self_cpu_time_total / calls / 1e3:8.4f} ms x{e.count // calls:<3d} "
              f"{e.key[:100]}" for e in host[:host_rows if work == "CUDA" else 0]]
    return busy, lines


def _self_us(event, work: str) -> float:
    return event.self_device_time_total if work == "CUDA" else event.self_cpu_time_total


def row_profile(row: Row) -> None:
    """The reference and the fused block at the training batch, forward and forward+backward,
    under torch.profiler: the GPU's busy time per call and its kernels by time (the tables in
    profile.txt; the records keep the busy time and the five longest). Where the block's time
    goes, beside the block row's wall-clock numbers."""
    s = row.s
    B = s.batches[0]
    reference, fused = _blocks(s)
    x, c = _rand(s, B, s.N, s.D), _rand(s, B, s.D)
    xg, dout = x.clone().requires_grad_(), _rand(s, B, s.N, s.D)
    text = []
    for name, block in (("eager", reference), ("onestep", fused)):
        def forward(b=block):
            with torch.no_grad():
                b(x, c)

        for case, fn, host_rows in ((f"B={B} forward", forward, 0),
                                    (f"B={B} forward+backward",
                                     _training_step(block, xg, c, dout), 12)):
            busy, lines = kernel_table(fn, s.device, host_rows=host_rows)
            row.add(case=case, contender=name, busy_ms=round(busy, 4),
                    longest=[line.strip() for line in lines[1:6]])
            text += [f"{name} block, {case}", *(f"  {line}" for line in lines), ""]
    (row.out / "profile.txt").write_text("\n".join(text))


def row_memory_bound(row: Row) -> None:
    s = row.s
    for name, eager, public, inputs, fwd_bytes, bwd_bytes in _memory_bound_cases(s):
        contenders = {"eager": eager}
        if s.compile:
            contenders["torch.compile"] = torch.compile(eager)
        for backend in OPS[name].backends:
            try:  # the backends that can take this call here, beside the eager expression
                OPS[name].resolve(backend, s.device, s.dtype, inputs[0].shape[-1], True)
            except ValueError:
                continue
            if backend != "reference":
                contenders[backend] = (lambda *a, be=backend: public(*a, backend=be))
        fwd, bwd = {}, {}
        for contender, fn in contenders.items():
            with torch.no_grad():
                fwd[contender] = row.time(f"{name} fwd", contender, lambda f=fn: f(*inputs),
                                          amount=fwd_bytes, unit="GB/s")
            try:
                outs = fn(*inputs)
                outs = outs if isinstance(outs, tuple) else (outs,)
                grads = [torch.randn_like(o) for o in outs]
            except Exception:  # noqa: BLE001 - recorded by the forward row already
                continue
            bwd[contender] = row.time(
                f"{name} bwd", contender,
                lambda o=outs, g=grads: torch.autograd.grad(o, inputs, g, retain_graph=True),
                amount=bwd_bytes, unit="GB/s")
        copy_rate = row.ceilings.get("GB/s")
        for kind, times, moved in (("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes)):
            ours = [(t, c) for c, t in times.items() if t and c not in ("eager", "torch.compile")]
            if not ours:
                row.target(f"{name} {kind}: an onestep backend ran", None, 1.0)
                continue
            best = min(ours)
            rate = moved / best[0] / 1e9
            row.target(f"{name} {kind} ({best[1]}): share of the copy rate >= 0.85",
                       _ratio(rate, copy_rate), 0.85)
            row.target(f"{name} {kind} ({best[1]}): speed-up over torch.compile >= 1.2",
                       _ratio(times.get("torch.compile"), best[0]), 1.2)


def row_attention(row: Row) -> None:
    s = row.s
    for B, H, N, Dh in s.attention_shapes:
        q, k, v = (_rand(s, B, H, N, Dh, grad=True) for _ in range(3))
        dout = _rand(s, B, H, N, Dh)
        flops = 4 * B * H * N * N * Dh
        case = f"({B}, {H}, {N}, {Dh})"
        times = {}
        for name in ("sdpa", "triton"):
            if name == "triton" and s.device.type == "cpu":
                continue
            call = (lambda: F.scaled_dot_product_attention(q, k, v)) if name == "sdpa" else (
                lambda: ok.attention(q, k, v, backend="triton"))
            with torch.no_grad():
                times[name, "fwd"] = row.time(f"{case} fwd", name, call, amount=flops,
                                              unit="GFLOP/s")
            times[name, "fwd+bwd"] = row.time(f"{case} fwd+bwd", name,
                                              lambda c=call: c().backward(dout),
                                              amount=3.5 * flops, unit="GFLOP/s")
        for kind in ("fwd", "fwd+bwd"):
            row.target(f"attention {case} {kind}: triton / SDPA speed >= 0.8",
                       _ratio(times.get(("sdpa", kind)), times.get(("triton", kind))), 0.8)


def row_fused_linear(row: Row) -> None:
    s = row.s
    B = s.batches[0]
    x = _rand(s, B, s.N, s.D)
    shift, scale = _rand(s, B, s.D, scale=0.1), _rand(s, B, s.D, scale=0.1)
    w, b = _rand(s, 3 * s.D, s.D, scale=s.D ** -0.5), _rand(s, 3 * s.D)
    flops = 2 * B * s.N * s.D * 3 * s.D
    times = {}
    with torch.no_grad():
        for backend in ("separate", "triton"):
            if backend == "triton" and s.device.type == "cpu":
                continue
            times[backend] = row.time(
                f"QKV with LN-modulate prologue, B={B}", backend,
                lambda be=backend: ok.fused_linear(x, w, b, shift=shift, scale=scale,
                                                   backend=be),
                amount=flops, unit="GFLOP/s")
    row.target(f"fused_linear QKV B={B}: speed-up over cuBLAS + separate ops >= 1.0",
               _ratio(times.get("separate"), times.get("triton")), 1.0)


def row_host(row: Row) -> None:
    """Host time per call on tiny tensors: each op's example call (OpSpec.example) on its
    default backend beside `x + 1` and F.layer_norm."""
    s = row.s
    x = torch.randn(2, 4, 8, device=s.device)
    generator = torch.Generator(device=s.device).manual_seed(0)
    calls = {"x + 1": lambda: x + 1, "F.layer_norm": lambda: F.layer_norm(x, (8,))}
    for op in OPS.values():
        if op.spec.example is not None and op.public is not None:
            args, kwargs = op.spec.example(Sizes(2, 4, 8, 1, 8), s.device, torch.float32,
                                           generator)
            calls[op.name] = lambda f=op.public, a=args, k=kwargs: f(*a, **k)
    with torch.no_grad():
        for name, call in calls.items():
            for _ in range(20):
                call()
            timing.sync(s.device)
            start = time.perf_counter()
            for _ in range(200):
                call()
            host = (time.perf_counter() - start) / 200
            timing.sync(s.device)
            row.add(case="host time per call, tiny tensors", contender=name,
                    us=round(host * 1e6, 2))


def row_autotune(row: Row) -> None:
    """What autotune chose for each Triton kernel this process launched (the benchmark rows'
    shapes, run before this row), beside every option's time as Triton measured it at the
    last shape it tuned: which warp counts, variants (the LayerNorm backwards' PREFETCH) and
    tiles (attention's, with its head-dim covers) win on this GPU, and by how much."""
    from onestep_kernels import tuning

    for (kernel, _options, _key), (launched, _keywords) in list(tuning._SELECTED.items()):
        timings = getattr(launched, "configs_timings", None)
        if not timings:  # not an autotuner (one option, or autotune off), or never launched
            continue
        name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
        chosen = {id(config) for config in getattr(launched, "cache", {}).values()}
        for config, times in timings.items():
            label = ",".join([*(f"{k}={v}" for k, v in config.kwargs.items()),
                              f"warps={config.num_warps}"])
            ms = times[0] if isinstance(times, (list, tuple)) else times
            row.add(case=f"autotune {name}", contender=label, ms=round(float(ms), 4),
                    chosen=id(config) in chosen)


def row_preferences(row: Row) -> None:
    """Time every backend of every op here and store the order (onestep_kernels.measure)."""
    device = row.s.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    entry = measure.measure_and_store(device)
    for op, by_backend in entry["seconds"].items():
        for backend, seconds in sorted(by_backend.items(), key=lambda i: i[1]):
            row.add(case=op, contender=backend, ms=round(seconds * 1e3, 4))
        for backend, error in entry.get("failed", {}).get(op, {}).items():
            row.add(case=op, contender=backend, error=error)


# ---------------------------------------------------------------------------- the SLT


def slt_models(size: str, input_size: int, in_channels: int, device, dtype):
    """(the fused SLT at `size`, the reference DiTBlock with its block's weights), every
    weight drawn (adaLN-Zero's zeros would make the block the identity)."""
    from onestep_kernels.layers import DiTBlock
    from onestep_models.slt import SLT_SIZES, SingleLayerTransformer

    torch.manual_seed(0)
    model = SingleLayerTransformer(**SLT_SIZES[size], input_size=input_size,
                                   in_channels=in_channels, fusion_states=1, num_classes=1000,
                                   fused=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    block = DiTBlock(model.block.hidden_size, model.block.attn.num_heads)
    block.load_state_dict(model.block.state_dict())
    return model.to(device, dtype), block.to(device, dtype)


def slt_eager_loop(model, block) -> Callable:
    """The SLT as a plain eager loop over the reference block's modules: each application's
    modulation from its own product, its gates scaled by the step (what a user would write)."""
    def modulated(h, shift, scale):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def forward(x, t, y):
        c = model.conditioning(t * model.time_scale, y)
        tau = model.depth_embeddings()
        h = model.x_embedder(x) + model.pos_embed
        for k in range(model.depth_steps):
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c + tau[k]).chunk(6, dim=1)
            step = model.steps[k]
            h = h + (step * g1)[:, None] * block.attn(modulated(h, sh1, sc1))
            h = h + (step * g2)[:, None] * block.mlp(modulated(h, sh2, sc2))
        return model.unpatchify(model.final_layer(h, c))
    return forward


def slt_floor(model, B: int, N: int, device, dtype) -> Callable:
    """The loop's matrix products and attention alone, K times: its floor."""
    D, H = model.block.hidden_size, model.block.attn.num_heads
    a, m = model.block.attn, model.block.mlp
    h = torch.randn(B, N, D, device=device, dtype=dtype)
    u = torch.randn(B, N, m.fc1.out_features, device=device, dtype=dtype)
    q = torch.randn(B, H, N, D // H, device=device, dtype=dtype)

    def run():
        for _ in range(model.depth_steps):
            F.linear(h, a.qkv.weight, a.qkv.bias)
            F.scaled_dot_product_attention(q, q, q)
            F.linear(h, a.proj.weight, a.proj.bias)
            F.linear(h, m.fc1.weight, m.fc1.bias)
            F.linear(u, m.fc2.weight, m.fc2.bias)
    return run


def slt_chained_products(model, B: int, N: int, device, dtype) -> Callable:
    """The floor's products and attention, each reading the one before's output as in the
    loop (the QKV's views to attention, its merged heads to proj, ... fc2's output to the next
    QKV), nothing between them: the floor with the loop's data flow, where slt_floor re-reads
    the same inputs (on a CPU, from its caches)."""
    from onestep_kernels.layers import merge_heads, split_heads_packed_grad

    H = model.block.attn.num_heads
    a, m = model.block.attn, model.block.mlp
    x = torch.randn(B, N, model.block.hidden_size, device=device, dtype=dtype)

    def run():
        h = x
        for _ in range(model.depth_steps):
            q, k, v = split_heads_packed_grad(F.linear(h, a.qkv.weight, a.qkv.bias), H)
            h = F.linear(merge_heads(F.scaled_dot_product_attention(q, k, v)), a.proj.weight,
                         a.proj.bias)
            h = F.linear(F.linear(h, m.fc1.weight, m.fc1.bias), m.fc2.weight, m.fc2.bias)
        return h
    return run


def screening_models(s: Setting, classes: int = 1000):
    """The time budget's networks, random weights: (a `s.dit`-shaped one-step teacher, a FlowDiT
    whose sample is x0 + f(x0, 1, y); the `s.screen` SLT; its preview classifier over the
    latent's C H W values, `classes` classes), on the setting's device, in its dtype but the
    classifier's."""
    from onestep_models.dit import DIT_SIZES, FlowDiT
    from onestep_models.slt import SLT_SIZES, SingleLayerTransformer

    size, patch = s.dit.removeprefix("DiT-").split("/")
    depth, width, heads = DIT_SIZES[size]
    torch.manual_seed(0)
    teacher = FlowDiT(input_size=s.dit_input, patch_size=int(patch), in_channels=4,
                      hidden_size=width, depth=depth, num_heads=heads, num_classes=classes,
                      fused=True)
    slt = SingleLayerTransformer(**SLT_SIZES[s.screen], input_size=s.dit_input, in_channels=4,
                                 num_classes=classes, fused=True)
    from onestep_models.screening import PreviewClassifier

    head = PreviewClassifier(4 * s.dit_input ** 2, classes)
    with torch.no_grad():
        for net in (teacher, slt):
            for p in net.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    # (the classifier stays fp32: score_candidates reads its head so, and a bf16 one is
    # converted per call)
    return (teacher.to(s.device, s.dtype).eval(), slt.to(s.device, s.dtype).eval(),
            head.to(s.device))


def screening_contenders(s: Setting, cuda_graphs: bool):
    """(teacher(): one teacher sample at B = 1, screen(): `s.screen_candidates` candidates
    scored by the preview classifier and the teacher's sample from the best, FLOPs of each)."""
    from onestep_kernels.cuda_graph import CUDAGraphed
    from onestep_models import screening

    teacher_net, slt, head = screening_models(s)
    shape = (4, s.dit_input, s.dit_input)

    def one_step(x0, y):
        return x0 + teacher_net(x0, torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype), y)

    sample = CUDAGraphed(one_step, enabled=cuda_graphs)
    screener = screening.Screener(slt, 1.0, one_step, screening.ClassHeadScorer(head),
                                  s.screen_candidates, shape=shape, cuda_graphs=cuda_graphs,
                                  noise_on="device")
    x0 = torch.randn(1, *shape, device=s.device, dtype=s.dtype)
    y = torch.tensor([7], device=s.device)
    head_flops = 2.0 * s.screen_candidates * sum(
        layer.in_features * layer.out_features for layer in (head.embed[1], head.head))
    flops = {"teacher": screening.dit_flops(teacher_net),
             "screen": screening.screening_flops(slt, s.screen_candidates) + head_flops}
    return (lambda: sample(x0, y)), (lambda: screener(y, seed=0)), flops


def score_candidates_expression(features, n_candidates, weight, bias, target):
    """noise screening's scoring as PyTorch ops: pool, linear, log_softmax, gather, view,
    topk (the benchmarks' eager contender)."""
    pooled = features.float().mean(1)
    logp = torch.nn.functional.linear(pooled, weight, bias).log_softmax(-1)
    scores = logp.gather(1, target.repeat_interleave(n_candidates)[:, None])[:, 0]
    return scores, scores.view(-1, n_candidates).topk(1, dim=1).indices


def row_screening(row: Row) -> None:
    """Noise screening's time budget at DiT-XL/2 shape: one teacher sample at B = 1 against
    screening 128 candidates with the slt-screen SLT and its preview classifier, then the
    teacher on the best, each replayed from a CUDA graph; analytic FLOPs of both. And the
    scoring op at the screening SLT's features against the PyTorch expression, its
    torch.compile and a copy of the features."""
    from onestep_kernels.dispatch import OPS

    s = row.s
    graphs = s.device.type == "cuda"
    teacher, screen, flops = screening_contenders(s, graphs)
    N = s.screen_candidates
    case = f"{s.dit} teacher B=1, {s.screen} x {N} candidates"
    with torch.no_grad():
        alone = row.time(case, "teacher, 1 sample", teacher, amount=flops["teacher"],
                         unit="GFLOP/s", latency=True)
        both = row.time(case, f"screen {N} + teacher 1", screen,
                        amount=flops["teacher"] + flops["screen"], unit="GFLOP/s",
                        latency=True)
    row.add(case=case, flops_teacher=flops["teacher"], flops_screen=flops["screen"])
    row.target(f"{case}: FLOPs(screen) / FLOPs(teacher sample) <= 1.0",
               flops["screen"] / flops["teacher"], 1.0, at_least=False)
    row.target(f"{case}: time(screen + teacher) / time(teacher) <= 2.2", _ratio(both, alone),
               2.2, at_least=False)
    # the scoring op alone, at the screening SLT's states (and a 1000-class head on them)
    from onestep_models.slt import SLT_SIZES  # (its sizes: no second teacher built for them)

    size = SLT_SIZES[s.screen]
    T, D = (s.dit_input // size["patch_size"]) ** 2, size["hidden_size"]
    features = _rand(s, N, T, D)
    weight = torch.randn(1000, D, device=s.device) / D ** 0.5
    bias = torch.zeros(1000, device=s.device)
    target = torch.tensor([3], device=s.device)
    op = OPS["score_candidates"]
    contenders = {"PyTorch expression": score_candidates_expression}
    if s.compile:
        contenders["torch.compile(expression)"] = torch.compile(score_candidates_expression)
    for backend in op.backends:
        if backend != "reference" and op.reason(backend, s.device, s.dtype, D, False) is None:
            contenders[backend] = (lambda f, n, w, b, t, be=backend: op.public(
                f, n, weight=w, bias=b, target=t, backend=be))
    moved = features.numel() * features.element_size() + weight.numel() * 4
    op_case = f"score_candidates {N} x {T} x {D}, 1000 classes"
    times = {}
    with torch.no_grad():
        for name, fn in contenders.items():
            times[name] = row.time(op_case, name, lambda f=fn: f(features, N, weight, bias,
                                                                   target),
                                   amount=moved, unit="GB/s")
        copy = torch.empty_like(features)
        row.time(op_case, "copy of the features (read + write)",
                 lambda: copy.copy_(features), amount=2 * features.numel()
                 * features.element_size(), unit="GB/s")
    best = min((t for n, t in times.items() if n in op.backends and t is not None),
               default=None)
    row.target(f"{op_case}: speed-up of onestep's best over the PyTorch expression >= 1.0",
               _ratio(times.get("PyTorch expression"), best), 1.0)


def row_diffusers(row: Row) -> None:
    """diffusers' DiT, PixArt-alpha, SD3 and Flux at their real widths (two blocks of each
    kind; onestep_gpu_check.diffusers_models), fused by onestep_kernels.integrations.diffusers
    against unfused eager and torch.compile: forward at B=1 (latency, host launch included)
    and B=8 (throughput), bf16, GFLOP/s of the blocks' products."""
    import copy

    from onestep_kernels.integrations.diffusers import fuse

    from .diffusers_models import MODEL_CLASSES, block_flops, make

    s = row.s
    small = s.device.type != "cuda"
    for model_class in MODEL_CLASSES:
        for B in (1, 8) if not small else (1,):
            model, inputs = make(model_class, B, small, s.device, s.dtype)
            contenders = {"eager": model, "onestep": fuse(copy.deepcopy(model))}
            if s.compile:
                contenders["torch.compile"] = torch.compile(model)
            case = f"{model_class} 2 blocks, B={B}"
            times = {}
            with torch.no_grad():
                for name, m in contenders.items():
                    times[name] = row.time(case, name, lambda m=m: m(**inputs).sample,
                                           amount=block_flops(model_class, B, small),
                                           unit="GFLOP/s", latency=B == 1)
            row.target(f"{case}: speed-up of the fused model over eager >= 1.0",
                       _ratio(times["eager"], times["onestep"]), 1.0)
            row.target(f"{case}: speed-up of the fused model over torch.compile >= 1.0",
                       _ratio(times.get("torch.compile"), times["onestep"]), 1.0)
            del model, contenders


def row_slt(row: Row) -> None:
    """The SLT's depth loop (the issue's targets) at its size and candidates (slt-S: 128 of 256
    tokens on a GPU) and at the digits size (slt-tiny on 8 x 8 x 1 digits: 64 candidates of 16
    tokens, as the CPU benchmark): the forward against a plain eager loop over the reference
    block, torch.compile of that loop, and the floor (the loop's products and attention
    alone; and chained, each reading the one before's output); onestep replayed from a CUDA
    graph; the K-step loop against K single applications timed alone; forward+backward
    against eager."""
    s = row.s
    _slt_case(row, s.slt, s.dit_input, 4, s.slt_batch)
    _slt_case(row, "slt-tiny", 8, 1, s.slt_digits_batch)


def _slt_case(row: Row, size: str, side: int, channels: int, B: int) -> None:
    from onestep_kernels.cuda_graph import CUDAGraphed
    from onestep_kernels.depth_loop import depth_loop

    s = row.s
    model, block = slt_models(size, side, channels, s.device, s.dtype)
    N = (side // model.patch_size) ** 2
    x = _rand(s, B, channels, side, side)
    t = torch.ones(B, device=s.device, dtype=s.dtype)
    y = torch.randint(0, 1000, (B,), device=s.device)
    eager = slt_eager_loop(model, block)
    contenders = {"eager loop": eager, "onestep": model}
    if s.device.type == "cuda":
        contenders["onestep + CUDA graph"] = CUDAGraphed(model)
    if s.compile:
        contenders["torch.compile(eager loop)"] = torch.compile(eager)
    case = f"{size} K={model.depth_steps}, {B} x {N} tokens"
    forward = {}
    with torch.no_grad():
        for name, fn in contenders.items():
            forward[name] = row.time(f"{case} forward", name, lambda f=fn: f(x, t, y))
        floor = row.time(f"{case} forward", "floor (products + attention)",
                         slt_floor(model, B, N, s.device, s.dtype))
        # (no target: how far the floor is from what a loop of those products can reach)
        row.time(f"{case} forward", "floor's products chained",
                 slt_chained_products(model, B, N, s.device, s.dtype))
        h = _rand(s, B, N, model.block.hidden_size)
        mods = model.modulations(_rand(s, B, model.block.hidden_size))
        loop = {}
        for name, m in (("K applications", mods), ("one application", mods[:1].contiguous())):
            loop[name] = row.time(f"{case} depth loop", name, lambda m=m: depth_loop(
                h, m, model.block.attn, model.block.mlp.fc1, model.block.mlp.fc2))
    params = [p for p in list(model.parameters()) + list(block.parameters()) if p.requires_grad]

    def training(fn):
        def step():
            for p in params:
                p.grad = None
            fn(x, t, y).float().square().mean().backward()
        return step

    backward = {name: row.time(f"{case} forward+backward", name, training(fn))
                for name, fn in (("eager loop", eager), ("onestep", model))}
    ours = forward.get("onestep")
    row.target(f"SLT {case}: K applications / (K x one alone) <= 1.15",
               _ratio(loop.get("K applications"),
                      None if loop.get("one application") is None
                      else loop["one application"] * model.depth_steps), 1.15, at_least=False)
    row.target(f"SLT {case} fwd: speed-up over the eager loop >= 1.2",
               _ratio(forward.get("eager loop"), ours), 1.2)
    row.target(f"SLT {case} fwd: speed-up over torch.compile of it >= 1.0",
               _ratio(forward.get("torch.compile(eager loop)"), ours), 1.0)
    row.target(f"SLT {case} fwd: time / floor <= 1.15", _ratio(ours, floor), 1.15,
               at_least=False)
    row.target(f"SLT {case} fwd+bwd: speed-up over the eager loop >= 1.0",
               _ratio(backward.get("eager loop"), backward.get("onestep")), 1.0)
