"""The whole GPU pass in one command: build, benchmarks against their ceilings, tests,
preference order; JSON plus a markdown table.

    python -m onestep_gpu_check --out gpu_results               # everything, in order
    python -m onestep_gpu_check --out gpu_results --only block,dit
    python -m onestep_gpu_check --out smoke --smoke             # plumbing, on the CPU

Rows run in the order of ROWS, most important first, and stop starting new ones when the time
budget (`--budget-s`, 540 s) is spent; `--only` picks some. Results from several calls into one
directory merge (a row's new result replaces its old one). Without CUDA (and without
`--smoke`) it says so and exits 0.

A package of its own beside benchmarks/, not part of onestep_kernels: it times the models
(onestep_models) as well as the kernels. rows.py holds the benchmark rows, suite.py the test
row, report.py the report, runner.py the pass and its command line.
"""

from .rows import Row, Setting, describe_error, gpu_setting, kernel_table, smoke_setting
from .runner import ROWS, main, run
from .suite import GPU_TESTS_FIRST, TEST_DEADLINE_ENV, TEST_DEADLINE_SKIP, ordered_test_files

__all__ = ["GPU_TESTS_FIRST", "ROWS", "Row", "Setting", "TEST_DEADLINE_ENV",
           "TEST_DEADLINE_SKIP", "describe_error", "gpu_setting", "kernel_table", "main",
           "ordered_test_files", "run", "smoke_setting"]
