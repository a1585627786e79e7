"""What the Triton LayerNorm kernels share: how a row is cut into exact chunks, the launch
settings that follow from it, and the jit functions for the statistics, the modulation and the
backward's row reductions. Written once, so that a fix reaches every kernel (the CPU and CUDA
kernels share theirs in csrc/common).

Why chunks: a row kept whole in one tile is padded to a power of two, and the padding is
masked off in every access (at DiT-XL/2's D = 1152 a 2048-wide tile leaves 44% of the lanes
idle; 25% at 1536, 3072 and the SLT's 384). A program here walks its rows in chunks of
CHUNK columns that tile the width exactly or nearly (128 at every DiT-family width: 100%
useful), over a (ROWS, CHUNK) tile of several rows of one sample, so that per-sample modulation
is one CHUNK-wide load per chunk for the whole tile.

Statistics: each chunk's mean and centred sum of squares are computed in registers (two passes
over the chunk, exact for rows far from zero mean) and merged into the row's running ones by
Chan's formula (one division per chunk and row, none per element), the running mean kept
relative to the first chunk's. The alternative, a first pass for the mean and a second for the
variance around it, reads the row three times instead of twice; the merge keeps the two-pass
accuracy without the third read. The output pass reads the row again; the program has just
read it, so that read is served by the L1/L2 caches and DRAM sees each input once.
"""

from __future__ import annotations

import functools

import torch

from ..kernel_config import KernelConfig, Launch
from ..triton_compat import tl, triton
from ..tuning import ELEMENT_BYTES, ROW_WARPS, VECTOR_BYTES, warps_options
from .common import cdiv

# Chunk widths a launcher may pick, widest first. 128 tiles every DiT-family width exactly
# (384, 1152, 1536, 2432, 3072, 4096 are multiples of it): 16 lanes of 16-byte bf16 vectors,
# two rows per warp. 256 would halve the loop's iterations, but a backward tile of 16 such
# rows holds 16 elements per thread per tensor at 8 warps, and the per-token backward spilled
# there (onestep_kernels.aot).
CHUNKS = (128, 64, 32, 16)
# The least share of useful lanes a chunk must give at the widths it is picked for.
MIN_USEFUL_LANES = 0.85
# Rows per forward program (all of one sample): a tile of FWD_TILE elements (8 rows of 128;
# more rows of narrower chunks: a 2-warp tile of 8 rows of 64 spilled on sm_80). Rows per
# backward program, which is also the granularity of its per-sample partial sums: 16 keeps
# those at 1/16 of the input in fp32 and the grid at B*N/16 programs (512 at B*N = 8192: twice
# an H100's 132 SMs and more; onestep_kernels.aot checks it).
FWD_TILE = 1024
BWD_ROWS = 16
# Elements of a tile per thread at most, per tensor: 8 in the forward (16 spilled); in the
# backward, which keeps more tensors live, one 16-byte vector (the gated backward spilled at 8
# fp32 per thread on sm_90), so a backward tile takes 8 warps in 16-bit dtypes, 16 in fp32.
FWD_MAX_PER_THREAD = 8
BWD_WARPS = (16, 8, 4, 2)


def useful_share(width: int, chunk: int) -> float:
    """The share of a row's lanes that hold data when it is cut into chunks of `chunk`."""
    return width / (cdiv(width, chunk) * chunk)


@functools.cache  # asked at every launch
def chunk_for(width: int) -> int:
    """The widest chunk whose lanes are at least MIN_USEFUL_LANES useful at this width; where
    none is (narrow rows), the one with the most useful lanes."""
    for chunk in CHUNKS:
        if useful_share(width, chunk) >= MIN_USEFUL_LANES:
            return chunk
    return max(CHUNKS, key=lambda c: (useful_share(width, c), c))


