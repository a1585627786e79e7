"""One spec per op, and every entry path built from it.

An op file holds its math (the reference), its kernels and launchers, its backend records
(`dispatch.Backend`) and one `OpSpec`: its arguments, what its forward writes, what its
backward reads and writes. `Op` (a `dispatch.Op`: the records and the resolver) builds from
them every way a call reaches a launcher:

  PyTorch expression     the record's expression; autograd differentiates it
  eager, no gradient     `forward`: outputs allocated, the launch check, the launcher
  eager, gradients       an autograd.Function whose forward and backward run the launchers
  torch.compile          torch.library custom ops `onestep::<op>_fwd` / `_bwd` (the backend by
                         name), their fakes (the same allocation, on fake tensors) and autograd
  torch.compile, Triton  with `OpSpec.triton_op`, on CUDA tensors: `onestep::<op>_triton` /
                         `_triton_bwd` as triton_ops, whose launchers go through wrap_triton,
                         so that inductor launches the kernels from its own code

Launcher conventions (every backend of an op alike):

  forward(*inputs, *outputs, *params[, launch=])          outputs: new tensors to write
  backward(*output_grads, *saved, *grad_buffers, *params[, launch=])

`launch` (Triton launchers only) is `triton_compat.direct` eagerly, `wrap_triton` in a
triton_op. Every forward launch goes through `Op.check`, the launch boundary: a tensor a
kernel cannot read (on the meta device, on another device than the first input, or without
the layout its spec declares) is refused there, by its argument's name, before any pointer
is taken. Every path goes through it: the public functions, the inner layer that composed ops
and layers call (`Op.apply`, `Op.forward`), blocks and integrations. (A backward reads what
its forward checked and made, and the output gradients autograd gives, made contiguous.)
The eager functions are written out per op as Python source (op_entry), so that the hot path
runs no generic argument handling.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from . import dispatch, op_entry
from .compile_cache import tag_once
from .dispatch import Backend
from .op_entry import needs_grad
from .torch_compat import current_cuda_device
from .triton_compat import triton_op, wrap_triton


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes an op's example call is built from: B samples of N tokens of width D, H heads
    (head dim D // H), MLP width F."""

    B: int
    N: int
    D: int
    H: int
    F: int


def dit_sizes(batch: int, width: int = 1152, heads: int = 16, tokens: int = 256) -> Sizes:
    """A DiT block's sizes (DiT-XL/2 by default: 256 tokens of 1152, 16 heads of 72)."""
    return Sizes(batch, tokens, width, heads, 4 * width)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What an op declares once; see the module docstring for the launcher conventions.

    name: the op's name (its torch.library ops are onestep::<name>_fwd and so on).
    inputs: the tensor arguments in order; "bias?" marks one that may be None.
    params: the other arguments in order, as (name, type) with type float, bool or int.
    outputs: the names of the tensors the forward writes: the first `returns` are the op's
        results, the rest only a backward reads (statistics).
    allocate: (backend name, keep, *inputs, *params) -> those tensors, new; None for the
        backward's own where `keep` is False. It is also the custom op's fake.
    saved: the names (among inputs and outputs) of the tensors the backward reads; empty:
        forward only.
    grads: the names of the tensors the backward writes.
    allocate_grads: (*saved, *params) -> those tensors, new (also the fake).
    input_grads: (*grads) -> each input's gradient (None for an input without one).
    empty_if: inputs of which one with no elements means no work (outputs and gradients are
        zeros, no launcher runs); they are among `saved` when there is a backward.
    contiguous: inputs that must be contiguous; the others need a unit-stride last dimension.
    grads_contiguous: whether the output gradients are made contiguous for the backward.
    autocast: the dtype rule under autocast and for mixed inputs (checks.PROMOTE, LAYER_NORM,
        LOWER), which the public function applies.
    triton_op: build the triton_ops, and trace them under torch.compile on CUDA tensors
        (set where inductor's launch of the kernels has been checked on a GPU).
    memory_bound: the op moves memory rather than computing (the GPU pass times it against
        the copy rate).
    example: (Sizes, device, dtype, generator) -> (args, kwargs) of a representative call of
        the public function (preference measurements, benchmarks, tests).
    eager: the op as a model writes it in plain PyTorch, on the inputs alone (params at their
        defaults): the benchmarks' eager and torch.compile baselines.
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[tuple[str, type], ...]
    outputs: tuple[str, ...]
    allocate: Callable
    returns: int = 1
    saved: tuple[str, ...] = ()
    grads: tuple[str, ...] = ()
    allocate_grads: Callable | None = None
    input_grads: Callable | None = None
    empty_if: tuple[str, ...] = ()
    contiguous: tuple[str, ...] = ()
    grads_contiguous: bool = True
    autocast: str = "promote"
    triton_op: bool = False
    memory_bound: bool = False
    example: Callable | None = None
    eager: Callable | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name.rstrip("?") for name in self.inputs)

    @property
    def has_backward(self) -> bool:
        return bool(self.saved)


