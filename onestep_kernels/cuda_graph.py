"""Replay a network's forward from CUDA graphs.

One-step sampling is one forward pass. At batch 1 a DiT-XL/2 forward is a few hundred small
kernels, and launching them from Python costs several times their GPU time; a CUDA graph
launches them all in one call. `CUDAGraphed(net)` captures one graph per (argument shapes,
dtypes, devices, non-tensor arguments) after a warm-up on a side stream (so Triton autotuning,
lazy initialisation and cuBLAS workspaces happen outside the capture), with static input
buffers that each call copies into, and replays it. Without CUDA tensors it is a plain call.

    graphed = CUDAGraphed(model.v)                  # any nn.Module or function of tensors
    x1 = flow.euler(graphed, x0, 128, y)            # one graph, replayed 128 times

Rules the wrapped forward must follow (onestep's `DiT`, `FlowDiT` and their fused blocks do,
tested by `tests/models/test_dit.py::test_forward_makes_no_host_tensor`): no host-device copy,
no host sync (`.item()`, `.cpu()`, shapes that depend on values) and no tensor built on the
CPU per call. Calls run under `torch.no_grad()`: this is for inference.

Weights are read in place, so an optimiser step between calls is seen by the next replay.
When a weight's storage moves (`.to()`, `.half()`, a `load_state_dict(assign=True)` into the
same tensors) the next call captures again; replacing Parameter objects is not seen: call
`reset()` after it.

Memory: all graphs of one `CUDAGraphed` share one memory pool, and `pool=` shares it with
other helpers (noise screening captures a teacher and a candidate model side by side). Graphs
in one pool may reuse each other's intermediate memory, which is safe because they replay one
at a time on one stream and every output is cloned before the next replay
(`clone_outputs=False` returns the static output buffers themselves, valid until the next
replay of any graph in the pool).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map_only

from .errors import ArgumentError, ArgumentTypeError


def _key(args: tuple) -> tuple:
    return tuple((a.shape, a.dtype, a.device) if isinstance(a, Tensor) else ("value", a)
                 for a in args)


def _capture(fn: Callable, static_args: list, warmup: int, pool) -> tuple[Callable, Any]:
    """Warm `fn` up on a side stream, capture one call into a CUDA graph; (replay, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = fn(*static_args)
    return graph.replay, static_out


class _Graph:
    def __init__(self, replay: Callable, static_args: list, static_out: Any, weights: tuple):
        self.replay, self.static_args, self.static_out = replay, static_args, static_out
        self.weights = weights


class CUDAGraphed(nn.Module):
    """`net` called through CUDA graphs (see the module docstring). `warmup`: eager calls
    before each capture (at least 1); `pool`: a `torch.cuda.graph_pool_handle()` or another
    helper's `.pool`; `enabled=False` makes it a plain call everywhere."""

    def __init__(self, net: Callable, *, warmup: int = 2, pool=None, clone_outputs: bool = True,
                 enabled: bool = True):
        super().__init__()
        if not callable(net):
            raise ArgumentTypeError(f"net: expected an nn.Module or a function, got "
                                    f"{type(net).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ArgumentError(f"warmup: expected an int >= 1, got {warmup!r}")
        self.net, self.warmup, self.clone_outputs, self.enabled = net, warmup, clone_outputs, enabled
        self._pool = pool
        self._graphs: dict[tuple, _Graph] = {}
        self._weights: list[Tensor] = []

    @property
    def pool(self):
        """The memory pool of this helper's graphs (created on first use)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Forget every captured graph (and its memory): the next call captures again."""
        self._graphs.clear()

    def _weight_pointers(self) -> tuple:
        return tuple(map(Tensor.data_ptr, self._weights))

    def _uses_graph(self, args: tuple) -> bool:
        tensors = [a for a in args if isinstance(a, Tensor)]
        return self.enabled and bool(tensors) and all(t.is_cuda for t in tensors)

    def forward(self, *args):
        if not self._uses_graph(args):
            return self.net(*args)
        with torch.no_grad():
            key = _key(args)
            entry = self._graphs.get(key)
            if entry is None or entry.weights != self._weight_pointers():
                entry = self._graphs[key] = self._new_graph(args)
            for static, a in zip(entry.static_args, args):
                if isinstance(a, Tensor):
                    static.copy_(a)
            entry.replay()
            if not self.clone_outputs:
                return entry.static_out
            return tree_map_only(Tensor, torch.clone, entry.static_out)

    def _new_graph(self, args: tuple) -> _Graph:
        if isinstance(self.net, nn.Module):
            self._weights = [*self.net.parameters(), *self.net.buffers()]
        static_args = [a.clone() if isinstance(a, Tensor) else a for a in args]
        replay, static_out = _capture(self.net, static_args, self.warmup, self.pool)
        if not all(isinstance(t, Tensor) for t in tree_flatten(static_out)[0]):
            raise ArgumentTypeError("net: a CUDA-graphed function must return tensors (or tuples, "
                                    "lists or dicts of tensors)")
        return _Graph(replay, static_args, static_out, self._weight_pointers())


def graph_networks(model: nn.Module, *, enabled: bool = True, pool=None) -> nn.Module:
    """Wrap each direct child network of a recipe (for example a Direct Model's `v` and `w`) in
    `CUDAGraphed`, all sharing one memory pool; returns `model`, changed in place. With
    `enabled=False` nothing changes."""
    if not enabled:
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, CUDAGraphed):
            continue
        graphed = CUDAGraphed(child, pool=pool)
        setattr(model, name, graphed)
        if pool is None and torch.cuda.is_available():
            pool = graphed.pool
    return model
