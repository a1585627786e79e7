"""score_candidates: every backend against float64 scores and the stable-sort top-k, at
awkward shapes (N not a power of two, N = 1, C = 1 and 1000, D = 384 and 1152, strided
features); ties to the lower index, NaN last; poisoned outputs; bad input by name;
registration and torch.compile."""

import re

import pytest
import torch
from conftest import backend_device, backend_matrix, refused

import onestep_kernels as ok
from onestep_kernels.ops import score_candidates as op

OP = "score_candidates"
# (B conditions, N candidates each, T tokens, D, C classes)
SHAPES = [(3, 5, 7, 48, 11), (1, 3, 16, 384, 1000), (2, 13, 9, 384, 10), (1, 1, 3, 1152, 10),
          (4, 6, 1, 33, 1), (1, 70, 4, 20, 3)]


def _features(M, T, D, dtype, generator, strided=True):
    """(M, T, D) features; strided: a view with gaps between tokens and candidates (as a kept
    depth-loop state is)."""
    if not strided:
        return torch.randn(M, T, D, generator=generator).to(dtype)
    return torch.randn(M, T + 2, D + 5, generator=generator).to(dtype)[:, 1:T + 1, 2:D + 2]


def _check(scores, best, ref_scores, B, N, k, dtype, what):
    assert scores.dtype == torch.float32 and scores.shape == (B * N,), what
    assert best.dtype == torch.int64 and best.shape == (B, k), what
    tolerance = 1e-5 if dtype == torch.float32 else 1e-4  # (fp32 sums of converted inputs)
    error = (scores.double().cpu() - ref_scores).abs().max().item()
    scale = ref_scores.abs().max().item()
    assert error <= tolerance * max(scale, 1.0), f"{what}: scores off by {error:.3g}"
    # the picks are the stable-sort top-k of the scores the kernel wrote (exact), and, within
    # the scores' error, the float64 top-k's values
    assert torch.equal(best.cpu(), op.top_k_reference(scores.cpu(), N, k)), what
    picked = ref_scores.view(B, N).gather(1, best.cpu())
    wanted = ref_scores.view(B, N).sort(dim=1, descending=True).values[:, :k]
    assert (picked - wanted).abs().max().item() <= 2 * tolerance * max(scale, 1.0), what


def _score_or_refused(backend, dtype, features, N, k, **tensors):
    """The op on `backend`'s device, or, where its record refuses such a call, a check that
    the call is refused with the record's reason (then None)."""
    dev = backend_device(backend, OP)
    moved = {name: t.to(dev) for name, t in tensors.items()}
    if reason := refused(OP, backend, dev, dtype, features.shape[-1], False):
        with pytest.raises(ValueError, match=re.escape(reason)):
            ok.score_candidates(features.to(dev), N, k=k, backend=backend, **moved)
        return None
    return ok.score_candidates(features.to(dev), N, k=k, backend=backend, **moved)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xN{}xT{}xD{}xC{}".format(*s))
@pytest.mark.parametrize("backend,dtype,isa", backend_matrix(OP))
def test_class_head_matches_float64(backend, dtype, isa, shape, generator, cpu_isa):
    cpu_isa(isa)
    B, N, T, D, C = shape
    features = _features(B * N, T, D, dtype, generator)
    weight = torch.randn(C, D, generator=generator) / D ** 0.5 * 3
    bias = torch.randn(C, generator=generator)
    target = torch.randint(0, C, (B,), generator=generator)
    k = min(3, N)
    ref = op.scores_reference(features.double(), None, weight.double(), bias.double(), target, N)
    result = _score_or_refused(backend, dtype, features, N, k, weight=weight, bias=bias,
                               target=target)
    if result is not None:
        _check(*result, ref, B, N, k, dtype, f"{backend} class head")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xN{}xT{}xD{}".format(*s[:4]))
@pytest.mark.parametrize("backend,dtype,isa", backend_matrix(OP))
def test_cosine_matches_float64(backend, dtype, isa, shape, generator, cpu_isa):
    cpu_isa(isa)
    B, N, T, D, _ = shape
    features = _features(B * N, T, D, dtype, generator)
    other = _features(B * N, T + 2, D, dtype, generator, strided=False) + features.mean(1, True)
    k = N
    ref = op.scores_reference(features.double(), other.double(), None, None, None, N)
    result = _score_or_refused(backend, dtype, features, N, k, other=other)
    if result is not None:
        _check(*result, ref, B, N, k, dtype, f"{backend} cosine")


KERNELS = ["cpu", "triton", "cuda", "reference"]


def _runnable(backend):
    dev = backend_device(backend, OP)
    if reason := refused(OP, backend, dev, torch.float32, 64, False):
        pytest.skip(f"{backend}: {reason}")
    return dev