class Op(dispatch.Op):
    """An op's backend records and resolver, with its entry paths built from its spec."""

    def __init__(self, spec: OpSpec, backends: list[Backend], *,
                 default_order: dict[str, tuple[str, ...]] | None = None,
                 torch_alias: str = "reference", width_name: str = "D",
                 triton_configs: Callable | None = None,
                 triton_launches: Callable | None = None):
        op_entry.check_names(spec)  # (before the op is registered anywhere)
        super().__init__(spec.name, backends, torch_alias=torch_alias, width_name=width_name,
                         default_order=default_order)
        self.spec = spec
        self.public: Callable | None = None  # the public function (`public_entry`)
        self.triton_configs = triton_configs  # for the compile check (onestep_kernels.aot)
        # width -> the Launches its `triton` backend picks there (memory-bound ops: aot's
        # checks of useful lanes, 128-bit accesses, spills and the backward's grid)
        self.triton_launches = triton_launches
        self.inputs = len(spec.input_names)
        self._params = len(spec.params)
        self._empty_saved = tuple(spec.saved.index(n) for n in spec.empty_if
                                  if n in spec.saved)
        # torch.library ops for backends with launchers (PyTorch expressions are traced as
        # they are)
        self.fwd_op = self.bwd_op = self.triton_fwd_op = self.triton_bwd_op = None
        if not all(b.is_expression for b in backends):
            self.fwd_op, self.bwd_op = self._custom_ops()
        if spec.triton_op and "triton" in self.backends:
            self.triton_fwd_op, self.triton_bwd_op = self._triton_ops()
        entry = op_entry.build(self)
        self.source = entry["source"]  # the eager hot path's generated source
        self._saved, self._function = entry["saved"], entry["Function"]
        self._apply_with_grad = entry.get("apply_with_grad")  # Function.apply, the C++ way
        # The hot path's generated functions themselves, as instance attributes (no method
        # wrapper per call; op_entry says what each does):
        #   check(*inputs, kernel)   the launch boundary
        #   forward(backend, *inputs, *params, keep=False, launch=None, outputs=None)
        #                            every output of `backend`'s forward launcher (`keep`: also
        #                            what a backward reads; `outputs`: buffers to write)
        #   apply(backend, *inputs, *params, grad=None)
        #                            the op on a resolved backend: the inner layer that
        #                            composed ops, layers and integrations call
        self.check, self.forward, self.apply = entry["check"], entry["forward"], entry["apply"]

    def public_entry(self, function: Callable) -> Callable:
        """Decorator: `function` is the op's public entry point (validation, then `apply`)."""
        self.public = function
        return function

    def saved_of(self, args: tuple, outputs: tuple) -> tuple:
        """The tensors the backward reads, from a forward's arguments and outputs."""
        return self._saved((*args, *outputs))

    # ---- the inner layer's backward, and the traced path -----------------------------------

    def backward(self, backend: Backend, output_grads: tuple, saved: tuple, params: tuple,
                 launch=None, buffers: tuple | None = None) -> tuple:
        """The gradient buffers that `backend`'s backward writes (`buffers`: these instead of
        new ones)."""
        if buffers is None:
            buffers = self.spec.allocate_grads(*saved, *params)
        for i in self._empty_saved:
            if saved[i].numel() == 0:
                for t in buffers:
                    t.zero_()
                return buffers
        if self.spec.grads_contiguous:
            output_grads = tuple(g.contiguous() for g in output_grads)
        first = saved[0]
        args = (*output_grads, *saved, *buffers, *params)
        if launch is not None:
            backend.backward(*args, launch=launch)
            return buffers
        launcher = self.backward_launcher(backend, first.device, first.dtype, first.shape[-1])
        if first.is_cuda and first.get_device() != current_cuda_device():
            with torch.cuda.device(first.device):
                launcher(*args)
        else:
            launcher(*args)
        return buffers

    def traced(self, backend: Backend, args: tuple):
        """The op as torch.compile traces it: the registered ops (inductor launches the Triton
        kernels of a triton_op itself)."""
        if self.triton_fwd_op is not None and backend.name == "triton" and args[0].is_cuda:
            outputs = self.triton_fwd_op(*args)
        else:
            outputs = self.fwd_op(*args, backend.name)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return outputs[0] if self.spec.returns == 1 else outputs[:self.spec.returns]

    # ---- torch.library registration -----------------------------------------------------------

    def _signatures(self, with_backend: bool) -> tuple[inspect.Signature, inspect.Signature]:
        """The forward and backward ops' signatures, from which torch.library infers their
        schemas (the backward's None without one)."""
        spec = self.spec
        params = [(name, kind) for name, kind in spec.params]
        backend = [("backend", str)] if with_backend else []
        inputs = [(name.rstrip("?"), Tensor | None if name.endswith("?") else Tensor)
                  for name in spec.inputs]
        fwd = _signature(inputs + params + backend, len(spec.outputs))
        if not spec.has_backward:
            return fwd, None
        grads = [(f"grad_{name}", Tensor) for name in spec.outputs[:spec.returns]]
        saved = [(name, Tensor) for name in spec.saved]
        return fwd, _signature(grads + saved + params + backend, len(spec.grads))

    def _split_backward_args(self, args: tuple) -> tuple[tuple, tuple, tuple]:
        """(output grads, saved, params) of a backward op's arguments (backend excluded)."""
        r, p = self.spec.returns, self._params
        return args[:r], args[r:len(args) - p], args[len(args) - p:]

    def _register_autograd(self, fwd_op, bwd_op, with_backend: bool) -> None:
        spec, n_in = self.spec, self.inputs
        nones = (None,) * (self._params + int(with_backend))

        def setup_context(ctx, inputs, output):
            args = inputs[:-1] if with_backend else inputs
            output = output if isinstance(output, tuple) else (output,)
            if len(output) > spec.returns:
                ctx.mark_non_differentiable(*output[spec.returns:])
            ctx.save_for_backward(*self.saved_of(args, output))
            ctx.params = args[n_in:]
            ctx.backend = (inputs[-1],) if with_backend else ()

        def backward(ctx, *output_grads):
            buffers = bwd_op(*output_grads[:spec.returns], *ctx.saved_tensors, *ctx.params,
                             *ctx.backend)
            buffers = buffers if isinstance(buffers, tuple) else (buffers,)
            return (*spec.input_grads(*buffers), *nones)

        fwd_op.register_autograd(backward, setup_context=setup_context)

    def _custom_ops(self):
        """onestep::<name>_fwd and _bwd: the backend's launchers by name, as torch.compile and
        opcheck see them."""
        spec = self.spec
        fwd_signature, bwd_signature = self._signatures(with_backend=True)

        def fwd(*args):
            return _as_returned(self.forward(self.backends[args[-1]], *args[:-1], keep=True))

        def fwd_fake(*args):
            tag_once()  # the first trace of an op (compile_cache says why)
            return _as_returned(spec.allocate(args[-1], True, *args[:-1]))

        fwd_op = _custom_op(f"onestep::{spec.name}_fwd", fwd, fwd_signature, fwd_fake)
        if not spec.has_backward:
            return fwd_op, None

        def bwd(*args):
            grads, saved, params = self._split_backward_args(args[:-1])
            return _as_returned(self.backward(self.backends[args[-1]], grads, saved, params))

        def bwd_fake(*args):
            tag_once()
            _, saved, params = self._split_backward_args(args[:-1])
            return _as_returned(spec.allocate_grads(*saved, *params))

        bwd_op = _custom_op(f"onestep::{spec.name}_bwd", bwd, bwd_signature, bwd_fake)
        self._register_autograd(fwd_op, bwd_op, with_backend=True)
        return fwd_op, bwd_op

    def _triton_ops(self):
        """onestep::<name>_triton and _triton_bwd: the Triton backend with its kernels behind
        wrap_triton, so that inductor sees them and launches them from its generated code."""
        spec = self.spec
        fwd_signature, bwd_signature = self._signatures(with_backend=False)
        record = self.backends["triton"]

        def fwd(*args):  # (traced with fake tensors: the first trace tags the caches)
            tag_once()
            return _as_returned(self.forward(record, *args, keep=True, launch=wrap_triton))

        fwd.__signature__ = fwd_signature
        fwd_op = triton_op(f"onestep::{spec.name}_triton", fwd, mutates_args=())
        if not spec.has_backward:
            return fwd_op, None

        def bwd(*args):
            tag_once()
            grads, saved, params = self._split_backward_args(args)
            return _as_returned(self.backward(record, grads, saved, params, launch=wrap_triton))

        bwd.__signature__ = bwd_signature
        bwd_op = triton_op(f"onestep::{spec.name}_triton_bwd", bwd, mutates_args=())
        self._register_autograd(fwd_op, bwd_op, with_backend=False)
        return fwd_op, bwd_op


# ---- helpers ------------------------------------------------------------------------------------


def _signature(arguments: list[tuple[str, type]], returns: int) -> inspect.Signature:
    """A signature of named, annotated arguments returning `returns` tensors: what
    torch.library reads a custom op's schema from (the functions themselves take *args)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    result = Tensor if returns == 1 else tuple[(Tensor,) * returns]
    return inspect.Signature([inspect.Parameter(name, kind, annotation=annotation)
                              for name, annotation in arguments], return_annotation=result)


def _as_returned(outputs: tuple):
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _custom_op(name: str, fn: Callable, signature: inspect.Signature, fake: Callable):
    fn.__signature__ = signature
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


__all__ = ["Op", "OpSpec", "Sizes", "dit_sizes", "needs_grad"]
