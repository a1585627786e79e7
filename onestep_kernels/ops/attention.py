"""attention: non-causal multi-head softmax attention, softmax(q k^T * scale) v.

q, k, v are (B, H, N, Dh) (k and v may have their own token count Nk); the last dimension must
be contiguous, other strides are read as they are (so q, k, v can be views of one fused QKV
projection). Triton takes head dims 16..128, any (72 included; fp32 up to 64). Output
(B, H, N, Dh) in q's dtype.

Backends:
  triton     flash attention (online softmax, no N x N matrix in memory), forward and
             backward; fp32 inputs use IEEE products (no TF32), so fp32 results are
             fp32-accurate.
  cpu        onestep's C++ kernel (csrc/cpu/attention.cpp), forward and backward: blocked FMA
             products on packed fp32 panels, any head dim, fp32/fp16/bf16 (computed in fp32).
  sdpa       PyTorch's scaled_dot_product_attention (cuDNN / flash on GPUs).
  reference  the explicit formula below, the test oracle.
Which one runs by default on each device is onestep_kernels.preferences' table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..kernel_config import KernelConfig
from ..triton_compat import tl, triton
from .common import cdiv, eager_apply, needs_grad, next_power_of_2, run_on

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
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b: in IEEE fp32 for fp32 inputs (no TF32), else in b's dtype with fp32 accumulation."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the hardware's
    for start in range(0, NK, BLOCK_N):
        keys = start + cols
        key_ok = keys < NK
        kt = tl.load(K + b * skb + h * skh + keys[None, :] * skn + dims[:, None],
                     mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :],
                     mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p, vt, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = bh * N + rows  # O is contiguous (B, H, N, Dh)
    tl.store(O + o_rows[:, None] * HEAD_DIM + dims[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=row_ok)  # base-2 log-sum-exp


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # Program (n, bh) owns BLOCK_N keys and walks all query blocks: dV = P^T dO,
    # dK = scale * dS^T Q with dS = P * (dO V^T - delta).
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < NK
    dim_ok = dims < HEAD_DIM
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + dims[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=q_mask,
                    other=0.0)
        do = tl.load(DO + (bh * N + rows)[:, None] * HEAD_DIM + dims[None, :], mask=q_mask,
                     other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dv += _dot(tl.trans(p), do, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dk += _dot(tl.trans(ds), q, IEEE)
    out_rows = bh * NK + keys  # DK, DV are contiguous (B, H, NK, Dh)
    tl.store(DK + out_rows[:, None] * HEAD_DIM + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + out_rows[:, None] * HEAD_DIM + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NK, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # Program (m, bh) owns BLOCK_M queries: dQ = scale * dS K.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + (bh * N + rows)[:, None] * HEAD_DIM + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(0, NK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < NK
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + dims[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :], mask=kv_mask,
                    other=0.0)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _dot(ds, k, IEEE)
    tl.store(DQ + (bh * N + rows)[:, None] * HEAD_DIM + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for a head dim; smaller tiles where fp32 accumulators and IEEE products
    would otherwise spill (checked by onestep_kernels.aot)."""
    block_d = max(16, next_power_of_2(head_dim))
    if dtype == torch.float32:  # IEEE fp32 products on fp32 tiles: the most registers
        block, warps = 16, (8 if block_d >= 64 else 4)
    else:
        block, warps = (32 if block_d >= 64 else 64), 4
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "num_warps": warps}


