"""Every private PyTorch (and CPython) entry point onestep uses, in one place, each with the
public path it falls back to when a release no longer has it.

The private ones save host time on the hot path (an eager op call is a few microseconds of
Python; see README "Host time per call"), and nothing else depends on them: where one is
missing, the fallback computes the same thing more slowly. `PRIVATE` names what was found, so
a test can say which path this torch takes (tests/test_torch_compat.py runs both paths).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_C = torch._C
_functorch = getattr(_C, "_functorch", None)

# name -> whether this torch (or Python) has it
PRIVATE: dict[str, bool] = {}


def _private(name: str, value):
    PRIVATE[name] = value is not None
    return value


# ---- the current CUDA device ----------------------------------------------------------------

# torch.cuda.current_device() runs a lazy-initialisation check first; a CUDA tensor in hand
# means CUDA is initialised, so the raw call answers the same question for less.
_cuda_get_device = _private("torch._C._cuda_getDevice", getattr(_C, "_cuda_getDevice", None))


def current_cuda_device() -> int:
    if _cuda_get_device is not None:
        return _cuda_get_device()
    return torch.cuda.current_device()


# ---- whether any autocast is on --------------------------------------------------------------

_any_autocast = _private("torch._C._is_any_autocast_enabled",
                         getattr(_C, "_is_any_autocast_enabled", None))


def _any_autocast_public() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


# One call that says whether an entry point must ask about its device's autocast at all.
any_autocast: Callable[[], bool] = _any_autocast or _any_autocast_public


# ---- an environment variable -----------------------------------------------------------------

# os.environ.get encodes the key at every call (~1 us); CPython's mapping keeps a raw dict of
# encoded keys that answers in a tenth of that.
PRIVATE["os.environ._data"] = isinstance(getattr(os.environ, "_data", None), dict)


def environment_lookup(name: str, environ=os.environ) -> tuple[object, object, Callable]:
    """(mapping, key, decode): `mapping.get(key)` is the variable's value as stored (cheap: a
    cache key on the hot path), `decode(value)` its str (None if unset)."""
    raw = getattr(environ, "_data", None)
    if isinstance(raw, dict):
        return raw, environ.encodekey(name), (
            lambda value: value if value is None or isinstance(value, str)
            else environ.decodevalue(value))
    return environ, name, lambda value: value


# ---- an autograd.Function's apply, less the Python wrapper's cost -----------------------------

_function_base_apply = _private(
    "torch._C._FunctionBase.apply",
    getattr(getattr(_C, "_FunctionBase", None), "apply", None))
_setup_context_defined = getattr(torch.autograd.function, "_is_setup_context_defined", None)
_functorch_active = _private("torch._C._are_functorch_transforms_active",
                             getattr(_C, "_are_functorch_transforms_active", None))
_unwrap_if_dead = _private("torch._C._functorch.unwrap_if_dead",
                           getattr(_functorch, "unwrap_if_dead", None))


def function_apply(function: type[torch.autograd.Function], tensors: int) -> Callable:
    """`function.apply` for calls whose first `tensors` arguments are tensors, less the Python
    wrapper's cost (about 2 us of a LayerNorm op's 21 with autograd, dev VM): the C++ apply
    after the wrapper's own two steps, done cheaply. Functorch transforms get the wrapper,
    which handles them. Dead functorch wrappers (tensors that escaped a transform), which the
    wrapper unwraps before every call (~0.2 us a tensor), are unwrapped here only when the
    call fails on one: the launchers read data pointers, which a dead wrapper has not. The
    wrapper's third step, binding default arguments, only serves Functions that define
    setup_context, which these do not. Where this torch lacks any of the pieces: the public
    `function.apply`."""
    if _setup_context_defined is not None and _setup_context_defined(function.setup_context):
        raise TypeError(f"{function.__name__} defines setup_context: use its apply")
    if None in (_function_base_apply, _setup_context_defined, _functorch_active,
                _unwrap_if_dead):
        return function.apply
    apply = super(torch.autograd.Function, function).apply  # the C++ _FunctionBase.apply

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


# ---- nn.Module internals ----------------------------------------------------------------------

_module = nn.modules.module  # holds the global hook registries
_MODULE_INTERNALS = all(hasattr(_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks")) and all(
    hasattr(nn.Linear(1, 1), name) for name in (
        "_modules", "_parameters", "_forward_hooks", "_forward_pre_hooks"))
PRIVATE["nn.Module's _modules, _parameters and hook dicts"] = _MODULE_INTERNALS


def child(module: nn.Module, name: str):
    """module.<name> for a registered submodule, read from `_modules` as nn.Module's own
    __getattr__ would (~1 us less a look-up: the DiT block's host time is a few dozen of them);
    anything else through getattr. Read at every call, never cached, so that a submodule
    replaced after construction (a LoRA wrapper) is the one called."""
    if _MODULE_INTERNALS:
        found = module._modules.get(name)
        if found is not None:
            return found
    return getattr(module, name)


def bare_linear(module: nn.Module) -> bool:
    """A bare nn.Linear that nothing observes or wraps (no hooks, adapters, parametrizations,
    no `forward` replaced on the instance as accelerate's offload and diffusers' layerwise
    casting do): only then may its product be fused with what surrounds it. Where this torch's
    modules keep their hooks elsewhere, no Linear is taken as bare (the module path is always
    right)."""
    return (_MODULE_INTERNALS and type(module) is nn.Linear and not module._forward_hooks
            and not module._forward_pre_hooks and not _module._global_forward_hooks
            and not _module._global_forward_pre_hooks and "forward" not in module.__dict__)


def observed(module: nn.Module) -> bool:
    """Whether calling `module` does more than its class's forward: hooks on it (forward,
    pre-forward, backward; its own or global), or a `forward` replaced on the instance (accelerate,
    diffusers' hooks). A fused path that would skip such a module must call it instead."""
    if not _MODULE_INTERNALS:
        return True
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(module, "_backward_hooks", None)
                or getattr(module, "_backward_pre_hooks", None)
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or getattr(_module, "_global_backward_hooks", None)
                or "forward" in module.__dict__)


def linear_parameters(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a bare nn.Linear, from its parameter dict where they are registered
    there (always, unless something removed them): an attribute costs ~0.7 us more."""
    params = linear._parameters if _MODULE_INTERNALS else {}
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return linear.weight, linear.bias


# ---- cuBLASLt's bias + GELU(tanh) epilogue -----------------------------------------------------

_addmm_activation = _private("torch._addmm_activation", getattr(torch, "_addmm_activation", None))


def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GELU_tanh(x @ weight^T + bias) for a 2-D x, on CUDA in one cuBLASLt call with the bias
    and GELU in its epilogue (tanh GELU there); the separate PyTorch ops without it."""
    if _addmm_activation is not None:
        return _addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
