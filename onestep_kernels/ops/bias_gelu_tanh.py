"""bias_gelu_tanh: the fc1 epilogue of a DiT MLP, y = GELU_tanh(x + bias).

x is (..., F) with any leading dimensions (made contiguous), bias is (F,); same dtype and
device. Arithmetic in fp32, output in x's dtype. GELU_tanh(u) = 0.5 u (1 + tanh(z)) =
u * sigmoid(2 z) with z = sqrt(2/pi) (u + 0.044715 u^3), the form computed here (it avoids the
cancellation in 1 + tanh(z) for negative u). Gradients for x and bias; dbias is summed over
fixed chunks of rows (deterministic).

Reference, Triton kernels, native launchers, registration and entry point, in that order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native
from ..triton_compat import tl, triton
from .common import backward_for_cuda, interpreter_bf16_reason, launcher, on_device

# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def reference(x: Tensor, bias: Tensor) -> Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    u = x.to(compute) + bias.to(compute)
    return torch.nn.functional.gelu(u, approximate="tanh").to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels: program (c, j) handles rows [c * ROWS, (c + 1) * ROWS) and columns
# [j * BLOCK_F, (j + 1) * BLOCK_F)
# ---------------------------------------------------------------------------------------------

ROWS_PER_PROGRAM = 32
MAX_BLOCK_F = 1024
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


@triton.jit
def _bias_gelu_tanh_fwd_kernel(X, BIAS, Y, R, F, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    for r in range(c * ROWS, tl.minimum((c + 1) * ROWS, R)):
        u = tl.load(X + r * F + cols, mask=mask, other=0.0).to(tl.float32) + bias
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        y = u / (1.0 + tl.exp(-2.0 * z))
        tl.store(Y + r * F + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_tanh_bwd_kernel(DY, X, BIAS, DX, DBIAS_PARTIAL, R, F, ROWS: tl.constexpr,
                               BLOCK_F: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for r in range(c * ROWS, tl.minimum((c + 1) * ROWS, R)):
        u = tl.load(X + r * F + cols, mask=mask, other=0.0).to(tl.float32) + bias
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        s = 1.0 / (1.0 + tl.exp(-2.0 * z))
        t = s * (1.0 - s)
        slope = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
        grad = tl.where(t == 0.0, s, s + u * t * slope)
        dx = tl.load(DY + r * F + cols, mask=mask, other=0.0).to(tl.float32) * grad
        tl.store(DX + r * F + cols, dx.to(DX.dtype.element_ty), mask=mask)
        acc += dx
    tl.store(DBIAS_PARTIAL + c * F + cols, acc, mask=mask)


def _block_f(F: int) -> int:
    return min(MAX_BLOCK_F, max(16, triton.next_power_of_2(F)))


def _num_warps(block_f: int) -> int:
    return 4 if block_f <= 512 else 8


def _triton_launch_config(F: int) -> tuple[int, int]:
    """(BLOCK_F, num_warps) for rows of F features (any F: wide rows take several programs)."""
    block_f = _block_f(F)
    return block_f, _num_warps(block_f)


def triton_configs():
    """Every configuration the launchers can pick, for onestep_kernels.aot."""
    block = 16
    while block <= MAX_BLOCK_F:
        options = {"num_warps": _num_warps(block)}
        for dtype in ("fp32", "fp16", "bf16"):
            p = f"*{dtype}"
            constexprs = {"ROWS": ROWS_PER_PROGRAM, "BLOCK_F": block}
            yield (f"bias_gelu_tanh_fwd[{dtype},BLOCK_F={block}]", _bias_gelu_tanh_fwd_kernel,
                   {"X": p, "BIAS": p, "Y": p, "R": "i32", "F": "i32", "ROWS": "constexpr",
                    "BLOCK_F": "constexpr"}, constexprs, options)
            yield (f"bias_gelu_tanh_bwd[{dtype},BLOCK_F={block}]", _bias_gelu_tanh_bwd_kernel,
                   {"DY": p, "X": p, "BIAS": p, "DX": p, "DBIAS_PARTIAL": "*fp32", "R": "i32",
                    "F": "i32", "ROWS": "constexpr", "BLOCK_F": "constexpr"},
                   constexprs, options)
        block *= 2


def _triton_fwd(x2d, bias, y2d):
    R, F = x2d.shape
    block_f, num_warps = _triton_launch_config(F)
    grid = (triton.cdiv(R, ROWS_PER_PROGRAM), triton.cdiv(F, block_f))
    _bias_gelu_tanh_fwd_kernel[grid](x2d, bias, y2d, R, F, ROWS=ROWS_PER_PROGRAM,
                                     BLOCK_F=block_f, num_warps=num_warps)


def _triton_bwd(dy2d, x2d, bias, dx2d, dbias):
    R, F = x2d.shape
    block_f, num_warps = _triton_launch_config(F)
    chunks = triton.cdiv(R, ROWS_PER_PROGRAM)
    partial = torch.empty((chunks, F), dtype=torch.float32, device=x2d.device)
    _bias_gelu_tanh_bwd_kernel[(chunks, triton.cdiv(F, block_f))](
        dy2d, x2d, bias, dx2d, partial, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f,
        num_warps=num_warps)
    dbias.copy_(partial.sum(dim=0))


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/bias_gelu_tanh.cpp, csrc/cuda/bias_gelu_tanh.cu)
# ---------------------------------------------------------------------------------------------


def _cpu_fwd(x2d, bias, y2d):
    R, F = x2d.shape
    code = native.cpu_module.bias_gelu_tanh_fwd(native.ptr(x2d), native.ptr(bias),
                                                native.ptr(y2d), R, F, native.dtype_code(x2d),
                                                torch.get_num_threads())
    native.check_cpu_status(code, "bias_gelu_tanh forward")


def _cpu_bwd(dy2d, x2d, bias, dx2d, dbias):
    R, F = x2d.shape
    code = native.cpu_module.bias_gelu_tanh_bwd(
        native.ptr(dy2d), native.ptr(x2d), native.ptr(bias), native.ptr(dx2d), native.ptr(dbias),
        R, F, native.dtype_code(x2d), torch.get_num_threads())
    native.check_cpu_status(code, "bias_gelu_tanh backward")


def _cuda_fwd(x2d, bias, y2d):
    R, F = x2d.shape
    code = native.cuda_library().onestep_cuda_bias_gelu_tanh_fwd(
        native.ptr(x2d), native.ptr(bias), native.ptr(y2d), R, F, native.dtype_code(x2d),
        native.cuda_stream(x2d))
    native.check_cuda_status(code, "bias_gelu_tanh forward")


def _torch_bwd(dy2d, x2d, bias, dx2d, dbias):
    """Backward in PyTorch ops, for the cuda backend when Triton is missing."""
    u = x2d.float() + bias.float()
    s = torch.sigmoid(2 * GELU_K * (u + GELU_C * u ** 3))
    t = s * (1 - s)
    grad = torch.where(t == 0, s, s + u * t * 2 * GELU_K * (1 + 3 * GELU_C * u * u))
    dx = dy2d.float() * grad
    dx2d.copy_(dx)
    dbias.copy_(dx.sum(dim=0))


_FWD = {"triton": _triton_fwd, "cpu": _cpu_fwd, "cuda": _cuda_fwd}
_BWD = {"triton": _triton_bwd, "cpu": _cpu_bwd, "torch_ops": _torch_bwd}


# ---------------------------------------------------------------------------------------------
# torch.library registration (on the (R, F) view)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::bias_gelu_tanh_fwd", mutates_args=())
def bias_gelu_tanh_fwd(x2d: Tensor, bias: Tensor, backend: str) -> Tensor:
    y = torch.empty_like(x2d)
    if x2d.shape[0] > 0:
        with on_device(x2d):
            launcher(_FWD, backend)(x2d, bias, y)
    return y


@bias_gelu_tanh_fwd.register_fake
def _(x2d, bias, backend):
    return torch.empty_like(x2d)


@torch.library.custom_op("onestep::bias_gelu_tanh_bwd", mutates_args=())
def bias_gelu_tanh_bwd(dy2d: Tensor, x2d: Tensor, bias: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    dx = torch.empty_like(x2d)
    dbias = torch.empty_like(bias)
    with on_device(x2d):
        launcher(_BWD, backend)(dy2d.contiguous(), x2d, bias, dx, dbias)
    return dx, dbias


@bias_gelu_tanh_bwd.register_fake
def _(dy2d, x2d, bias, backend):
    return torch.empty_like(x2d), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x2d, bias, backend = inputs
    ctx.save_for_backward(x2d, bias)
    ctx.backend = backend


def _backward(ctx, dy):
    x2d, bias = ctx.saved_tensors
    backend = backward_for_cuda("torch_ops") if ctx.backend == "cuda" else ctx.backend
    dx, dbias = bias_gelu_tanh_bwd(dy, x2d, bias, backend)
    return dx, dbias, None


bias_gelu_tanh_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def bias_gelu_tanh(x: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """GELU_tanh(x + bias), fused; x is (..., F), bias (F,). See the module docstring."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    checks.tensor("x", x, tuple(range(1, max(x.dim(), 1) + 1)))
    checks.tensor("bias", bias, (1,))
    checks.same_dtype_device("bias", bias, x, "x")
    F = x.shape[-1]
    if F == 0:
        raise ValueError(f"x: the last dimension (F) must be positive, got shape {tuple(x.shape)}")
    if bias.shape != (F,):
        raise ValueError(f"bias: expected shape ({F},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(bias.shape)}")
    cannot = {}
    if reason := interpreter_bf16_reason(x, "x"):
        cannot["triton"] = reason
    name = dispatch.resolve(backend, x.device, cannot)
    if name == "torch":
        return reference(x, bias)
    x2d = x.reshape(-1, F).contiguous()
    return bias_gelu_tanh_fwd(x2d, bias.contiguous(), name).view(x.shape)
