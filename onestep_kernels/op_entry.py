"""An op's eager hot path, written out from its spec as Python source and compiled once.

An eager op call is a few microseconds of host time, of which a generic path over argument
tuples (slicing, loops over the inputs, *args packing at every level) would add a third: this
module writes, for each op, the functions every eager call runs with the op's own argument
names, as dataclasses and namedtuple write theirs:

  check(x, shift, scale, kernel)        the launch boundary: one device and one stride
                                        comparison per input, the refusal (by name) out of line
  forward(backend, x, ..., eps, keep=False, launch=None, outputs=None)
                                        outputs allocated (OpSpec.allocate), the check, the
                                        launcher on the first input's device
  apply(backend, x, ..., eps, grad=None)
                                        expression, traced op, autograd.Function or forward
  Function                              the autograd.Function of the eager path with gradients

`Op.source` holds the text; tracebacks show its lines (it is registered with linecache).
"""

from __future__ import annotations

import linecache
import operator

import torch

from .errors import ArgumentError
from .torch_compat import current_cuda_device, function_apply


def needs_grad(*tensors) -> bool:
    """Whether a call on these tensors records gradients."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _conditions(spec, kernel_flag: bool) -> tuple[str, str]:
    """(device condition, layout condition) over the inputs: true when a check fails."""
    names = spec.input_names
    first = names[0]
    optional = {name.rstrip("?") for name in spec.inputs if name.endswith("?")}
    devices = [f"({n} is not None and {n}.device != device)" if n in optional
               else f"{n}.device != device" for n in names[1:]]
    if kernel_flag:
        devices.append(f"(kernel and {first}.is_meta)")
    layouts = []
    for n in names:
        if n in spec.contiguous:
            test = f"{n}.is_contiguous()"
        else:
            # (a modulation chunk or a head of a QKV projection is a strided view: its last
            # stride is the question; is_contiguous would be asked in vain)
            test = f"({n}.stride()[-1] == 1 or {n}.shape[-1] == 1)"
        layouts.append(f"({n} is None or {test})" if n in optional else test)
    return ("\n            or ".join(devices) or "False",
            "\n            and ".join(layouts))


def source(spec) -> str:
    """The hot path's source for `spec` (see the module docstring)."""
    inputs = list(spec.input_names)
    params = [name for name, _ in spec.params]
    outputs = list(spec.outputs)
    first = inputs[0]
    args = ", ".join(inputs + params)
    ins = ", ".join(inputs)
    outs = ", ".join(outputs)
    launch_args = ", ".join(inputs + outputs + params)
    device_bad, layout_ok = _conditions(spec, kernel_flag=True)
    empty = " or ".join(f"{n}.numel() == 0" for n in spec.empty_if) or "False"
    returned = outputs[0] if spec.returns == 1 else f"({', '.join(outputs[:spec.returns])})"
    lines = [
        f"def check({ins}, kernel):",
        f"    device = {first}.device",
        f"    if ({device_bad}):",
        f"        refuse_device(({ins},), kernel)",
        f"    if not ({layout_ok}):",
        f"        refuse_layout(({ins},))",
        "",
        "",
        f"def forward(backend, {args}, keep=False, launch=None, outputs=None):",
        f"    check({ins}, True)",
        "    if outputs is None:",
        f"        outputs = allocate(backend.name, keep, {args})",
        f"    {outs}, = outputs",
        f"    if {empty}:",
        "        zero(outputs)",
        "    elif launch is not None:",
        f"        backend.forward({launch_args}, launch=launch)",
        f"    elif {first}.is_cuda and {first}.get_device() != current_cuda_device():",
        f"        with torch.cuda.device({first}.device):",
        f"            backend.forward({launch_args})",
        "    else:",
        f"        backend.forward({launch_args})",
        "    return outputs",
        "",
        "",
        f"def apply(backend, {args}, grad=None):",
        "    if backend.is_expression:",
        f"        check({ins}, False)",
        f"        return backend.expression({args})",
        "    if is_compiling():",
        f"        return traced(backend, ({args},))",
    ]
    if spec.has_backward:
        lines += [
            "    if grad is None:",
            f"        grad = needs_grad({ins})",
            "    if grad:",
            f"        return apply_with_grad({args}, backend)",
        ]
    lines += [
        f"    {outs}, = forward(backend, {args})",
        f"    return {returned}",
    ]
    if spec.has_backward:
        saved = ", ".join(spec.saved)
        grads_in = ", ".join(f"grad_{n}" for n in outputs[:spec.returns])
        nones = ", ".join(["None"] * (len(params) + 1))
        lines += [
            "",
            "",
            "class Function(torch.autograd.Function):",
            "    @staticmethod",
            f"    def forward(ctx, {args}, backend):",
            f"        {outs}, = forward(backend, {args}, True)",
            f"        ctx.save_for_backward({saved})",
            "        ctx.backend = backend",
            *(f"        ctx.{p} = {p}" for p in params),
            f"        return {returned}",
            "",
            "    @staticmethod",
            f"    def backward(ctx, {grads_in}):",
            f"        buffers = op.backward(ctx.backend, ({grads_in},), ctx.saved_tensors, "
            f"({''.join(f'ctx.{p}, ' for p in params)}))",
            f"        return (*input_grads(*buffers), {nones})",
        ]
    return "\n".join(lines) + "\n"


