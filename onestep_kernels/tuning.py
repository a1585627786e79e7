"""Launch settings of the memory-bound Triton kernels, tuned on the user's GPU.

A memory-bound kernel reaches the copy rate when every thread moves whole 16-byte vectors
(128-bit loads and stores) and there are enough threads to cover the row; a row kept in
registers also bounds the elements per thread (past it the backward spills). `warps_options`
lists the warp counts that satisfy both for a block of a row; on a GPU `select` wraps the
kernel in `triton.autotune` over them, keyed on the row width (and, by Triton, the dtypes), so
each width is timed once on the GPU it runs on. Under TRITON_INTERPRET=1 autotune cannot run
(it needs a driver), and ONESTEP_AUTOTUNE=0 turns it off: then the first option is launched.
Every option is in the compile-check registry (`triton_configs()` of each op,
`python -m onestep_kernels.aot`), and
`python -m onestep_kernels.aot --vectors` reads the sm_90 PTX of each at DiT widths for
128-bit accesses. `select_variants` does the same over options that also set constexprs (the
LayerNorm backwards' PREFETCH, attention's tiles).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from .dispatch import triton_interpret
from .triton_compat import triton

WARPS = (32, 16, 8, 4, 2, 1)
# A row kept in registers: one warp per row spilled at 16 elements per thread, and 16 warps
# cap a thread at 128 registers, which spilled at BLOCK_D=4096 (onestep_kernels.aot).
ROW_WARPS = (8, 4, 2)
VECTOR_BYTES = 16
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@functools.cache  # asked at every launch; a pure function of a few ints
def warps_options(block: int, element_bytes: int, max_per_thread: int,
                  candidates: tuple[int, ...] = WARPS) -> tuple[int, ...]:
    """Warp counts among `candidates` for a program over `block` elements, most warps first:
    each thread holds at least one 16-byte vector and at most `max_per_thread` elements. Where
    no count gives a whole vector (small blocks), the one with the most elements per thread."""
    vector = VECTOR_BYTES // element_bytes
    within = [w for w in candidates if block // (32 * w) <= max_per_thread] or [max(candidates)]
    whole = tuple(w for w in within if block // (32 * w) >= vector)
    return whole or (min(within),)


AUTOTUNE_ENV_VAR = "ONESTEP_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether launches autotune: not under TRITON_INTERPRET=1 (autotune needs a driver), and
    not with ONESTEP_AUTOTUNE=0 (the GPU test run: each new shape would compile and time every
    option; the options' correctness has its own test, tests/test_tuning.py)."""
    return not triton_interpret() and os.environ.get(AUTOTUNE_ENV_VAR, "1") != "0"


# What `select` and `select_variants` chose, per (kernel, options, key): decided at the first
# launch (the environment is read then), one dictionary look-up afterwards.
_SELECTED: dict[tuple, tuple[Any, dict]] = {}


def select(kernel, options: tuple[int, ...], key: tuple[str, ...]) -> tuple[Any, dict]:
    """(what to launch, extra launch keywords): the kernel with the first option's warps where
    autotune is off or there is one option; else an autotuner over `options` keyed on the
    kernel arguments named in `key` (one per kernel, options and key, built once)."""
    cache_key = (kernel, options, key)
    chosen = _SELECTED.get(cache_key)
    if chosen is None:
        if len(options) == 1 or not autotune_enabled():
            chosen = kernel, {"num_warps": options[0]}
        else:
            configs = [triton.Config({}, num_warps=w) for w in options]
            chosen = triton.autotune(configs=configs, key=list(key))(kernel), {}
        _SELECTED[cache_key] = chosen
    return chosen


def _settings(warps: int, stages: int | None = None) -> dict:
    return {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}


def select_variants(kernel, options: tuple[tuple, ...], key: tuple[str, ...]) -> tuple[Any, dict]:
    """Like `select`, over options that also set constexprs: (((name, value), ...), warps) or
    (((name, value), ...), warps, stages) tuples (hashable, so that the choice is one dictionary
    look-up per launch: the LayerNorm backwards' PREFETCH, attention's tiles). The first
    option's settings as launch keywords where autotune is off, else an autotuner (the launch
    then passes none of them, and a grid that depends on them is a function of the chosen
    ones)."""
    cache_key = (kernel, options, key)
    chosen = _SELECTED.get(cache_key)
    if chosen is None:
        if len(options) == 1 or not autotune_enabled():
            constexprs, *settings = options[0]
            chosen = kernel, {**dict(constexprs), **_settings(*settings)}
        else:
            configs = [triton.Config(dict(c), **_settings(*s)) for c, *s in options]
            chosen = triton.autotune(configs=configs, key=list(key))(kernel), {}
        _SELECTED[cache_key] = chosen
    return chosen
