"""attention: non-causal multi-head softmax attention, softmax(q k^T * scale) v.

q, k, v are (B, H, N, Dh) (k and v may have their own token count Nk); the last dimension must
be contiguous, other strides are read as they are (so q, k, v can be views of one fused QKV
projection). Triton takes head dims 16..128, any (72 included; fp32 up to 64). Output
(B, H, N, Dh) in q's dtype.

Backends:
  triton     flash attention (online softmax, no N x N matrix in memory), forward and
             backward, tiles autotuned on the GPU; head dims that a power of two pads by
             much (72: 128) may run in two blocks (64 + 16); fp32 inputs use IEEE products
             (no TF32), so fp32 results are fp32-accurate.
  cpu        onestep's C++ kernel (csrc/cpu/attention.cpp), forward and backward: blocked FMA
             products on packed fp32 panels, any head dim, fp32/fp16/bf16 (computed in fp32).
  sdpa       PyTorch's scaled_dot_product_attention (cuDNN / flash on GPUs).
  reference  the explicit formula below, the test oracle.
Which one runs by default on each device is onestep_kernels.preferences' table.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..errors import ArgumentError
from ..kernel_config import KernelConfig
from ..op_spec import Op, OpSpec
from ..triton_compat import tl, triton
from .common import cdiv, needs_grad, next_power_of_2

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# fp32's IEEE backward (dK/dV) spills at head dims above 64 on sm_80/sm_90 even with 16x16 tiles
# and 16 warps (onestep_kernels.aot); such calls go to another backend.
MAX_HEAD_DIM_FP32 = 64


def reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """The formula, materialising the (N, Nk) scores; computes in fp32 (fp64 if given)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v.to(compute)).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels (FlashAttention-2 style). Program (m, bh) owns BLOCK_M query rows of one
# (batch, head); the backward recomputes probabilities from the saved log-sum-exp.
#
# The head dim is covered by one block of BLOCK_D columns, or (the forward and the dQ kernel;
# autotune picks, `_covers`), where a power of two would pad it by much (72 in a 128-wide
# block: 44% of every product wasted), by two: BLOCK_D then BLOCK_E (72 = 64 + 16 of which 8
# are used). Every tile along the head dim is then a pair, every product over it two
# products accumulated, every product onto it two.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b (acc None: a @ b): in IEEE fp32 for fp32 inputs (no TF32), else in b's dtype
    with fp32 accumulation."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _rows(PTR, rows, row_ok, stride, dims, HEAD_DIM):
    """A (rows, dims) tile of a (N, HEAD_DIM) matrix with row stride `stride`, zero-padded."""
    return tl.load(PTR + rows[:, None] * stride + dims[None, :],
                   mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _columns(PTR, rows, row_ok, stride, dims, HEAD_DIM):
    """The (dims, rows) tile: `_rows` transposed, loaded so (the forward's K^T: on sm_80 its
    larger tiles spill when K is loaded by rows and transposed in registers instead)."""
    return tl.load(PTR + rows[None, :] * stride + dims[:, None],
                   mask=row_ok[None, :] & (dims < HEAD_DIM)[:, None], other=0.0)


@triton.jit
def _store_rows(PTR, value, rows, row_ok, dims, HEAD_DIM):
    """Stores a (rows, dims) tile into a contiguous (N, HEAD_DIM) matrix."""
    tl.store(PTR + rows[:, None] * HEAD_DIM + dims[None, :], value.to(PTR.dtype.element_ty),
             mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    q = _rows(Q, rows, row_ok, sqn, dims, HEAD_DIM)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_E > 0:
        dims_e = BLOCK_D + tl.arange(0, BLOCK_E)
        q_e = _rows(Q, rows, row_ok, sqn, dims_e, HEAD_DIM)
        acc_e = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the hardware's
    for start in range(0, NK, BLOCK_N):
        keys = start + cols
        key_ok = keys < NK
        s = _dot(q, _columns(K, keys, key_ok, skn, dims, HEAD_DIM), None, IEEE)
        if BLOCK_E > 0:
            s = _dot(q_e, _columns(K, keys, key_ok, skn, dims_e, HEAD_DIM), s, IEEE)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p, _rows(V, keys, key_ok, svn, dims, HEAD_DIM), acc * alpha[:, None], IEEE)
        if BLOCK_E > 0:
            acc_e = _dot(p, _rows(V, keys, key_ok, svn, dims_e, HEAD_DIM),
                         acc_e * alpha[:, None], IEEE)
        m_i = m_new
    O += bh * N * HEAD_DIM  # O is contiguous (B, H, N, Dh)
    _store_rows(O, acc / l_i[:, None], rows, row_ok, dims, HEAD_DIM)
    if BLOCK_E > 0:
        _store_rows(O, acc_e / l_i[:, None], rows, row_ok, dims_e, HEAD_DIM)
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=row_ok)  # base-2 log-sum-exp