def _forward_tiles(head_dim: int, dtype: torch.dtype) -> tuple[tuple[dict, int, int], ...]:
    """The forward's (BLOCK_M, BLOCK_N) tiles, warps and pipeline stages that autotune picks
    from on a GPU, keyed on the sequence lengths and head dim: the fixed launch config first
    (what the interpreter runs), then the larger tiles that flash attention's kernels use on
    sm_80/sm_90 (query blocks of 64-128 rows, key blocks of 32-64; 128 rows need 8 warps, at
    4 they spill), each free of spills for every head dim (onestep_kernels.aot). fp32 (IEEE
    products) keeps its one small tile."""
    cfg = _launch_config(head_dim, dtype)
    fixed = ({"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}, cfg["num_warps"], 3)
    if dtype == torch.float32:
        return (fixed,)
    larger = tuple(({"BLOCK_M": m, "BLOCK_N": n}, w, stages)
                   for m, n, w, stages in ((64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)))
    return (fixed,) + tuple(t for t in larger if t[0] != fixed[0] or t[1] != fixed[1])


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def triton_configs():
    """Every (kernel, configuration) the launchers can pick (the forward's every tile),
    for onestep_kernels.aot."""
    backward = (("bwd_dkdv", _attention_bwd_dkdv_kernel), ("bwd_dq", _attention_bwd_dq_kernel))
    for dtype, name in _TRITON_DTYPES.items():
        block_d = 16
        while block_d <= (MAX_HEAD_DIM_FP32 if dtype == torch.float32 else MAX_HEAD_DIM):
            ieee = dtype == torch.float32
            for tile, warps, stages in _forward_tiles(block_d, dtype):
                label = f"BLOCK_M={tile['BLOCK_M']},BLOCK_N={tile['BLOCK_N']},warps={warps}"
                yield KernelConfig(f"attention_fwd[{name},BLOCK_D={block_d},{label}]",
                                   _attention_fwd_kernel, name,
                                   {**tile, "BLOCK_D": block_d, "IEEE": ieee}, warps,
                                   fp32=("LSE",), num_stages=stages)
            cfg = _launch_config(block_d, dtype)
            constexprs = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                          "BLOCK_D": cfg["BLOCK_D"], "IEEE": ieee}
            for kname, kernel in backward:
                yield KernelConfig(f"attention_{kname}[{name},BLOCK_D={block_d}]", kernel, name,
                                   constexprs, cfg["num_warps"], fp32=("LSE", "DELTA"))
            block_d *= 2


def _new_output(q: Tensor, backend: str) -> Tensor:
    """An uninitialised (B, H, N, Dh) output in the backend's layout: the cpu kernel writes it
    laid out as (B, N, H, Dh), so that merging the heads afterwards is a free view."""
    B, H, N, Dh = q.shape
    if backend == "cpu":
        return q.new_empty((B, N, H, Dh)).transpose(1, 2)
    return q.new_empty((B, H, N, Dh))


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _triton_fwd(q, k, v, scale):
    B, H, N, Dh = q.shape
    NK = k.shape[2]
    kernel, options = tuning.select_tiles(_attention_fwd_kernel, _forward_tiles(Dh, q.dtype),
                                          ("N", "NK", "HEAD_DIM"))
    out = _new_output(q, "triton")
    lse = q.new_empty((B, H, N), dtype=torch.float32)

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]), B * H)

    kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), H, N, NK, Dh, scale,
        BLOCK_D=max(16, next_power_of_2(Dh)), IEEE=q.dtype == torch.float32, **options)
    return out, lse


