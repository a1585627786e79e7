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

import functools
import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..kernel_config import KernelConfig
from ..triton_compat import tl, triton
from .common import add_up_partials, cdiv, eager_apply, needs_grad, next_power_of_2, run_on

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


@functools.cache  # asked at every launch
def _block(F: int) -> int:
    return min(MAX_BLOCK_F, max(16, next_power_of_2(F)))


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


# The launchers take contiguous tensors of any rank as (R, F) row-major matrices: R rows of
# F = the last dimension (no reshape, whose view costs host time and, with autograd, a node).


def _rows(x: Tensor) -> tuple[int, int]:
    F = x.shape[-1]
    return x.numel() // F, F


def _triton_fwd(x, bias, y):
    R, F = _rows(x)
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_fwd_kernel,
                                    _warps(block_f, x.element_size()), ("F",))
    grid = (cdiv(R, ROWS_PER_PROGRAM), cdiv(F, block_f))
    kernel[grid](x, bias, y, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f, **options)


def _triton_bwd(dy, x, bias, dx, dbias):
    R, F = _rows(x)
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_bwd_kernel,
                                    _warps(block_f, x.element_size()), ("F",))
    chunks = cdiv(R, ROWS_PER_PROGRAM)
    partial = x.new_empty((chunks, F), dtype=torch.float32)
    kernel[(chunks, cdiv(F, block_f))](
        dy, x, bias, dx, partial, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f, **options)
    add_up_partials(partial, 0, dbias)


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/bias_gelu_tanh.cpp, csrc/cuda/bias_gelu_tanh.cu)
# ---------------------------------------------------------------------------------------------


def _fwd_params(x, bias, y):
    R, F = _rows(x)
    return native.positional_params("BiasGeluTanhFwdParams", "x bias y R F dtype")(
        x.data_ptr(), bias.data_ptr(), y.data_ptr(), R, F, native.dtype_code(x))


def _cpu_fwd(*args):
    native.run_cpu("bias_gelu_tanh_fwd", _fwd_params(*args))


def _cpu_bwd(dy, x, bias, dx, dbias):
    R, F = _rows(x)
    native.run_cpu("bias_gelu_tanh_bwd", native.positional_params(
        "BiasGeluTanhBwdParams", "dy x bias dx dbias R F dtype")(
            dy.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(), dbias.data_ptr(), R, F,
            native.dtype_code(x)))


def _cuda_fwd(x, *args):
    native.run_cuda("bias_gelu_tanh_fwd", _fwd_params(x, *args), x)


def _torch_bwd(dy, x, bias, dx, dbias):
    """The backward in PyTorch ops, in launcher form (the cuda backend's backward where
    Triton is missing)."""
    u = x.float() + bias.float()
    s = torch.sigmoid(2 * GELU_K * (u + GELU_C * u ** 3))
    t = s * (1 - s)
    grad = torch.where(t == 0, s, s + u * t * 2 * GELU_K * (1 + 3 * GELU_C * u * u))
    grad_x = dy.float() * grad
    dx.copy_(grad_x)
    dbias.copy_(grad_x.reshape(-1, x.shape[-1]).sum(dim=0))


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
# The inner layer, on contiguous x of any rank (no validation)
# ---------------------------------------------------------------------------------------------


def _forward(backend: Backend, x, bias):
    y = torch.empty_like(x)
    if x.numel() > 0:
        run_on(x, backend.forward, x, bias, y)
    return y


def _backward(backend: Backend, dy, x, bias):
    dx, dbias = torch.empty_like(x), torch.empty_like(bias)
    launcher = OP.backward_launcher(backend, x.device, x.dtype, x.shape[-1])
    run_on(x, launcher, dy.contiguous(), x, bias, dx, dbias)
    return dx, dbias