@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, R, HEAD_DIM, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    # delta = rowsum(dO * O) over R rows of the contiguous (B, H, N, Dh) O and dO: what both
    # backward kernels subtract (one pass over two tensors, where PyTorch's expression took
    # four kernels and three fp32 temporaries).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (dims < HEAD_DIM)[None, :]
    offsets = rows[:, None] * HEAD_DIM + dims[None, :]
    o = tl.load(O + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < R)


DELTA_BLOCK = 4096  # elements per program of the delta kernel (32 a thread at 4 warps)


def _delta_constexprs(block_d: int) -> dict:
    return {"BLOCK_R": DELTA_BLOCK // block_d, "BLOCK_D": block_d}


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # Program (n, bh) owns BLOCK_N keys and walks all query blocks: dV = P^T dO,
    # dK = scale * dS^T Q with dS = P * (dO V^T - delta). The head dim in one block: split in
    # two, this kernel's eight tiles along it spill on sm_90 (onestep_kernels.aot).
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * sqb + h * sqh
    DO += bh * N * HEAD_DIM  # DO, DK, DV are contiguous (B, H, N or NK, Dh)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < NK
    k = _rows(K + b * skb + h * skh, keys, key_ok, skn, dims, HEAD_DIM)
    v = _rows(V + b * svb + h * svh, keys, key_ok, svn, dims, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q = _rows(Q, rows, row_ok, sqn, dims, HEAD_DIM)
        do = _rows(DO, rows, row_ok, HEAD_DIM, dims, HEAD_DIM)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        p = tl.exp2(_dot(q, tl.trans(k), None, IEEE) * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dv = _dot(tl.trans(p), do, dv, IEEE)
        ds = p * (_dot(do, tl.trans(v), None, IEEE) - delta[:, None])
        dk = _dot(tl.trans(ds), q, dk, IEEE)
    DK += bh * NK * HEAD_DIM
    DV += bh * NK * HEAD_DIM
    _store_rows(DK, dk * scale, keys, key_ok, dims, HEAD_DIM)
    _store_rows(DV, dv, keys, key_ok, dims, HEAD_DIM)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Program (m, bh) owns BLOCK_M queries: dQ = scale * dS K.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += bh * N * HEAD_DIM  # DO, DQ are contiguous (B, H, N, Dh)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    q = _rows(Q + b * sqb + h * sqh, rows, row_ok, sqn, dims, HEAD_DIM)
    do = _rows(DO, rows, row_ok, HEAD_DIM, dims, HEAD_DIM)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_E > 0:
        dims_e = BLOCK_D + tl.arange(0, BLOCK_E)
        q_e = _rows(Q + b * sqb + h * sqh, rows, row_ok, sqn, dims_e, HEAD_DIM)
        do_e = _rows(DO, rows, row_ok, HEAD_DIM, dims_e, HEAD_DIM)
        dq_e = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634
    for start in range(0, NK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < NK
        k = _rows(K, keys, key_ok, skn, dims, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, IEEE)
        if BLOCK_E > 0:
            k_e = _rows(K, keys, key_ok, skn, dims_e, HEAD_DIM)
            s = _dot(q_e, tl.trans(k_e), s, IEEE)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(_rows(V, keys, key_ok, svn, dims, HEAD_DIM)), None, IEEE)
        if BLOCK_E > 0:
            dp = _dot(do_e, tl.trans(_rows(V, keys, key_ok, svn, dims_e, HEAD_DIM)), dp, IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds, k, dq, IEEE)
        if BLOCK_E > 0:
            dq_e = _dot(ds, k_e, dq_e, IEEE)
    DQ += bh * N * HEAD_DIM
    _store_rows(DQ, dq * scale, rows, row_ok, dims, HEAD_DIM)
    if BLOCK_E > 0:
        _store_rows(DQ, dq_e * scale, rows, row_ok, dims_e, HEAD_DIM)


def _head_block(head_dim: int) -> int:
    """The one power-of-two block that covers a head dim."""
    return max(16, next_power_of_2(head_dim))


def _covers(head_dim: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """How the kernels may cover the head dim: one power-of-two block (BLOCK_E 0) first, then,
    in fp16/bf16 where two blocks pad less, those: 72 -> 64 + 16, 96 -> 64 + 32, 40 -> 32 +
    16 (64, 100 -> one block). Autotune picks between them (fp32 keeps its one block)."""
    whole = _head_block(head_dim)
    covers = ({"BLOCK_D": whole, "BLOCK_E": 0},)
    low = whole // 2
    if dtype == torch.float32 or head_dim <= low or low < 16:
        return covers
    high = max(16, next_power_of_2(head_dim - low))
    return covers + (({"BLOCK_D": low, "BLOCK_E": high},) if low + high < whole else ())


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for a head dim in one block; smaller tiles where fp32 accumulators and IEEE
    products would otherwise spill. Free of spills on sm_80 and sm_90 with Triton 3.6's ptxas
    as with 3.9's (onestep_kernels.aot): with 4 warps, 3.6 spilled the 64 x 64 tile at head
    block 32 (sm_80) and 32 x 32 at 64 (sm_90), and fp32's dK/dV kernel at 3 stages."""
    block_d = _head_block(head_dim)
    if dtype == torch.float32:  # IEEE fp32 products on fp32 tiles: the most registers
        block, warps, stages = 16, 8, 2
    else:
        block, warps, stages = (32 if block_d >= 64 else 64), (4 if block_d >= 128 else 8), 3
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "num_warps": warps,
            "num_stages": stages}


def _hashable(options) -> tuple:
    """(constexprs dict, warps, stages) options as tuning.select_variants takes them."""
    return tuple((tuple(constexprs.items()), *settings) for constexprs, *settings in options)


@functools.cache  # asked at every launch
def _forward_tiles(head_dim: int, dtype: torch.dtype) -> tuple[tuple[tuple, int, int], ...]:
    """The forward's options that autotune picks from on a GPU, keyed on the sequence lengths
    and head dim, as ((constexpr pairs), num_warps, num_stages): the fixed launch config in one
    head block first (what the interpreter and ONESTEP_AUTOTUNE=0 run), then the larger tiles
    that flash attention's kernels use on sm_80/sm_90 (query blocks of 64-128 rows, key blocks
    of 32-64; 128 rows need 8 warps, at 4 they spill), in each cover of the head dim
    (`_covers`; split in two, the 32 x 32 tile spills on sm_90), each free of spills
    (onestep_kernels.aot). fp32 (IEEE products) keeps its one small tile."""
    cfg = _launch_config(head_dim, dtype)
    fixed = ({"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}, cfg["num_warps"],
             cfg["num_stages"])
    covers = _covers(head_dim, dtype)
    if dtype == torch.float32:
        return _hashable([({**fixed[0], **covers[0]}, *fixed[1:])])
    larger = tuple(({"BLOCK_M": m, "BLOCK_N": n}, w, stages)
                   for m, n, w, stages in ((64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)))
    tiles = (fixed,) + tuple(t for t in larger if t[0] != fixed[0])
    return _hashable(({**tile, **cover}, warps, stages) for cover in covers
                     for tile, warps, stages in tiles
                     if not (cover["BLOCK_E"] and tile == {"BLOCK_M": 32, "BLOCK_N": 32}))


# The backward's tiles beyond the fixed one, as (BLOCK_M, BLOCK_N, warps, stages), for a head
# dim covered by up to 64 columns and by more: the dQ kernel owns BLOCK_M queries and walks the
# keys, the dK/dV kernel owns BLOCK_N keys and walks the queries, so each grows its own block
# (Triton's fused-attention tutorial: dQ 128 x 32, dK/dV 32 x 128). Past 64 columns only
# 8 warps hold the larger tiles without spilling (onestep_kernels.aot). dK/dV's 32 x 128 tile
# runs unpipelined (1 stage): at 2 or 3 Triton 3.6 spills it on sm_80.
_BACKWARD_TILES = {
    "dq": {False: ((64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)), True: ((64, 32, 8, 3),)},
    "dkdv": {False: ((32, 64, 4, 3), (32, 128, 8, 1)), True: ((32, 64, 8, 3),)},
}


@functools.cache  # asked at every launch
def _backward_options(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple:
    """The options of backward kernel `kernel` ("dq" or "dkdv") that autotune picks from, as
    ((constexpr pairs), num_warps, num_stages): the fixed launch config in one head block first,
    then the larger tiles, in each cover of the head dim for the dQ kernel (`_covers`; the dK/dV
    kernel keeps one block: in two, its eight tiles along the head dim spill on sm_90). fp32
    keeps its one small tile."""
    cfg = _launch_config(head_dim, dtype)
    fixed = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
    covers = (_covers(head_dim, dtype) if kernel == "dq"
              else ({"BLOCK_D": _head_block(head_dim)},))  # (that kernel has no BLOCK_E)
    options = []
    for cover in covers:
        wide = cover["BLOCK_D"] + cover.get("BLOCK_E", 0) > 64
        tiles = (fixed,) if dtype == torch.float32 else (fixed,) + tuple(
            t for t in _BACKWARD_TILES[kernel][wide] if t[:2] != fixed[:2])
        options += [({"BLOCK_M": m, "BLOCK_N": n, **cover}, warps, stages)
                    for m, n, warps, stages in tiles]
    return _hashable(options)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TUNING_KEY = ("N", "NK", "HEAD_DIM")  # what a kernel's autotuned choice is per


def triton_configs():
    """Every (kernel, configuration) the launchers can pick (every option of each kernel, for
    every head dim), for onestep_kernels.aot."""
    found = {}
    for dtype, name in _TRITON_DTYPES.items():
        ieee = dtype == torch.float32
        top = MAX_HEAD_DIM_FP32 if dtype == torch.float32 else MAX_HEAD_DIM
        for head_dim in range(MIN_HEAD_DIM, top + 1):
            for kname, kernel, options in (
                    ("fwd", _attention_fwd_kernel, _forward_tiles(head_dim, dtype)),
                    ("bwd_dq", _attention_bwd_dq_kernel, _backward_options("dq", head_dim, dtype)),
                    ("bwd_dkdv", _attention_bwd_dkdv_kernel,
                     _backward_options("dkdv", head_dim, dtype))):
                for constexprs, warps, stages in options:
                    label = ",".join(f"{k}={v}" for k, v in constexprs)
                    config_name = (f"attention_{kname}[{name},{label},warps={warps},"
                                   f"stages={stages}]")
                    found.setdefault(config_name, KernelConfig(
                        config_name, kernel, name, {**dict(constexprs), "IEEE": ieee}, warps,
                        fp32=("LSE",) if kname == "fwd" else ("LSE", "DELTA"),
                        num_stages=stages))
        block_d = 16
        while block_d <= top:
            constexprs = _delta_constexprs(block_d)
            config_name = f"attention_bwd_delta[{name},BLOCK_D={block_d}]"
            found[config_name] = KernelConfig(config_name, _attention_bwd_delta_kernel, name,
                                              constexprs, 4, fp32=("DELTA",))
            block_d *= 2
    return list(found.values())


def _new_output(q: Tensor, backend: str) -> Tensor:
    """An uninitialised (B, H, N, Dh) output in the backend's layout: the cpu kernel writes it
    laid out as (B, N, H, Dh), so that merging the heads afterwards is a free view."""
    B, H, N, Dh = q.shape
    if backend == "cpu":
        return q.new_empty((B, N, H, Dh)).transpose(1, 2)
    return q.new_empty((B, H, N, Dh))


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _triton_fwd(q, k, v, out, lse, scale):
    B, H, N, Dh = q.shape
    NK = k.shape[2]
    kernel, options = tuning.select_variants(_attention_fwd_kernel, _forward_tiles(Dh, q.dtype),
                                             _TUNING_KEY)

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]), B * H)

    kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), H, N, NK, Dh, scale,
        IEEE=q.dtype == torch.float32, **options)


