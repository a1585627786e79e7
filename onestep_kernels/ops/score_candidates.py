"""score_candidates: noise screening's last step, from each candidate's token features to each
condition's best candidates, in one pass over the features.

features is (M, T, D): M = B * N candidates (condition b's N candidates are rows b*N ..
b*N + N - 1), T tokens of width D, read in their own dtype with any strides but the last
(a kept state of the depth loop is a view). Each candidate's features are mean-pooled over
the tokens (fp32), p = mean_t features[m, t], and scored by one of two heads:

  class head     score = log_softmax(weight @ p + bias)[target[m // N]]: the log-probability
                 of its condition's label. weight (C, D), bias (C,) or None, target (B,)
                 int64. A target outside [0, C) scores NaN (checking would cost a sync).
  cosine         score = <p, q> / sqrt(max(|p|^2 |q|^2, EPS^2)) with q = mean_t other[m, t]:
                 the agreement of two pooled features (other: (M, T', D), features' dtype).

Then a segmented top-k: best[b] = the k indices (0..N-1, within the condition) of condition
b's highest scores, best first; ties go to the lower index and NaN ranks below every number,
so the picks are deterministic and the same on every backend. Returns (scores (M,) float32,
best (B, k) int64). Forward only (screening is inference). The head is read in fp32 (the
public function converts weight and bias, C x D elements, once; the features, the bulk, are
read as they are).

Backends:
  triton     two launches: a program per candidate pools its rows (token blocks of the whole
             width) and applies the head (class blocks against the pooled vector with an
             online log-sum-exp, or the cosine); then a program per condition selects its k
             best in k sweeps over its scores (each pick is the best strictly below the last
             one in the (score desc, index asc) order, so nothing is marked).
  cuda       the same two kernels in CUDA C++: a block per candidate (pooled vectors in shared
             memory, a warp per class), a warp per condition.
  cpu        OpenMP over candidates, then over conditions.
  reference  the PyTorch expression: mean, linear, log_softmax, gather, a stable sort.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks, dispatch, native
from ..dispatch import Backend
from ..errors import ArgumentError, ArgumentTypeError
from ..kernel_config import KernelConfig
from ..op_spec import Op, OpSpec
from ..triton_compat import direct, tl, triton
from .common import next_power_of_2

EPS = 1e-8  # the cosine's floor on |p| |q|
MAX_D = 4096  # Triton holds the pooled vector(s) in registers
MAX_D_CUDA = 16384  # CUDA C++ holds them in shared memory
TILE = 2048  # elements of a (tokens x D) or (classes x D) tile per Triton program step
SELECT_BLOCK = 1024  # scores per sweep step of the Triton top-k


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _pooled(t: Tensor, compute: torch.dtype) -> Tensor:
    return t.to(compute).mean(dim=1)


def scores_reference(features: Tensor, other: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, target: Tensor | None, n_candidates: int) -> Tensor:
    """Each candidate's score (M,), in fp32 (fp64 if given fp64)."""
    compute = torch.promote_types(features.dtype, torch.float32)
    p = _pooled(features, compute)
    if weight is None:
        q = _pooled(other, compute)
        norms = ((p * p).sum(-1) * (q * q).sum(-1)).clamp_min(EPS * EPS)
        return (p * q).sum(-1) / norms.sqrt()
    logits = torch.nn.functional.linear(p, weight.to(compute),
                                        None if bias is None else bias.to(compute))
    labels = target.repeat_interleave(n_candidates)
    valid = (labels >= 0) & (labels < weight.shape[0])
    picked = logits.log_softmax(-1).gather(1, labels.clamp(0, weight.shape[0] - 1)[:, None])[:, 0]
    return torch.where(valid, picked, torch.full_like(picked, float("nan")))


def top_k_reference(scores: Tensor, n_candidates: int, k: int) -> Tensor:
    """Each condition's k best indices, ties to the lower index, NaN last: a stable sort."""
    ranked = torch.nan_to_num(scores, nan=float("-inf")).view(-1, n_candidates)
    return ranked.sort(dim=1, descending=True, stable=True).indices[:, :k]


