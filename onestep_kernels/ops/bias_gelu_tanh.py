"""bias_gelu_tanh: the fc1 epilogue of a DiT MLP, y = GELU_tanh(x + bias).

x is (..., F) with any leading dimensions (made contiguous), bias is (F,); same dtype and
device. Arithmetic in fp32, output in x's dtype. GELU_tanh(u) = 0.5 u (1 + tanh(z)) =
u * sigmoid(2 z) with z = sqrt(2/pi) (u + 0.044715 u^3), the form computed here (it avoids the
cancellation in 1 + tanh(z) for negative u). Gradients for x and bias; dbias is summed over
fixed chunks of rows (deterministic).

Reference, Triton kernels, native launchers, the spec and backend records (from which
onestep_kernels.op_spec builds the entry paths), and the public entry point, in that order.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..errors import ArgumentError
from ..kernel_config import KernelConfig, Launch
from ..op_spec import Op, OpSpec
from ..triton_compat import direct, tl, triton
from .common import add_up_partials, cdiv, needs_grad
from .layernorm_core import MIN_USEFUL_LANES, useful_share

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


# Column blocks a launcher may pick, widest first.
BLOCKS = (1024, 512, 256, 128, 64, 32, 16)


@functools.cache  # asked at every launch
def _block(F: int) -> int:
    """The widest column block whose lanes are at least MIN_USEFUL_LANES useful at this F (a
    row is cut into blocks, the last one masked: at F = 1536, the SLT's MLP, 1024-wide blocks
    would leave 25% idle, 512-wide none); where none is (narrow rows), the most useful."""
    for block in BLOCKS:
        if useful_share(F, block) >= MIN_USEFUL_LANES:
            return block
    return max(BLOCKS, key=lambda b: (useful_share(F, b), b))


def _warps(block_f: int, element_bytes: int) -> tuple[int, ...]:
    """Elementwise: up to 16 elements per thread, at least one 16-byte vector."""
    return tuning.warps_options(block_f, element_bytes, 16)


def triton_configs(blocks: tuple[int, ...] = BLOCKS):
    """Every configuration the launchers can pick (each block, dtype and warp count autotune
    may choose), for onestep_kernels.aot."""
    for block in blocks:
        for dtype in ("fp32", "fp16", "bf16"):
            constexprs = {"ROWS": ROWS_PER_PROGRAM, "BLOCK_F": block}
            for warps in _warps(block, tuning.ELEMENT_BYTES[dtype]):
                yield KernelConfig(f"bias_gelu_tanh_fwd[{dtype},BLOCK_F={block},warps={warps}]",
                                   _bias_gelu_tanh_fwd_kernel, dtype, constexprs, warps,
                                   row_scalars=0)
                yield KernelConfig(f"bias_gelu_tanh_bwd[{dtype},BLOCK_F={block},warps={warps}]",
                                   _bias_gelu_tanh_bwd_kernel, dtype, constexprs, warps,
                                   fp32=("DBIAS_PARTIAL",), row_scalars=0)


def triton_launches(F: int):
    """What the launchers below pick at this width, for onestep_kernels.aot's checks."""
    block = _block(F)

    def programs(B: int, N: int) -> int:
        return cdiv(B * N, ROWS_PER_PROGRAM) * cdiv(F, block)

    for config in triton_configs((block,)):
        yield Launch(config, F, programs if config.kernel is _bias_gelu_tanh_bwd_kernel else None)


# The launchers take contiguous tensors of any rank as (R, F) row-major matrices: R rows of
# F = the last dimension (no reshape, whose view costs host time and, with autograd, a node).


def _rows(x: Tensor) -> tuple[int, int]:
    F = x.shape[-1]
    return x.numel() // F, F


def _triton_fwd(x, bias, y, launch=direct):
    R, F = _rows(x)
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_fwd_kernel,
                                    _warps(block_f, x.element_size()), ("F",))
    grid = (cdiv(R, ROWS_PER_PROGRAM), cdiv(F, block_f))
    launch(kernel)[grid](x, bias, y, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f, **options)


def _triton_bwd(dy, x, bias, dx, dbias, launch=direct):
    R, F = _rows(x)
    block_f = _block(F)
    kernel, options = tuning.select(_bias_gelu_tanh_bwd_kernel,
                                    _warps(block_f, x.element_size()), ("F",))
    chunks = cdiv(R, ROWS_PER_PROGRAM)
    partial = x.new_empty((chunks, F), dtype=torch.float32)
    launch(kernel)[(chunks, cdiv(F, block_f))](
        dy, x, bias, dx, partial, R, F, ROWS=ROWS_PER_PROGRAM, BLOCK_F=block_f, **options)
    add_up_partials(partial, 0, dbias, in_graph=launch is not direct)


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/bias_gelu_tanh.cpp, csrc/cuda/bias_gelu_tanh.cu)
# ---------------------------------------------------------------------------------------------