def fwd_rows(chunk: int) -> int:
    return max(1, FWD_TILE // chunk)


@functools.cache
def fwd_warps(chunk: int, element_bytes: int) -> tuple[int, ...]:
    """Warp counts autotune may pick for a forward tile of fwd_rows(chunk) x chunk. Narrow
    chunks (rows narrower than 128, or widths no multiple of 128 tiles well) get 8 warps, 4
    elements per thread: at 8 per thread the per-token bf16 forward spilled 4 bytes under
    ptxas's --regAllocOptLevel=2, which Triton 3.9 passes."""
    if chunk < CHUNKS[0]:
        return (max(ROW_WARPS),)
    return warps_options(FWD_TILE, element_bytes, FWD_MAX_PER_THREAD, ROW_WARPS)


@functools.cache
def bwd_warps(chunk: int, element_bytes: int) -> tuple[int, ...]:
    """Warp counts autotune may pick for a backward tile of BWD_ROWS x chunk."""
    return warps_options(BWD_ROWS * chunk, element_bytes, VECTOR_BYTES // element_bytes,
                         BWD_WARPS)


def fwd_grid(B: int, N: int, chunk: int) -> tuple[int, int]:
    return B, cdiv(N, fwd_rows(chunk))


def bwd_grid(B: int, N: int) -> tuple[int, int]:
    return B, cdiv(N, BWD_ROWS)


def within_tile_offsets(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x, or a contiguous copy where its token stride is so large that offsets inside a tile
    of `rows` rows would pass int32 (the kernels keep those 32-bit)."""
    if rows * x.stride(1) < 2**31:
        return x
    return x.contiguous()


@functools.cache
def _placeholder(device: torch.device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def stats_or_placeholder(stats: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The forward kernels' STATS argument: the statistics buffer, or where none is kept
    (inference: KEEP_STATS=False, nothing is written) one fp32 element per device, made once,
    so that an inference call allocates nothing it does not return."""
    return _placeholder(device) if stats is None else stats


def rows_per_thread(rows: int, chunk: int, element_bytes: int, warps: int) -> int:
    """How many of a (rows, chunk) tile's rows one thread holds, in Triton's blocked layout of
    16-byte vectors along the row: a row's per-row scalars (its mean and rstd) are that many
    accesses per thread."""
    threads_per_row = min(32, max(1, chunk * element_bytes // 16))
    return max(1, rows // (32 // threads_per_row * warps))


def chunk_kernel_configs(name: str, fwd_kernel, bwd_kernel, partial_sums: tuple[str, ...],
                         chunk_vectors: tuple[int, int], chunks: tuple[int, ...] = CHUNKS):
    """Every configuration the launchers of a chunked LayerNorm op can pick (each chunk, dtype,
    warp count and flag), for onestep_kernels.aot. `partial_sums`: the backward's per-sample
    gradient outputs, fp32 partial sums unless per-token. `chunk_vectors`: the forward's and
    the backward's per-program accesses of a chunk-wide vector when per-sample (each load of
    per-sample modulation, each store of partial sums; KernelConfig.chunk_vectors)."""
    for chunk in chunks:
        for dtype, element_bytes in ELEMENT_BYTES.items():
            for per_token in (False, True):
                for warps in fwd_warps(chunk, element_bytes):
                    for keep in (False, True):
                        yield KernelConfig(  # (the statistics: two scalar stores per row)
                            f"{name}_fwd[{dtype},CHUNK={chunk},PER_TOKEN={per_token},"
                            f"KEEP_STATS={keep},warps={warps}]",
                            fwd_kernel, dtype,
                            {"ROWS": fwd_rows(chunk), "CHUNK": chunk, "PER_TOKEN": per_token,
                             "KEEP_STATS": keep},
                            warps, fp32=("STATS",), chunk_vectors=0 if per_token
                            else chunk_vectors[0], row_scalars=2 * rows_per_thread(
                                fwd_rows(chunk), chunk, element_bytes, warps))
                for warps in bwd_warps(chunk, element_bytes):
                    yield KernelConfig(  # (two scalar loads per row: its mean and rstd)
                        f"{name}_bwd[{dtype},CHUNK={chunk},PER_TOKEN={per_token},warps={warps}]",
                        bwd_kernel, dtype,
                        {"ROWS": BWD_ROWS, "CHUNK": chunk, "PER_TOKEN": per_token}, warps,
                        fp32=("STATS", *(() if per_token else partial_sums)),
                        chunk_vectors=0 if per_token else chunk_vectors[1],
                        row_scalars=2 * rows_per_thread(BWD_ROWS, chunk, element_bytes, warps))


def bwd_programs(B: int, N: int) -> int:
    grid = bwd_grid(B, N)
    return grid[0] * grid[1]


def chunk_launches(name: str, fwd_kernel, bwd_kernel, partial_sums: tuple[str, ...],
                   chunk_vectors: tuple[int, int], width: int):
    """What the launchers of a chunked LayerNorm op pick at this width (every dtype, flag and
    autotune option), as onestep_kernels.aot checks it."""
    for config in chunk_kernel_configs(name, fwd_kernel, bwd_kernel, partial_sums,
                                       chunk_vectors, (chunk_for(width),)):
        backward = config.kernel is bwd_kernel
        yield Launch(config, width, bwd_programs if backward else None)


@triton.jit
def chunk_merge(shift, mean, m2, x, mask, k, D, CHUNK: tl.constexpr):
    """The running statistics of a tile's rows after the chunk `x` (fp32, padding zeroed)
    that starts at column k: the chunk's own mean and centred sum of squares (two passes over
    the chunk), merged with the k columns before it by Chan's formula. The running mean is
    kept relative to `shift`, the first chunk's mean: it stays of the order of the rows'
    spread, so its rounding at each merge does not grow with the rows' offset (a row far from
    zero mean, merged as is over 512 chunks, lost a factor of 7 in accuracy). Returns (shift,
    mean - shift, sum of squared deviations); the rows' mean is their sum."""
    count = tl.cast(k, tl.float32)
    width = tl.minimum(D - k, CHUNK).to(tl.float32)
    chunk_mean = tl.sum(x, axis=1) / width
    centred = tl.where(mask, x - chunk_mean[:, None], 0.0)
    chunk_m2 = tl.sum(centred * centred, axis=1)
    shift = tl.where(k == 0, chunk_mean, shift)
    delta = chunk_mean - shift - mean
    weight = width / (count + width)
    return shift, mean + delta * weight, m2 + chunk_m2 + delta * delta * (count * weight)


@triton.jit
def modulate(xhat, shift, scale):
    """adaLN modulation of a normalised row: xhat * (1 + scale) + shift."""
    return xhat * (1.0 + scale) + shift


@triton.jit
def chunk_columns(k, D, CHUNK: tl.constexpr):
    """The columns of the chunk that starts at k, and which of them are inside the row."""
    cols = k + tl.arange(0, CHUNK)
    return cols, cols < D


@triton.jit
def modulation_chunk(PTR, b, n, cols, mask, col_ok, sb, sn, PER_TOKEN: tl.constexpr):
    """A chunk of shift, scale or gate as fp32 for a tile's rows: per-token a (ROWS, CHUNK)
    load; per-sample one CHUNK-wide load broadcast over the rows (all of one sample)."""
    if PER_TOKEN:
        values = tl.load(PTR + b * sb + n[:, None] * sn + cols[None, :], mask=mask, other=0.0)
    else:  # (a (1, CHUNK) load: a CHUNK-wide one got a layout of a column per thread)
        values = tl.load(PTR + b * sb + cols[None, :], mask=col_ok[None, :], other=0.0)
    return values.to(tl.float32)