def reference(features: Tensor, other: Tensor | None = None, weight: Tensor | None = None,
              bias: Tensor | None = None, target: Tensor | None = None, n_candidates: int = 1,
              k: int = 1) -> tuple[Tensor, Tensor]:
    scores = scores_reference(features, other, weight, bias, target, n_candidates)
    if scores.dtype != torch.float64:
        scores = scores.float()
    return scores, top_k_reference(scores, n_candidates, k)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pool(X, m, x_sm, x_st, n_tokens, cols, mask_d, BLOCK_T: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """The mean over candidate m's tokens, fp32, as a (BLOCK_D,) vector."""
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    base = X + m * x_sm
    for t0 in range(0, n_tokens, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows[:, None] < n_tokens) & mask_d[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * x_st + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    return tl.sum(acc, axis=0) / n_tokens


@triton.jit
def _score_candidates_kernel(FEATURES, OTHER, WEIGHT, BIAS, TARGET, SCORES, n_tokens,
                             other_tokens, D, classes, n_candidates, f_sm, f_st, o_sm, o_st,
                             HEAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    p = _pool(FEATURES, m, f_sm, f_st, n_tokens, cols, mask_d, BLOCK_T, BLOCK_D)
    if HEAD:
        label = tl.load(TARGET + m // n_candidates)
        # per-lane online log-sum-exp over the class blocks, merged at the end
        run_max = tl.zeros((BLOCK_C,), dtype=tl.float32) - float("inf")
        run_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        picked = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for c0 in range(0, classes, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C)
            mask_c = rows < classes
            w = tl.load(WEIGHT + rows[:, None].to(tl.int64) * D + cols[None, :],
                        mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            logits = tl.sum(w * p[None, :], axis=1) + tl.load(BIAS + rows, mask=mask_c, other=0.0)
            logits = tl.where(mask_c, logits, float("-inf"))
            new_max = tl.maximum(run_max, logits)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # (no -inf - -inf)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(logits - safe)
            run_max = new_max
            picked += tl.where(rows == label, logits, 0.0)
        top = tl.max(run_max, axis=0)
        total = tl.sum(run_sum * tl.exp(run_max - tl.where(top == float("-inf"), 0.0, top)),
                       axis=0)
        score = tl.sum(picked, axis=0) - (top + tl.log(total))
        score = tl.where((label >= 0) & (label < classes), score, float("nan"))
    else:
        q = _pool(OTHER, m, o_sm, o_st, other_tokens, cols, mask_d, BLOCK_T, BLOCK_D)
        norms = tl.maximum(tl.sum(p * p, axis=0) * tl.sum(q * q, axis=0), 1e-16)
        score = tl.sum(p * q, axis=0) / tl.sqrt(norms)
    tl.store(SCORES + m, score)


@triton.jit
def _top_k_kernel(SCORES, BEST, n_candidates, k, BLOCK_N: tl.constexpr):
    """Condition b's k best, best first: sweep i picks the best candidate strictly below
    sweep i-1's pick in the order (score desc, index asc), NaN read as -inf."""
    b = tl.program_id(0).to(tl.int64)
    base = SCORES + b * n_candidates
    lanes = tl.arange(0, BLOCK_N)
    last_value = tl.max(tl.zeros((BLOCK_N,), dtype=tl.float32) + float("inf"), axis=0)
    last_index = tl.min(tl.zeros((BLOCK_N,), dtype=tl.int32) - 1, axis=0)
    for i in range(k):
        best_value = tl.max(tl.zeros((BLOCK_N,), dtype=tl.float32) - float("inf"), axis=0)
        best_index = tl.min(tl.zeros((BLOCK_N,), dtype=tl.int32) + n_candidates, axis=0)
        for n0 in range(0, n_candidates, BLOCK_N):
            index = n0 + lanes
            inside = index < n_candidates
            s = tl.load(base + index, mask=inside, other=float("-inf"))
            s = tl.where(s != s, float("-inf"), s)  # noqa: PLR0124 (NaN)
            free = inside & ((s < last_value) | ((s == last_value) & (index > last_index)))
            value = tl.max(tl.where(free, s, float("-inf")), axis=0)
            found = tl.min(tl.where(free & (s == value), index, n_candidates), axis=0)
            better = (found < n_candidates) & (
                (value > best_value) | ((value == best_value) & (found < best_index)))
            best_value = tl.where(better, value, best_value)
            best_index = tl.where(better, found, best_index)
        tl.store(BEST + b * k + i, best_index.to(tl.int64))
        last_value = best_value
        last_index = best_index


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_T = BLOCK_C, warps): the whole width in one block, tiles of TILE."""
    block_d = max(32, next_power_of_2(D))
    rows = max(1, TILE // block_d)
    return block_d, rows, 8 if block_d >= 2048 else 4


def triton_configs():
    """Every configuration the launchers can pick, for onestep_kernels.aot."""
    block_d = 32
    while block_d <= MAX_D:
        _, rows, warps = _blocks(block_d)
        for dtype in ("fp32", "fp16", "bf16"):
            for head in (True, False):
                yield KernelConfig(
                    f"score_candidates[{dtype},{'class head' if head else 'cosine'},"
                    f"BLOCK_D={block_d}]", _score_candidates_kernel, dtype,
                    {"HEAD": head, "BLOCK_T": rows, "BLOCK_C": rows, "BLOCK_D": block_d},
                    warps, fp32=("WEIGHT", "BIAS", "SCORES"), int64=("TARGET",))
        block_d *= 2
    yield KernelConfig(f"score_candidates_top_k[BLOCK_N={SELECT_BLOCK}]", _top_k_kernel, "fp32",
                       {"BLOCK_N": SELECT_BLOCK}, 4, int64=("BEST",))


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else t.stride()[:2]


def _triton_fwd(features, other, weight, bias, target, scores, best, n_candidates, k,
                launch=direct):
    M, T, D = features.shape
    block_d, rows, warps = _blocks(D)
    head = weight is not None
    launch(_score_candidates_kernel)[(M,)](
        features, features if other is None else other, weight if head else scores,
        bias if head else scores, target if head else best, scores, T,
        T if other is None else other.shape[1], D, weight.shape[0] if head else 0,
        n_candidates, *_strides(features), *_strides(other), HEAD=head, BLOCK_T=rows,
        BLOCK_C=rows, BLOCK_D=block_d, num_warps=warps)
    launch(_top_k_kernel)[(M // n_candidates,)](scores, best, n_candidates, k,
                                               BLOCK_N=SELECT_BLOCK, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/score_candidates.cpp, csrc/cuda/score_candidates.cu)
# ---------------------------------------------------------------------------------------------

_FIELDS = ("features other weight bias target scores best M T T_other D C n k f_sm f_st o_sm "
           "o_st dtype")


def _params(features, other, weight, bias, target, scores, best, n_candidates, k):
    M, T, D = features.shape
    head = weight is not None
    return native.positional_params("ScoreCandidatesParams", _FIELDS)(
        features.data_ptr(), 0 if head else other.data_ptr(),
        weight.data_ptr() if head else 0, bias.data_ptr() if head else 0,
        target.data_ptr() if head else 0, scores.data_ptr(), best.data_ptr(), M, T,
        T if head else other.shape[1], D, weight.shape[0] if head else 0, n_candidates, k,
        *_strides(features), *_strides(other), native.dtype_code(features))


def _cpu_fwd(*args):
    native.run_cpu("score_candidates", _params(*args))


def _cuda_fwd(features, *args):
    native.run_cuda("score_candidates", _params(features, *args), features)


# ---------------------------------------------------------------------------------------------
# The spec and the backends
# ---------------------------------------------------------------------------------------------


def _allocate(backend, keep, features, other, weight, bias, target, n_candidates, k):
    M = features.shape[0]
    return (features.new_empty((M,), dtype=torch.float32),
            features.new_empty((M // n_candidates, k), dtype=torch.int64))


def _example(sizes, device, dtype, generator):
    """Screening B conditions of N = 16 candidates, the SLT's (B*16, N tokens, D) states,
    a 1000-class head."""
    n, classes = 16, 1000
    features = torch.randn(sizes.B * n, sizes.N, sizes.D, generator=generator,
                           device=device).to(dtype)
    weight = torch.randn(classes, sizes.D, generator=generator, device=device) / sizes.D ** 0.5
    target = torch.randint(0, classes, (sizes.B,), generator=generator, device=device)
    return (features,), {"n_candidates": n, "weight": weight, "bias": torch.zeros(
        classes, device=device), "target": target}


def _expression(features, other, weight, bias, target, n_candidates, k):
    return reference(features, other, weight, bias, target, n_candidates, k)


SPEC = OpSpec(
    "score_candidates", inputs=("features", "other?", "weight?", "bias?", "target?"),
    params=(("n_candidates", int), ("k", int)), outputs=("scores", "best"), returns=2,
    allocate=_allocate, contiguous=("weight", "bias", "target"), example=_example)

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, max_width=MAX_D,
            summary="a program per candidate (pool, head), a program per condition (top-k)"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd, max_width=MAX_D_CUDA,
            summary="a block per candidate, a warp per condition"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd,
            summary="OpenMP over candidates, then conditions"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=_expression, summary="mean, linear, log_softmax, gather, stable sort"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "cuda", "reference")},
    triton_configs=triton_configs)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _check_features(name: str, t: Tensor, like: Tensor | None) -> None:
    checks.tensor(name, t, (3,))
    checks.float_dtype(name, t)
    if like is not None:
        checks.same_device(name, t, like, "features")
        if t.shape[0] != like.shape[0] or t.shape[2] != like.shape[2]:
            raise ArgumentError(f"{name}: expected shape ({like.shape[0]}, T', "
                                f"{like.shape[2]}) like features', got {tuple(t.shape)}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ArgumentError(f"{name}: needs at least one token of positive width, got shape "
                            f"{tuple(t.shape)}")


@OP.public_entry
def score_candidates(features: Tensor, n_candidates: int, *, weight: Tensor | None = None,
                     bias: Tensor | None = None, target: Tensor | None = None,
                     other: Tensor | None = None, k: int = 1,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Score M = B * n_candidates candidates from their token features and pick each
    condition's k best; see the module docstring.

    Args:
        features: (M, T, D), any float dtype, unit stride in the last dimension.
        n_candidates: N, the candidates per condition (M must be a multiple of it).
        weight, bias, target: the class head: weight (C, D), bias (C,) or None, target (B,)
            integer labels. Give these or `other`, not both.
        other: (M, T', D) features to compare with by cosine (features' dtype after
            promotion).
        k: how many of each condition's candidates to pick, 1..N.
        backend: "triton", "cuda", "cpu", "reference", or None for the default.

    Returns:
        (scores (M,) float32 (float64 for float64 features), best (B, k) int64: indices
        0..N-1 within each condition, best first).
    """
    _check_features("features", features, None)
    M, _, D = features.shape
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
        raise ArgumentError(f"n_candidates: expected a positive int, got {n_candidates!r}")
    if M % n_candidates:
        raise ArgumentError(f"n_candidates: features' {M} candidates are not a whole number "
                            f"of conditions of {n_candidates}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_candidates:
        raise ArgumentError(f"k: expected an int in 1..{n_candidates} (n_candidates), got {k!r}")
    if (weight is None) == (other is None):
        raise ArgumentError("weight: give the class head (weight, target) or other (the "
                            "cosine), exactly one")
    if other is not None:
        if bias is not None or target is not None:
            raise ArgumentError("bias: bias and target belong to the class head (weight)")
        _check_features("other", other, features)
        dtype = checks.compute_dtype(checks.PROMOTE, [features, other])
        features, other = checks.cast(features, dtype), checks.cast(other, dtype)
    else:
        checks.tensor("weight", weight, (2,))
        checks.float_dtype("weight", weight)
        checks.same_device("weight", weight, features, "features")
        if weight.shape[1] != D or weight.shape[0] == 0:
            raise ArgumentError(f"weight: expected shape (C, {D}) with C >= 1, got "
                                f"{tuple(weight.shape)}")
        if target is None:
            raise ArgumentError("target: the class head scores the log-probability of each "
                                "condition's label; give target (B,)")
        if not isinstance(target, Tensor):
            raise ArgumentTypeError(f"target: expected a torch.Tensor, got "
                                    f"{type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype is torch.bool:
            raise ArgumentTypeError(f"target: expected integer labels, got {target.dtype}")
        checks.same_device("target", target, features, "features")
        if target.shape != (M // n_candidates,):
            raise ArgumentError(f"target: expected shape ({M // n_candidates},) (one label per "
                                f"condition), got {tuple(target.shape)}")
        head = torch.float64 if features.dtype is torch.float64 else torch.float32
        if bias is None:
            bias = weight.new_zeros(weight.shape[0], dtype=head)
        else:
            checks.tensor("bias", bias, (1,))
            checks.same_device("bias", bias, features, "features")
            if bias.shape != (weight.shape[0],):
                raise ArgumentError(f"bias: expected shape ({weight.shape[0]},), got "
                                    f"{tuple(bias.shape)}")
        weight = weight.detach().to(head).contiguous()
        bias = bias.detach().to(head).contiguous()
        target = target.to(torch.int64).contiguous()
    impl = OP.resolve(backend, features.device, features.dtype, D, False)
    return OP.apply(impl, features.detach(), None if other is None else other.detach(), weight,
                    bias, target, n_candidates, k, grad=False)