def _fwd_params(x, bias, y):
    R, F = _rows(x)
    return native.positional_params("BiasGeluTanhFwdParams", "x bias y R F dtype")(
        x.data_ptr(), bias.data_ptr(), y.data_ptr(), R, F, native.dtype_code(x))


def _cpu_fwd(*args):
    native.run_cpu("bias_gelu_tanh_fwd", _fwd_params(*args))


def _bwd_params(dy, x, bias, dx, dbias, partials=0):
    R, F = _rows(x)
    return native.positional_params(
        "BiasGeluTanhBwdParams", "dy x bias dx dbias partials R F dtype")(
            dy.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(), dbias.data_ptr(),
            partials, R, F, native.dtype_code(x))


def _cpu_bwd(*args):
    native.run_cpu("bias_gelu_tanh_bwd", _bwd_params(*args))


# Rows per block of the CUDA kernels (csrc/cuda/bias_gelu_tanh.cu's kRows): the grain of the
# backward's dbias partial sums.
CUDA_ROWS = 32


def _cuda_bwd(dy, x, bias, dx, dbias):
    R, F = _rows(x)
    workspace = x.new_empty((cdiv(R, CUDA_ROWS), F), dtype=torch.float32)
    native.run_cuda("bias_gelu_tanh_bwd", _bwd_params(
        dy, x, bias, dx, dbias, native.address(workspace)), x)


def _cuda_fwd(x, *args):
    native.run_cuda("bias_gelu_tanh_fwd", _fwd_params(x, *args), x)


# ---------------------------------------------------------------------------------------------
# The spec and the backends (see onestep_kernels.op_spec and onestep_kernels.dispatch)
# ---------------------------------------------------------------------------------------------


def _example(sizes, device, dtype, generator):
    """fc1's epilogue in a DiT MLP: (B N, F) pre-activations and the bias."""
    u = torch.randn(sizes.B * sizes.N, sizes.F, generator=generator, device=device).to(dtype)
    return (u, torch.randn(sizes.F, generator=generator, device=device).to(dtype)), {}


SPEC = OpSpec(
    "bias_gelu_tanh", inputs=("x", "bias"), params=(), outputs=("y",),
    allocate=lambda backend, keep, x, bias: (torch.empty_like(x),), saved=("x", "bias"),
    grads=("dx", "dbias"),
    allocate_grads=lambda x, bias: (torch.empty_like(x), torch.empty_like(bias)),
    input_grads=lambda dx, dbias: (dx, dbias), empty_if=("x",), contiguous=("x", "bias"),
    memory_bound=True, example=_example,
    eager=lambda x, bias: torch.nn.functional.gelu(x + bias, approximate="tanh"))

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            summary="rows x column blocks"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd, backward=_cuda_bwd,
            summary="bands of 16-byte vectors over 32 rows per block"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP, vectorised exp"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, summary="F.gelu(x + bias)"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "cuda", "reference")},
    width_name="F", triton_configs=triton_configs, triton_launches=triton_launches)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@OP.public_entry
def bias_gelu_tanh(x: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """GELU_tanh(x + bias), fused; x is (..., F), bias (F,), on one device; x is made
    contiguous (a copy only if it is not). Mixed dtypes are promoted to a common one, as
    `x + bias` does (also under autocast). See the module docstring."""
    if not isinstance(x, Tensor):
        checks.tensor("x", x, ())
    checks.tensor("x", x, tuple(range(1, max(x.dim(), 1) + 1)))
    checks.tensor("bias", bias, (1,))
    F = x.shape[-1]
    if F == 0:
        raise ArgumentError(f"x: the last dimension (F) must be positive, got shape "
                            f"{tuple(x.shape)}")
    if bias.shape[0] != F:
        raise ArgumentError(f"bias: expected shape ({F},) for x of shape {tuple(x.shape)}, "
                            f"got {tuple(bias.shape)}")
    dtype = x.dtype
    if bias.dtype is not dtype:
        dtype = torch.promote_types(dtype, bias.dtype)
        x, bias = checks.cast(x, dtype), checks.cast(bias, dtype)
    grad = needs_grad(x, bias)
    impl = OP.resolve(backend, x.device, dtype, F, grad)
    return OP.apply(impl, x.contiguous(), bias.contiguous(), grad=grad)
