"""The record of one Triton kernel configuration that a launcher can pick, for the compile
check in onestep_kernels.aot; each op's `triton_configs()` yields them."""

from __future__ import annotations

import dataclasses
from typing import Any

# The kernels' naming convention, from which signatures are derived: upper-case parameters
# are pointers except these sizes; lower-case ones are int32 strides except these floats.
SIZE_NAMES = ("N", "D", "H", "NK", "HEAD_DIM", "R", "F", "ROWS", "TOKENS", "KSIZE", "COLS")
FLOAT_SCALARS = ("eps", "scale")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One configuration a launcher can pick. `dtype` ("fp32", "fp16", "bf16") is the element
    type of the data pointers; `fp32` names the pointers that are fp32 whatever it is
    (statistics, partial sums), `int64` those that are int64 (labels, indices)."""

    name: str
    kernel: Any
    dtype: str
    constexprs: dict
    num_warps: int
    fp32: tuple[str, ...] = ()
    int64: tuple[str, ...] = ()
    num_stages: int = 3  # Triton's default on NVIDIA GPUs
    # A memory-bound kernel over rows: the scalar global accesses it may make per row besides
    # the row's own 128-bit vectors (`python -m onestep_kernels.aot --vectors` checks); None
    # for the others.
    row_scalars: int | None = None
    # ... and the accesses of one chunk-wide vector per program and chunk that it may make
    # narrow (per-sample modulation, per-program partial sums): a vector of one chunk spread
    # over all of a program's threads is one element per thread, and it moves 1/ROWS of the
    # bytes of the rows it serves.
    chunk_vectors: int = 0

    def signature(self) -> dict[str, str]:
        signature = {}
        for arg in self.kernel.arg_names:
            if arg in self.constexprs:
                signature[arg] = "constexpr"
            elif arg.isupper() and arg not in SIZE_NAMES:
                signature[arg] = ("*fp32" if arg in self.fp32 else "*i64" if arg in self.int64
                                  else f"*{self.dtype}")
            else:
                signature[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
        return signature


@dataclasses.dataclass(frozen=True)
class Launch:
    """What a memory-bound op's launcher picks at one row width: a configuration of the
    registry, and for a backward with per-sample partial sums the number of programs its grid
    has for (B, N) rows (`programs`), for the offline checks in onestep_kernels.aot."""

    config: KernelConfig
    width: int
    programs: Any = None  # (B, N) -> int, or None

    @property
    def tile_width(self) -> int:
        """The columns of a row one access covers: the chunk or block the launcher picked."""
        constexprs = self.config.constexprs
        return constexprs.get("CHUNK") or constexprs.get("BLOCK_F") or constexprs["BLOCK_D"]

    @property
    def useful_lanes(self) -> float:
        """The share of a row's lanes that hold data: width / (tiles needed x tile width)."""
        tile = self.tile_width
        return self.width / (-(-self.width // tile) * tile)
