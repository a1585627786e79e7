"""The scalar math that csrc/common shares between the CPU and CUDA kernels, where the CPU
kernels do not run it themselves: the Welford merge the CUDA LayerNorm forwards use to combine
their threads' statistics, compiled here for the CPU and checked against float64."""

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to compile the check with")
def test_welford_merge_matches_a_float64_two_pass(tmp_path):
    """Rows of 1..8192 elements offset by 0, 64 and 1000, split over 1..256 threads as the
    CUDA kernels split them: the merged mean is within 2e-4 of a standard deviation and the
    variance within 1e-4 relative of float64's (float32's own rounding at 1000 sigma of offset
    is about 6e-5)."""
    binary = tmp_path / "welford_check"
    subprocess.run(["g++", "-std=c++17", "-O2", str(HERE / "native" / "welford_check.cpp"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    worst_mean, worst_var = (float(v) for v in result.stdout.split())
    assert worst_mean < 2e-4 and worst_var < 1e-4, result.stdout