class _BiasGeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, backend):
        ctx.save_for_backward(x, bias)
        ctx.backend = backend
        return _forward(backend, x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        return (*_backward(ctx.backend, dy, x, bias), None)


_apply_with_grad = eager_apply(_BiasGeluTanh, tensors=2)


def apply(backend: Backend, x: Tensor, bias: Tensor, grad: bool | None = None) -> Tensor:
    """GELU_tanh(x + bias) on a resolved backend, for validated arguments (one dtype and
    device; x of any shape, made contiguous if it is not); `grad`: whether the call records
    gradients, if the caller knows."""
    if backend.is_expression:
        return backend.expression(x, bias)
    x, bias = x.contiguous(), bias.contiguous()
    if torch.compiler.is_compiling():
        return bias_gelu_tanh_fwd(x, bias, backend.name)
    if needs_grad(x, bias) if grad is None else grad:
        return _apply_with_grad(x, bias, backend)
    return _forward(backend, x, bias)


# fc1 of a DiT MLP: the bias-free product, then the op. The steps below serve linear_apply's
# autograd node and block_nodes' node that also holds the gated op before fc1.


def fc1_backend(x: Tensor, weight: Tensor) -> Backend:
    """The op's default backend for fc1's output, computed in F.linear's dtype (autocast's
    where it is on), with gradients."""
    dtype = checks.compute_dtype(checks.LOWER, (x,)) if checks.any_autocast() else x.dtype
    return OP.resolve(None, x.device, dtype, weight.shape[0], True)


def fc1_forward(backend: Backend, x: Tensor, weight: Tensor,
                bias: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """GELU_tanh(F.linear(x, weight) + bias) without recording gradients, and what its
    backward needs: (x, weight, u, bias) with x and weight in the product's dtype (F.linear's:
    autocast's casts where it is on), u the bias-free product, bias cast to u's dtype."""
    if weight.dtype is not x.dtype or checks.any_autocast():
        dtype = checks.compute_dtype(checks.LOWER, (x,))
        x, weight = checks.cast(x, dtype), checks.cast(weight, dtype)
    u = torch.nn.functional.linear(x, weight)
    bias = checks.cast(bias, u.dtype)
    return _forward(backend, u, bias), (x, weight, u, bias)


def fc1_backward(backend: Backend, dy: Tensor, saved: tuple[Tensor, ...], need_x: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(dx, dweight, dbias) from fc1_forward's `saved`, written out as autograd would run
    the product's backward (in the product's dtype: dx = du weight, dweight = du^T x)."""
    x, weight, u, bias = saved
    du, dbias = _backward(backend, dy, u, bias)
    dx = du @ weight if need_x else None
    dweight = (du.reshape(-1, du.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
               if need_weight else None)
    return dx, dweight, dbias


class _LinearBiasGeluTanh(torch.autograd.Function):
    """GELU_tanh(F.linear(x, weight) + bias) as one autograd node: PyTorch's product (cuBLAS on
    a GPU), then the op (fc1_forward, fc1_backward; autograd casts the gradients to the inputs'
    dtypes, as it does through autocast's casts). One node where the product alone records
    four (the weight's transpose, two flattening views, mm): ~3 us less host time per call
    (dev VM)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        y, saved = fc1_forward(backend, x, weight, bias)
        ctx.save_for_backward(*saved)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        # (dbias comes with du anyway)
        return (*fc1_backward(ctx.backend, dy, ctx.saved_tensors, *ctx.needs_input_grad[:2]),
                None)


_linear_apply_with_grad = eager_apply(_LinearBiasGeluTanh, tensors=3)


def linear_apply(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GELU_tanh(F.linear(x, weight) + bias) on the op's default backend, for fc1 of a DiT MLP
    (x (..., D) contiguous, weight (F, D), bias (F,); dtypes as F.linear's, under autocast
    too, bias cast to the product's). An eager call with gradients records one autograd node
    (_LinearBiasGeluTanh); otherwise the product, then `apply`."""
    if needs_grad(x, weight, bias) and not torch.compiler.is_compiling():
        impl = fc1_backend(x, weight)
        if not impl.is_expression:
            return _linear_apply_with_grad(x, weight, bias, impl)
    u = torch.nn.functional.linear(x, weight)
    bias = checks.cast(bias, u.dtype)  # as the Linear's own bias would be (autocast)
    grad = needs_grad(u, bias)
    return apply(OP.resolve(None, u.device, u.dtype, u.shape[-1], grad), u, bias, grad)


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::bias_gelu_tanh_fwd", mutates_args=())
def bias_gelu_tanh_fwd(x: Tensor, bias: Tensor, backend: str) -> Tensor:
    """x contiguous, any rank; bias (F,)."""
    return _forward(OP[backend], x, bias)


@bias_gelu_tanh_fwd.register_fake
def _(x, bias, backend):
    return torch.empty_like(x)


@torch.library.custom_op("onestep::bias_gelu_tanh_bwd", mutates_args=())
def bias_gelu_tanh_bwd(dy: Tensor, x: Tensor, bias: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    return _backward(OP[backend], dy, x, bias)


@bias_gelu_tanh_bwd.register_fake
def _(dy, x, bias, backend):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.backend = backend


def _backward_op(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_tanh_bwd(dy, x, bias, ctx.backend)
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
    grad = needs_grad(x, bias)
    return apply(OP.resolve(backend, x.device, dtype, F, grad), x, bias, grad)