def _triton_bwd(dout, q, k, v, out, lse, scale):
    B, H, N, Dh = q.shape
    NK = k.shape[2]
    cfg = _launch_config(Dh, q.dtype)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O), (B, H, N)
    dq = q.new_empty((B, H, N, Dh))
    dk = q.new_empty((B, H, NK, Dh))
    dv = q.new_empty((B, H, NK, Dh))
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                  IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"])
    strides = (*_strides(q), *_strides(k), *_strides(v))
    _attention_bwd_dkdv_kernel[(cdiv(NK, cfg["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, *strides, H, N, NK, Dh, scale, **common)
    _attention_bwd_dq_kernel[(cdiv(N, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *strides, H, N, NK, Dh, scale, **common)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# CPU C++ launchers (csrc/cpu/attention.cpp)
# ---------------------------------------------------------------------------------------------


def _cpu_fwd(q, k, v, scale):
    B, H, N, Dh = q.shape
    out = _new_output(q, "cpu")
    lse = torch.empty((B, H, N), dtype=torch.float32)
    (q_sb, q_sh, q_sn, _), (k_sb, k_sh, k_sn, _) = q.stride(), k.stride()
    (v_sb, v_sh, v_sn, _), (o_sb, o_sh, o_sn, _) = v.stride(), out.stride()
    native.run_cpu("attention_fwd", native.params_type("AttentionFwdParams")(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        B=B, H=H, N=N, NK=k.shape[2], D=Dh, q_sb=q_sb, q_sh=q_sh, q_sn=q_sn, k_sb=k_sb,
        k_sh=k_sh, k_sn=k_sn, v_sb=v_sb, v_sh=v_sh, v_sn=v_sn, out_sb=o_sb, out_sh=o_sh,
        out_sn=o_sn, scale=scale, dtype=native.dtype_code(q)))
    return out, lse


def _cpu_bwd(dout, q, k, v, out, lse, scale):
    B, H, N, Dh = q.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))  # contiguous
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
    return dq, dk, dv


def _sdpa(q, k, v, scale):
    if scale == q.shape[-1] ** -0.5:  # SDPA's own default (passing it costs ~0.5 us more)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------------
# Backends (see onestep_kernels.dispatch); the width they are judged by is the head dim
# ---------------------------------------------------------------------------------------------

OP = dispatch.Op("attention", [
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
], torch_alias="sdpa", width_name="head dim")


# ---------------------------------------------------------------------------------------------
# The inner layer (no validation)
# ---------------------------------------------------------------------------------------------


def _forward(backend: Backend, q, k, v, scale):
    B, H, N, Dh = q.shape
    if B * H * N == 0 or k.shape[2] == 0:
        return (_new_output(q, backend.name).zero_(),
                torch.zeros((B, H, N), dtype=torch.float32, device=q.device))
    return run_on(q, backend.forward, q, k, v, scale)


def _backward(backend: Backend, dout, q, k, v, out, lse, scale):
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    return run_on(q, OP.backward_launcher(backend, q.device), dout, q, k, v, out, lse, scale)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, backend):
        out, lse = _forward(backend, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_backward(ctx.backend, dout, q, k, v, out, lse, ctx.scale), None, None)


_apply_with_grad = eager_apply(_Attention, tensors=3)


def apply(backend: Backend, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention on a resolved backend, for validated arguments (one dtype and device, last
    dimensions contiguous)."""
    if backend.is_expression:
        return backend.expression(q, k, v, scale)
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, scale, backend.name)[0]
    if needs_grad(q, k, v):
        return _apply_with_grad(q, k, v, scale, backend)
    return _forward(backend, q, k, v, scale)[0]


# ---------------------------------------------------------------------------------------------
# torch.library registration (the kernels; what torch.compile traces)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out, lse); lse is the fp32 base-2 log-sum-exp of each query's scores."""
    return _forward(OP[backend], q, k, v, scale)


@attention_fwd.register_fake
def _(q, k, v, scale, backend):
    B, H, N, Dh = q.shape
    return _new_output(q, backend), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("onestep::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns contiguous (dq, dk, dv)."""
    return _backward(OP[backend], dout, q, k, v, out, lse, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.backend = backend


def _backward_op(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward_op, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
              backend: str | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the token dimension, non-causal; see the module docstring.

    Args:
        q: (B, H, N, Dh); k, v: (B, H, Nk, Dh); float32/float16/bfloat16/float64 on one
            device. Mixed dtypes are promoted to a common one; under autocast the op follows
            SDPA (it runs in the autocast dtype).
        scale: multiplies the scores; default 1 / sqrt(Dh).
        backend: one of the op's backends, or None for the fastest that can take the call.
    """
    checks.tensor("q", q, (4,))
    checks.tensor("k", k, (4,))
    checks.tensor("v", v, (4,))
    checks.same_device("k", k, q, "q")
    checks.same_device("v", v, q, "q")
    B, H, N, Dh = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dh:
        raise ValueError(f"k: expected shape ({B}, {H}, Nk, {Dh}) for q of shape "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Dh == 0:
        raise ValueError(f"q: the head dimension must be positive, got shape {tuple(q.shape)}")
    scale = Dh ** -0.5 if scale is None else checks.positive_float("scale", scale)
    dtype = checks.compute_dtype(checks.LOWER, (q, k, v))
    if not (q.dtype is k.dtype is v.dtype is dtype):
        q, k, v = (checks.cast(t, dtype) for t in (q, k, v))
    return apply(OP.resolve(backend, q.device, dtype, Dh, needs_grad(q, k, v)), q, k, v, scale)