def _triton_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale):
    B, H, N, Dh = q.shape
    NK = k.shape[2]
    dout = dout.contiguous()
    delta = q.new_empty((B, H, N), dtype=torch.float32)  # rowsum(dO * O)
    constexprs = _delta_constexprs(_head_block(Dh))
    _attention_bwd_delta_kernel[(cdiv(B * H * N, constexprs["BLOCK_R"]),)](
        out, dout, delta, B * H * N, Dh, **constexprs, num_warps=4)
    ieee = q.dtype == torch.float32
    strides = (*_strides(q), *_strides(k), *_strides(v))
    kernel, options = tuning.select_variants(
        _attention_bwd_dkdv_kernel, _backward_options("dkdv", Dh, q.dtype), _TUNING_KEY)
    kernel[lambda meta: (cdiv(NK, meta["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, *strides, H, N, NK, Dh, scale, IEEE=ieee, **options)
    kernel, options = tuning.select_variants(
        _attention_bwd_dq_kernel, _backward_options("dq", Dh, q.dtype), _TUNING_KEY)
    kernel[lambda meta: (cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *strides, H, N, NK, Dh, scale, IEEE=ieee, **options)


# ---------------------------------------------------------------------------------------------
# CPU C++ launchers (csrc/cpu/attention.cpp)
# ---------------------------------------------------------------------------------------------


def _cpu_fwd(q, k, v, out, lse, scale):
    B, H, N, Dh = q.shape
    (q_sb, q_sh, q_sn, _), (k_sb, k_sh, k_sn, _) = q.stride(), k.stride()
    (v_sb, v_sh, v_sn, _), (o_sb, o_sh, o_sn, _) = v.stride(), out.stride()
    native.run_cpu("attention_fwd", native.params_type("AttentionFwdParams")(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        B=B, H=H, N=N, NK=k.shape[2], D=Dh, q_sb=q_sb, q_sh=q_sh, q_sn=q_sn, k_sb=k_sb,
        k_sh=k_sh, k_sn=k_sn, v_sb=v_sb, v_sh=v_sh, v_sn=v_sn, out_sb=o_sb, out_sh=o_sh,
        out_sn=o_sn, scale=scale, dtype=native.dtype_code(q)))


def _cpu_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale):
    B, H, N, Dh = q.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    (q_sb, q_sh, q_sn, _), (k_sb, k_sh, k_sn, _) = q.stride(), k.stride()
    (v_sb, v_sh, v_sn, _), (o_sb, o_sh, o_sn, _) = v.stride(), out.stride()
    d_sb, d_sh, d_sn, _ = dout.stride()
    native.run_cpu("attention_bwd", native.params_type("AttentionBwdParams")(
        dout=dout.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
        out=out.data_ptr(), lse=lse.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(),
        dv=dv.data_ptr(), B=B, H=H, N=N, NK=k.shape[2], D=Dh, q_sb=q_sb, q_sh=q_sh, q_sn=q_sn,
        k_sb=k_sb, k_sh=k_sh, k_sn=k_sn, v_sb=v_sb, v_sh=v_sh, v_sn=v_sn, out_sb=o_sb,
        out_sh=o_sh, out_sn=o_sn, dout_sb=d_sb, dout_sh=d_sh, dout_sn=d_sn, scale=scale,
        dtype=native.dtype_code(q)))


def _sdpa(q, k, v, scale):
    if scale == q.shape[-1] ** -0.5:  # SDPA's own default (passing it costs ~0.5 us more)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------------
# The spec and the backends (see onestep_kernels.op_spec and onestep_kernels.dispatch); the
# width they are judged by is the head dim
# ---------------------------------------------------------------------------------------------


def _allocate(backend, keep, q, k, v, scale):
    """out in the backend's layout, and the base-2 log-sum-exp of each query's scores (fp32;
    every kernel writes it)."""
    B, H, N, _ = q.shape
    return _new_output(q, backend), q.new_empty((B, H, N), dtype=torch.float32)


def _allocate_grads(q, k, v, out, lse, scale):
    """Contiguous dq, dk, dv."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _example(sizes, device, dtype, generator):
    """DiT's self-attention: (B, H, N, D / H) heads."""
    q, k, v = (torch.randn(sizes.B, sizes.H, sizes.N, sizes.D // sizes.H, generator=generator,
                           device=device).to(dtype) for _ in range(3))
    return (q, k, v), {}


SPEC = OpSpec(
    "attention", inputs=("q", "k", "v"), params=(("scale", float),), outputs=("out", "lse"),
    allocate=_allocate, saved=("q", "k", "v", "out", "lse"), grads=("dq", "dk", "dv"),
    allocate_grads=_allocate_grads, input_grads=lambda dq, dk, dv: (dq, dk, dv),
    empty_if=("q", "k"), grads_contiguous=False, autocast=checks.LOWER, example=_example)

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            min_width=MIN_HEAD_DIM, max_width=MAX_HEAD_DIM,
            max_width_by_dtype=((torch.float32, MAX_HEAD_DIM_FP32),),
            summary="flash attention (online softmax), fp32 in IEEE products"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="blocked FMA products on packed fp32 panels"),
    Backend("sdpa", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES, expression=_sdpa,
            summary="PyTorch's scaled_dot_product_attention (cuDNN / flash on GPUs)"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, summary="the formula, scores materialised"),
], default_order={"cpu": ("sdpa", "cpu", "reference"), "sm_90": ("sdpa", "triton", "reference")},
    torch_alias="sdpa", width_name="head dim", triton_configs=triton_configs)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@OP.public_entry
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
              backend: str | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the token dimension, non-causal; see the module docstring.

    Args:
        q: (B, H, N, Dh); k, v: (B, H, Nk, Dh); float32/float16/bfloat16/float64 on one
            device, last dimension contiguous. Mixed dtypes are promoted to a common one;
            under autocast the op follows SDPA (it runs in the autocast dtype).
        scale: multiplies the scores; default 1 / sqrt(Dh).
        backend: one of the op's backends, or None for the fastest that can take the call.
    """
    checks.tensor("q", q, (4,))
    checks.tensor("k", k, (4,))
    checks.tensor("v", v, (4,))
    B, H, N, Dh = q.shape
    k_shape = k.shape  # (each .shape makes a new torch.Size)
    if k_shape[0] != B or k_shape[1] != H or k_shape[3] != Dh:
        raise ArgumentError(f"k: expected shape ({B}, {H}, Nk, {Dh}) for q of shape "
                            f"{tuple(q.shape)}, got {tuple(k_shape)}")
    if v.shape != k_shape:
        raise ArgumentError(f"v: expected the shape of k {tuple(k_shape)}, got "
                            f"{tuple(v.shape)}")
    if Dh == 0:
        raise ArgumentError(f"q: the head dimension must be positive, got shape "
                            f"{tuple(q.shape)}")
    scale = Dh ** -0.5 if scale is None else checks.positive_float("scale", scale)
    dtype = q.dtype
    if not (k.dtype is v.dtype is dtype) or checks.any_autocast():
        dtype = checks.compute_dtype(SPEC.autocast, (q, k, v))
        q, k, v = (checks.cast(t, dtype) for t in (q, k, v))
    grad = needs_grad(q, k, v)
    return OP.apply(OP.resolve(backend, q.device, dtype, Dh, grad), q, k, v, scale, grad=grad)
