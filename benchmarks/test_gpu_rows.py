"""The GPU rows of `python -m onestep_gpu_check` (bf16, DiT-XL/2 shapes), one test
per row, each with the ceilings measured in the same process; skipped without CUDA.

    pytest benchmarks/test_gpu_rows.py -s        # prints each row's markdown table
"""

import pytest
import torch

import onestep_gpu_check as gpu_check
from onestep_gpu_check.report import markdown

ROWS = [name for name in gpu_check.ROWS if name not in ("ceilings", "tests", "preferences")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU rows: needs a CUDA GPU")
@pytest.mark.parametrize("row", ROWS)
def test_gpu_row(row, tmp_path):
    results = gpu_check.run(["ceilings", row], tmp_path, gpu_check.gpu_setting(),
                            budget_s=600, do_build=False)
    print(markdown(results, gpu_check.ROWS))
    assert results["rows"][row]["error"] is None, results["rows"][row]["error"]