def check_names(spec) -> tuple[str, ...]:
    """The spec's argument and output names, in order, once checked to differ from each other
    and from the hot path's own (they become its variables)."""
    every = (*spec.input_names, *(n for n, _ in spec.params), *spec.outputs)
    if len(set(every)) != len(every) or {"backend", "keep", "launch", "outputs", "grad",
                                           "kernel", "device", "ctx"} & set(every):
        raise ArgumentError(f"spec: {spec.name}'s argument and output names must differ from "
                            f"each other and from the hot path's own: {every}")
    return every


def build(op) -> dict:
    """Compile `op`'s hot path; returns its functions by name (and `source`)."""
    spec = op.spec
    every = check_names(spec)
    text = source(spec)
    filename = f"<onestep op {spec.name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    names = spec.input_names

    def refuse_device(inputs, kernel):
        first = inputs[0]
        for name, t in zip(names, inputs):
            if t is None:
                continue
            if kernel and t.is_meta:
                raise ArgumentError(
                    f"{name}: is on the meta device (no data): a kernel cannot read it (an "
                    "offloaded module's weights? move them to the device first)")
            if t.device != first.device:
                raise ArgumentError(f"{name}: is on {t.device} but {names[0]} is on "
                                    f"{first.device}")
        raise AssertionError("refuse_device: no input to refuse")

    def refuse_layout(inputs):
        for name, t in zip(names, inputs):
            if t is None or t.is_contiguous():
                continue
            if name in spec.contiguous:
                need = "be contiguous"
            elif t.stride()[-1] != 1 and t.shape[-1] > 1:
                need = "have a contiguous last dimension (stride 1)"
            else:
                continue
            raise ArgumentError(f"{name}: a kernel reads it as rows: it must {need}, got "
                                f"shape {tuple(t.shape)} with strides {t.stride()}")
        raise AssertionError("refuse_layout: no input to refuse")

    def zero(tensors):
        for t in tensors:
            if t is not None:
                t.zero_()

    namespace = {
        "torch": torch, "op": op, "allocate": spec.allocate, "input_grads": spec.input_grads,
        "refuse_device": refuse_device, "refuse_layout": refuse_layout, "zero": zero,
        "current_cuda_device": current_cuda_device, "is_compiling": torch.compiler.is_compiling,
        "needs_grad": needs_grad, "traced": op.traced,
    }
    exec(compile(text, filename, "exec"), namespace)  # noqa: S102
    functions = {name: namespace[name] for name in ("check", "forward", "apply")}
    functions["source"] = text
    functions["Function"] = function = namespace.get("Function")
    if function is not None:
        function.__name__ = function.__qualname__ = "".join(
            part.title() for part in spec.name.split("_"))
        # (read by `apply` at call time)
        namespace["apply_with_grad"] = functions["apply_with_grad"] = function_apply(
            function, len(names))
    positions = [every.index(n) for n in spec.saved]
    functions["saved"] = lambda everything: tuple(everything[i] for i in positions)
    if len(positions) > 1:
        functions["saved"] = operator.itemgetter(*positions)
    return functions
