"""bias_gelu_tanh: the fc1 epilogue of a DiT MLP, y = GELU_tanh(x + bias).

x is (..., F) with any leading dimensions (made contiguous), bias is (F,); same dtype and
device. Arithmetic in fp32, output in x's dtype. GELU_tanh(u) = 0.5 u (1 + tanh(z)) =
u * sigmoid(2 z) with z = sqrt(2/pi) (u + 0.044715 u^3), the form computed here (it avoids the
cancellation in 1 + tanh(z) for negative u). Gradients for x and bias; dbias is summed over
fixed chunks of rows (deterministic).

Reference, Triton kernels, native launchers, backend records, the inner layer, registration
and entry point, in that order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..kernel_config import KernelConfig
from ..triton_compat import tl, triton
from .common import needs_grad, on_device

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


def _block(F: int) -> int:
    return min(MAX_BLOCK_F, max(16, triton.next_power_of_2(F)))


def _warps(block_f: int, element_bytes: int) -> tuple[int, ...]:
    """Elementwise: up to 16 elements per thread, at least one 16-byte vector."""
    return tuning.warps_options(block_f, element_bytes, 16)


def triton_configs():
    """Every configuration the launchers can pick (each block, dtype and warp count autotune
    may choose), for onestep_kernels.aot."""
    block = 16
    while block <= MAX_BLOCK_F:
        for dtype in ("fp32", "fp16", "bf16"):
            constexprs = {"ROWS": ROWS_PER_PROGRAM, "BLOCK_F": block}
            for warps in _warps(block, tuning.ELEMENT_BYTES[dtype]):
                yield KernelConfig(f"bias_gelu_tanh_fwd[{dtype},BLOCK_F={block},warps={warps}]",
                                   _bias_gelu_tanh_fwd_kernel, dtype, constexprs, warps)
                yield KernelConfig(f"bias_gelu_tanh_bwd[{dtype},BLOCK_F={block},warps={warps}]",
                                   _bias_gelu_tanh_bwd_kernel, dtype, constexprs, warps,
                                   fp32=("DBIAS_PARTIAL",))
        block *= 2


def _triton_fwd(x2d, bias, y2d):
    R, F = x2d.shape
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_fwd_kernel,
                                    _warps(block_f, x2d.element_size()), ("F",))
    grid = (triton.cdiv(R, ROWS_PER_PROGRAM), triton.cdiv(F, block_f))
    kernel[grid](x2d, bias, y2d, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f, **options)


def _triton_bwd(dy2d, x2d, bias, dx2d, dbias):
    R, F = x2d.shape
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_bwd_kernel,
                                    _warps(block_f, x2d.element_size()), ("F",))
    chunks = triton.cdiv(R, ROWS_PER_PROGRAM)
    partial = x2d.new_empty((chunks, F), dtype=torch.float32)
    kernel[(chunks, triton.cdiv(F, block_f))](
        dy2d, x2d, bias, dx2d, partial, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f,
        **options)
    dbias.copy_(partial.sum(dim=0))


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/bias_gelu_tanh.cpp, csrc/cuda/bias_gelu_tanh.cu)
# ---------------------------------------------------------------------------------------------


def _fwd_params(x2d, bias, y2d):
    R, F = x2d.shape
    return native.params_type("BiasGeluTanhFwdParams")(
        x=x2d.data_ptr(), bias=bias.data_ptr(), y=y2d.data_ptr(), R=R, F=F,
        dtype=native.dtype_code(x2d))


def _cpu_fwd(*args):
    native.run_cpu("bias_gelu_tanh_fwd", _fwd_params(*args))


def _cpu_bwd(dy2d, x2d, bias, dx2d, dbias):
    R, F = x2d.shape
    native.run_cpu("bias_gelu_tanh_bwd", native.params_type("BiasGeluTanhBwdParams")(
        dy=dy2d.data_ptr(), x=x2d.data_ptr(), bias=bias.data_ptr(), dx=dx2d.data_ptr(),
        dbias=dbias.data_ptr(), R=R, F=F, dtype=native.dtype_code(x2d)))


def _cuda_fwd(x2d, *args):
    native.run_cuda("bias_gelu_tanh_fwd", _fwd_params(x2d, *args), x2d)


def _torch_bwd(dy2d, x2d, bias, dx2d, dbias):
    """The backward in PyTorch ops, in launcher form (the cuda backend's backward where
    Triton is missing)."""
    u = x2d.float() + bias.float()
    s = torch.sigmoid(2 * GELU_K * (u + GELU_C * u ** 3))
    t = s * (1 - s)
    grad = torch.where(t == 0, s, s + u * t * 2 * GELU_K * (1 + 3 * GELU_C * u * u))
    dx = dy2d.float() * grad
    dx2d.copy_(dx)
    dbias.copy_(dx.sum(dim=0))


# ---------------------------------------------------------------------------------------------
# Backends (see onestep_kernels.dispatch)
# ---------------------------------------------------------------------------------------------

OP = dispatch.Op("bias_gelu_tanh", [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            summary="rows x column blocks"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd,
            backward_from=("triton", "reference"), summary="forward only in CUDA C++"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP, vectorised exp"),
    # The backward launcher serves the cuda backend where Triton is missing.
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, backward=_torch_bwd, summary="F.gelu(x + bias)"),
], width_name="F")


# ---------------------------------------------------------------------------------------------
# The inner layer, on the (R, F) view (no validation)
# ---------------------------------------------------------------------------------------------


def _forward(backend: Backend, x2d, bias):
    y = torch.empty_like(x2d)
    if x2d.shape[0] > 0:
        with on_device(x2d):
            backend.forward(x2d, bias, y)
    return y


def _backward(backend: Backend, dy2d, x2d, bias):
    dx, dbias = torch.empty_like(x2d), torch.empty_like(bias)
    with on_device(x2d):
        OP.backward_launcher(backend, x2d.device)(dy2d.contiguous(), x2d, bias, dx, dbias)
    return dx, dbias


class _BiasGeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, backend):
        ctx.save_for_backward(x2d, bias)
        ctx.backend = backend
        return _forward(backend, x2d, bias)

    @staticmethod
    def backward(ctx, dy):
        x2d, bias = ctx.saved_tensors
        return (*_backward(ctx.backend, dy, x2d, bias), None)


def apply(backend: Backend, x: Tensor, bias: Tensor) -> Tensor:
    """GELU_tanh(x + bias) on a resolved backend, for validated arguments (one dtype and
    device; x of any shape, made contiguous if it is not)."""
    if backend.is_expression:
        return backend.expression(x, bias)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    x2d, bias = x2d.contiguous(), bias.contiguous()
    if torch.compiler.is_compiling():
        y = bias_gelu_tanh_fwd(x2d, bias, backend.name)
    elif needs_grad(x2d, bias):
        y = _BiasGeluTanh.apply(x2d, bias, backend)
    else:
        y = _forward(backend, x2d, bias)
    return y if x.dim() == 2 else y.view(x.shape)


# ---------------------------------------------------------------------------------------------
# torch.library registration (on the (R, F) view; what torch.compile traces)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::bias_gelu_tanh_fwd", mutates_args=())
def bias_gelu_tanh_fwd(x2d: Tensor, bias: Tensor, backend: str) -> Tensor:
    return _forward(OP[backend], x2d, bias)


@bias_gelu_tanh_fwd.register_fake
def _(x2d, bias, backend):
    return torch.empty_like(x2d)


@torch.library.custom_op("onestep::bias_gelu_tanh_bwd", mutates_args=())
def bias_gelu_tanh_bwd(dy2d: Tensor, x2d: Tensor, bias: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    return _backward(OP[backend], dy2d, x2d, bias)


@bias_gelu_tanh_bwd.register_fake
def _(dy2d, x2d, bias, backend):
    return torch.empty_like(x2d), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x2d, bias, backend = inputs
    ctx.save_for_backward(x2d, bias)
    ctx.backend = backend


def _backward_op(ctx, dy):
    x2d, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_tanh_bwd(dy, x2d, bias, ctx.backend)
    return dx, dbias, None


bias_gelu_tanh_fwd.register_autograd(_backward_op, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def bias_gelu_tanh(x: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """GELU_tanh(x + bias), fused; x is (..., F), bias (F,), on one device. Mixed dtypes are
    promoted to a common one, as `x + bias` does (also under autocast). See the module
    docstring."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    checks.tensor("x", x, tuple(range(1, max(x.dim(), 1) + 1)))
    checks.tensor("bias", bias, (1,))
    checks.same_device("bias", bias, x, "x")
    F = x.shape[-1]
    if F == 0:
        raise ValueError(f"x: the last dimension (F) must be positive, got shape {tuple(x.shape)}")
    if bias.shape[0] != F:
        raise ValueError(f"bias: expected shape ({F},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(bias.shape)}")
    dtype = x.dtype
    if bias.dtype is not dtype:
        dtype = torch.promote_types(dtype, bias.dtype)
        x, bias = checks.cast(x, dtype), checks.cast(bias, dtype)
    return apply(OP.resolve(backend, x.device, dtype, F, needs_grad(x, bias)), x, bias)