@pytest.mark.parametrize("backend", KERNELS)
def test_ties_go_to_the_lower_index_and_nan_ranks_last(backend, generator):
    """Candidates 1, 3 and 4 of a condition are copies of 0 (equal scores); another condition's
    label is outside the head (NaN scores): the picks are the stable order, and NaN comes
    after every number."""
    dev = _runnable(backend)
    N, D, C = 6, 64, 7
    features = torch.randn(3 * N, 5, D, generator=generator)
    features[[1, 3, 4]] = features[0].clone()
    features[N + 2] = features[N].clone()
    weight, bias = torch.randn(C, D, generator=generator), torch.randn(C, generator=generator)
    target = torch.tensor([2, 5, C])  # the last condition's scores are all NaN
    scores, best = ok.score_candidates(features.to(dev), N, weight=weight.to(dev),
                                       bias=bias.to(dev), target=target.to(dev), k=N,
                                       backend=backend)
    scores, best = scores.cpu(), best.cpu()
    assert torch.equal(best, op.top_k_reference(scores, N, N))
    assert torch.isnan(scores[2 * N:]).all() and torch.equal(best[2], torch.arange(N))
    copies = [i for i in best[0].tolist() if i in (0, 1, 3, 4)]
    assert copies == [0, 1, 3, 4]  # consecutive in the ranking, in index order
    # a NaN among numbers ranks last; +inf and -inf rank as numbers do
    values = torch.tensor([0.5, float("nan"), float("inf"), -1.0, float("-inf"), 0.5])
    assert op.top_k_reference(values, 6, 6).tolist() == [[2, 0, 5, 3, 4, 1]]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_launchers_write_every_output(backend, generator):
    """Outputs poisoned (NaN scores, -7 picks) before the launch: every element is written."""
    dev = _runnable(backend)
    features = torch.randn(4 * 9, 6, 40, generator=generator).to(dev)
    record = op.OP[backend]
    for kwargs in ({"weight": torch.randn(12, 40, device=dev), "bias": torch.zeros(12, device=dev),
                    "target": torch.tensor([0, 3, 11, 5], device=dev)},
                   {"other": torch.randn(36, 2, 40, device=dev)}):
        head = "weight" in kwargs
        scores = torch.full((36,), float("nan"), device=dev)
        best = torch.full((4, 9), -7, dtype=torch.int64, device=dev)
        op.OP.forward(record, features, kwargs.get("other"), kwargs.get("weight"),
                      kwargs.get("bias"), kwargs.get("target"), 9, 9, outputs=(scores, best))
        assert torch.isfinite(scores).all(), "head" if head else "cosine"
        assert torch.equal(best.sort(dim=1).values.cpu(), torch.arange(9).expand(4, 9))


def test_the_picks_do_not_depend_on_the_thread_count(generator):
    features = torch.randn(8 * 16, 9, 100, generator=generator)
    weight = torch.randn(10, 100, generator=generator)
    target = torch.randint(0, 10, (8,), generator=generator)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ok.score_candidates(features, 16, weight=weight, target=target, k=4,
                                               backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1],
                                                                     results[1][1])


