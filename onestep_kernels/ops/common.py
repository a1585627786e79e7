"""Plumbing every op file shares: launching on a tensor's device, stride helpers, the test
for whether a call records gradients, and the eager entry into an op's autograd.Function."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# The current CUDA device without torch.cuda.current_device()'s lazy-init check (a CUDA tensor
# in hand means CUDA is initialised); CPU-only builds of torch lack the raw call.
_current_cuda_device = getattr(torch._C, "_cuda_getDevice", None)


def run_on(t: Tensor, launcher: Callable, *args):
    """launcher(*args) with t's GPU current (Triton and the CUDA library launch on the
    current device), whatever device is current; CPU tensors call it directly (a `with`
    block costs ~0.5 us of a ~10 us op call)."""
    if t.is_cuda and t.get_device() != _current_cuda_device():
        with torch.cuda.device(t.device):
            return launcher(*args)
    return launcher(*args)


# Host-side sizes of launch grids and blocks. (Triton 3.9's triton.cdiv and
# triton.next_power_of_2 are ConstexprFunction objects: 2.3 us per call from Python.)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def add_up_partials(partials: Tensor, dim: int, out: Tensor, in_graph: bool = False) -> None:
    """out = partials.sum(dim), the fp32 partial sums of a backward's programs added in fp32
    and rounded once to out's dtype. Where out is fp32 (the LayerNorm ops' dtype under CUDA
    autocast) an eager call writes the sum straight into out: one op and no temporary. A
    lower-precision out= would round every partial before adding (torch.sum reduces in out's
    dtype), so others sum then copy; so does a traced call (`in_graph`, a triton_op body,
    kept as it was)."""
    if out.dtype is torch.float32 and not in_graph:
        torch.sum(partials, dim=dim, out=out)
    else:
        out.copy_(partials.sum(dim=dim))


def _bn(strides: tuple[int, ...]) -> tuple[int, int]:
    return (strides[0], 0) if len(strides) == 2 else strides[:2]


def bn_strides(t: Tensor) -> tuple[int, int]:
    """Element strides of a (B, N, D) tensor's (B, N) dimensions; a (B, D) modulation tensor
    broadcasts over N (stride 0)."""
    return _bn(t.stride())


def modulation_strides(gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[int, ...]:
    """bn_strides of three modulation tensors, flattened; chunks of one adaLN output (the usual
    call) share their strides, read and converted once then (~0.2 us less)."""
    strides = gate.stride()
    if shift.stride() == strides == scale.stride():
        return _bn(strides) * 3
    return (*_bn(strides), *bn_strides(shift), *bn_strides(scale))


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors records gradients."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_functorch_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def eager_apply(function: type[torch.autograd.Function], tensors: int) -> Callable:
    """`function.apply` for calls whose first `tensors` arguments are tensors, less the Python
    wrapper's cost (about 2 us of a LayerNorm op's 21 with autograd, dev VM): the C++ apply
    after the wrapper's own two steps, done cheaply. Functorch transforms get the wrapper,
    which handles them. Dead functorch wrappers (tensors that escaped a transform), which the
    wrapper unwraps before every call (~0.2 us a tensor), are unwrapped here only when the
    call fails on one: the launchers read data pointers, which a dead wrapper has not. The
    wrapper's third step, binding default arguments, only serves Functions that define
    setup_context, which these do not."""
    apply = super(torch.autograd.Function, function).apply  # the C++ _FunctionBase.apply
    if torch.autograd.function._is_setup_context_defined(function.setup_context):
        raise TypeError(f"{function.__name__} defines setup_context: use its apply")

    def call(*args):
        if _functorch_active():
            return function.apply(*args)
        try:
            return apply(*args)
        except RuntimeError:
            unwrapped = [_unwrap_if_dead(t) for t in args[:tensors]]
            if all(u is t for u, t in zip(unwrapped, args)):
                raise
        return apply(*unwrapped, *args[tensors:])

    return call
