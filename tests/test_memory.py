"""`ok.tune_cpu_allocator`: glibc's mmap and trim thresholds, set in a process of its own (the
test process keeps its allocator as it is)."""

import subprocess
import sys
import textwrap

import pytest

import onestep_kernels as ok


@pytest.mark.parametrize("name, value", [("mmap_threshold", 0), ("mmap_threshold", -1),
                                         ("trim_threshold", 1.5), ("trim_threshold", True)])
def test_bad_thresholds_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        ok.tune_cpu_allocator(**{name: value})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_stay_in_the_heap():
    """After tuning, a freed 64 MiB block is reused from the heap: allocating it again adds no
    new mapping (by default glibc maps blocks over 32 MiB on their own, and unmaps them on
    free: one more line in /proc/self/maps)."""
    script = textwrap.dedent("""
        import ctypes, ctypes.util, sys
        import onestep_kernels as ok

        def mappings():
            return len(open("/proc/self/maps").read().splitlines())

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: nothing changes
            assert ok.tune_cpu_allocator() is False
            sys.exit(0)
        assert ok.tune_cpu_allocator() is True
        block = 64 << 20
        libc.free(libc.malloc(block))  # the heap grows once
        before = mappings()
        pointer = libc.malloc(block)
        after = mappings()
        libc.free(pointer)
        print(before, after)
        sys.exit(0 if after == before else 1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