def test_mixed_dtypes_and_autocast(generator):
    """The head is read in fp32 whatever its dtype; the cosine's two features are promoted to
    a common dtype, as `features * other` would be; autocast changes nothing (no products in
    a low dtype)."""
    features = torch.randn(6, 4, 32, generator=generator).to(torch.bfloat16)
    weight = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    target = torch.tensor([1, 4])
    ref = op.scores_reference(features.double(), None, weight, None, target, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = ok.score_candidates(features, 3, weight=weight, target=target)
    assert scores.dtype == torch.float32
    assert (scores.double() - ref).abs().max() < 1e-4
    other = torch.randn(6, 2, 32, generator=generator)
    scores, _ = ok.score_candidates(features, 3, other=other)
    ref = op.scores_reference(features.double(), other.double(), None, None, None, 3)
    assert (scores.double() - ref).abs().max() < 1e-5


def test_no_gradient_is_recorded(generator):
    features = torch.randn(6, 4, 32, generator=generator, requires_grad=True)
    scores, best = ok.score_candidates(features, 3, other=features.detach() + 1)
    assert not scores.requires_grad and not best.requires_grad


def test_bad_input_is_refused_by_name():
    f = torch.randn(6, 3, 8)
    w, y = torch.randn(5, 8), torch.tensor([1, 2])
    cases = [
        (lambda: ok.score_candidates(f, 4, other=f), "^n_candidates: features' 6 candidates"),
        (lambda: ok.score_candidates(f, 0, other=f), "^n_candidates: expected a positive int"),
        (lambda: ok.score_candidates(f, 3, other=f, k=4), r"^k: expected an int in 1\.\.3"),
        (lambda: ok.score_candidates(f, 3), "^weight: give the class head"),
        (lambda: ok.score_candidates(f, 3, weight=w, target=y, other=f), "^weight: give"),
        (lambda: ok.score_candidates(f, 3, weight=w), "^target: the class head"),
        (lambda: ok.score_candidates(f, 3, weight=w, target=y.float()),
         "^target: expected integer labels"),
        (lambda: ok.score_candidates(f, 3, weight=w, target=torch.tensor([1, 2, 3])),
         r"^target: expected shape \(2,\)"),
        (lambda: ok.score_candidates(f, 3, weight=torch.randn(5, 7), target=y),
         r"^weight: expected shape \(C, 8\)"),
        (lambda: ok.score_candidates(f, 3, weight=w, bias=torch.randn(4), target=y),
         r"^bias: expected shape \(5,\)"),
        (lambda: ok.score_candidates(f, 3, other=f, bias=torch.randn(5)), "^bias: bias and"),
        (lambda: ok.score_candidates(f, 3, other=torch.randn(6, 3, 9)), r"^other: expected"),
        (lambda: ok.score_candidates(f[:, :0], 3, other=f), "^features: needs at least one"),
        (lambda: ok.score_candidates(f[0], 3, other=f), "^features: expected a 3-D"),
        (lambda: ok.score_candidates(f.int(), 3, other=f), "^features: expected dtype"),
        (lambda: ok.score_candidates(f, 3, other=torch.empty(6, 3, 8, device="meta")),
         "^other: is on meta"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_the_inner_layer_refuses_a_meta_other():
    f = torch.randn(6, 3, 8)
    with pytest.raises(ValueError, match="^other: is on the meta device"):
        op.OP.forward(op.OP["cpu"], f, torch.empty(6, 3, 8, device="meta"), None, None, None,
                      3, 1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, generator):
    dev = _runnable(backend)
    features = torch.randn(6, 4, 16, generator=generator).to(dev)
    weight, bias = torch.randn(5, 16).to(dev), torch.randn(5).to(dev)
    target = torch.tensor([0, 4], device=dev)
    torch.library.opcheck(torch.ops.onestep.score_candidates_fwd.default,
                          (features, None, weight, bias, target, 3, 2, backend))
    torch.library.opcheck(torch.ops.onestep.score_candidates_fwd.default,
                          (features, features + 1, None, None, None, 3, 3, backend))


@pytest.mark.slow
def test_torch_compile_fullgraph(generator):
    features = torch.randn(2 * 7, 5, 24, generator=generator)
    weight, target = torch.randn(4, 24, generator=generator), torch.tensor([3, 0])

    def screen(f):
        return ok.score_candidates(f * 2, 7, weight=weight, target=target, k=2)

    compiled = torch.compile(screen, fullgraph=True)(features)
    eager = screen(features)
    assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[0], eager[0])


@pytest.mark.parametrize("offset", [0.0, 64.0, 1000.0])
@pytest.mark.parametrize("backend,dtype,isa", [
    case for case in backend_matrix(OP, (torch.float16, torch.bfloat16))
    if case.values[0] != "reference"])
def test_half_precision_features_far_from_zero(backend, dtype, isa, offset, generator, cpu_isa):
    """Features whose mean is far from zero (as a residual stream's can be), in fp16/bf16: the
    pooled sums and the head run in fp32 over the rounded inputs, so scores stay within fp32's
    error of float64 on the same inputs, for the class head and the cosine."""
    cpu_isa(isa)
    dev = backend_device(backend, OP)
    if reason := refused(OP, backend, dev, dtype, 96, False):
        pytest.skip(reason)
    N = 7
    features = (torch.randn(2 * N, 33, 96, generator=generator) + offset).to(dtype)
    other = (torch.randn(2 * N, 5, 96, generator=generator) - offset).to(dtype)
    weight = torch.randn(10, 96, generator=generator) / 96 ** 0.5
    target = torch.tensor([2, 9])
    for kwargs, ref in (
            ({"weight": weight, "target": target},
             op.scores_reference(features.double(), None, weight.double(), None, target, N)),
            ({"other": other},
             op.scores_reference(features.double(), other.double(), None, None, None, N))):
        scores, best = ok.score_candidates(features.to(dev), N, backend=backend,
                                           **{k: v.to(dev) for k, v in kwargs.items()})
        scale = max(ref.abs().max().item(), 1.0)
        assert (scores.double().cpu() - ref).abs().max().item() <= 1e-5 * scale, kwargs.keys()
        assert torch.equal(best.cpu(), op.top_k_reference(scores.cpu(), N, 1))
