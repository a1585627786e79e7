"""Noise screening on the CPU, fp32, random weights (the GPU pass's `screening` row is the bf16
one, with CUDA graphs):

- the time budget: one sample of a DiT-XL/2-shaped one-step teacher (256 tokens, width 1152,
  28 layers) at B = 1, against screening 128 candidates with the slt-screen SLT (width 360,
  K = 7, patch 4: 64 tokens) and its preview classifier (4 x 32 x 32 latent -> 256 -> 1000
  classes), then that teacher on the best; analytic FLOPs of both, printed;
- the scoring op at the screening SLT's states (128 candidates x 64 tokens x 360, a 1000-class
  head: the null-state scorer's shape) against the PyTorch expression (pool, linear,
  log_softmax, gather, view, topk), its torch.compile and a copy of the features (the
  machine's copy rate): GB/s of features and head read once.

    pytest benchmarks/test_screening.py
"""

import dataclasses

import pytest
import torch

import onestep_kernels as ok
from onestep_gpu_check.rows import (
    score_candidates_expression,
    screening_contenders,
    smoke_setting,
)
from onestep_models.slt import SLT_SIZES

CPU_BUDGET = dataclasses.replace(smoke_setting(), dit="DiT-XL/2", dit_input=32,
                                 screen="slt-screen", screen_candidates=128)


@pytest.fixture(scope="module")
def contenders():
    with torch.no_grad():
        teacher, screen, flops = screening_contenders(CPU_BUDGET, cuda_graphs=False)
    print(f"\nFLOPs: teacher sample {flops['teacher'] / 1e9:.1f} G, screening 128 candidates "
          f"{flops['screen'] / 1e9:.1f} G ({flops['screen'] / flops['teacher']:.3f} of it)")
    return {"teacher, 1 sample": (teacher, flops["teacher"]),
            "screen 128 + teacher 1": (screen, flops["teacher"] + flops["screen"])}


@pytest.mark.parametrize("contender", ["teacher, 1 sample", "screen 128 + teacher 1"])
def test_time_budget(benchmark, record, contenders, contender):
    fn, flops = contenders[contender]
    benchmark.group = "screening time budget"
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    record("screening budget: DiT-XL/2 teacher B=1, slt-screen x 128, fp32", contender, flops,
           "GFLOP/s")


_SIZE = SLT_SIZES["slt-screen"]
M, T, D, C = 128, (32 // _SIZE["patch_size"]) ** 2, _SIZE["hidden_size"], 1000


def _op_inputs():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(M, T, D, generator=g)
    weight = torch.randn(C, D, generator=g) / D ** 0.5
    return features, weight, torch.zeros(C), torch.tensor([3])


@pytest.mark.parametrize("contender", ["PyTorch expression", "torch.compile(expression)",
                                       "onestep", "copy of the features"])
def test_score_candidates(benchmark, record, contender):
    features, weight, bias, target = _op_inputs()
    moved = features.numel() * 4 + weight.numel() * 4
    if contender == "copy of the features":
        out = torch.empty_like(features)
        benchmark.group = "score_candidates"
        benchmark(out.copy_, features)
        record(f"score_candidates {M} x {T} x {D}, {C} classes, fp32", contender,
               2 * features.numel() * 4, "GB/s")
        return
    fn = {"PyTorch expression": score_candidates_expression,
          "torch.compile(expression)": torch.compile(score_candidates_expression),
          "onestep": lambda f, n, w, b, t: ok.score_candidates(f, n, weight=w, bias=b,
                                                               target=t)}[contender]
    with torch.no_grad():
        scores, best = fn(features, M, weight, bias, target)
        ref_scores, ref_best = score_candidates_expression(features, M, weight, bias, target)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(best.view(-1)[:1], ref_best.view(-1)[:1])
        benchmark.group = "score_candidates"
        benchmark(fn, features, M, weight, bias, target)
    record(f"score_candidates {M} x {T} x {D}, {C} classes, fp32", contender, moved, "GB/s")
