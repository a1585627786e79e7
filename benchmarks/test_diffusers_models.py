"""diffusers' DiT-family transformers fused by `onestep_kernels.integrations.diffusers.fuse`,
against the same model unfused (eager) and its torch.compile, in one run: fp32 on the CPU,
batch 1, two blocks of each kind at each model's real width and head count (DiT-XL/2,
PixArt-alpha, SD3-medium, Flux: onestep_gpu_check.diffusers_models, which gpu_check's
`diffusers` row times in bf16 on a GPU), forward under no_grad.

Rates are GFLOP/s of the blocks' matrix products (attention's two products included), next to
the SGEMM ceiling of the same run. Random weights; nothing downloaded. Flux holds about 4 GB
of weights, twice (fused and not).

    pytest benchmarks/test_diffusers_models.py
"""

import copy

import pytest
import torch
from conftest import measure_sgemm_ceiling

pytest.importorskip("diffusers")

from onestep_gpu_check.diffusers_models import MODEL_CLASSES, SIZES, block_flops, make  # noqa: E402
from onestep_kernels.integrations.diffusers import fuse  # noqa: E402


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("contender", ["eager", "torch.compile", "onestep"])
def test_diffusers_model(benchmark, record, model_class, contender):
    model, inputs = make(model_class)
    with torch.no_grad():
        expected = model(**inputs).sample
    if contender == "onestep":
        model = fuse(copy.deepcopy(model))
    elif contender == "torch.compile":
        model = torch.compile(model)

    def step():
        with torch.no_grad():
            return model(**inputs).sample

    torch.testing.assert_close(step(), expected, rtol=1e-3, atol=1e-3)
    benchmark.group = f"diffusers {model_class}"
    benchmark(step)
    record(f"diffusers {model_class}, 2 blocks of D={SIZES[model_class][0]}, batch 1, fp32",
           contender, block_flops(model_class), "GFLOP/s")


def test_sgemm_ceiling(benchmark, record):
    measure_sgemm_ceiling(benchmark, record)
