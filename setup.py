"""Build of onestep: setuptools drives CMake (+ ninja) for the native kernels.

`pip install -e .` (or a wheel build) configures CMakeLists.txt, builds the CPU module
`onestep_kernels._C` and, when nvcc is found, `onestep_kernels/libonestep_cuda.so`, and installs
both next to the Python package. Environment knobs: ONESTEP_SKIP_CUDA=1, ONESTEP_CUDA_ARCHS
(e.g. "80,90"), ONESTEP_BUILD_JOBS, CMAKE_BUILD_TYPE.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_LIBRARY = "libonestep_cuda.so"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_INSTALL_PREFIX={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        jobs = os.environ.get("ONESTEP_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        subprocess.run(["cmake", "--install", str(build_dir)], check=True)
        if getattr(self, "editable_mode", False) or self.inplace:
            # setuptools copies only the Python extension into the source tree; the CUDA
            # library travels beside it (and a stale one from an earlier build goes away).
            built = out_dir / CUDA_LIBRARY
            target = ROOT / "onestep_kernels" / CUDA_LIBRARY
            if built.exists() and built.resolve() != target.resolve():
                shutil.copy2(built, target)
            elif not built.exists():
                target.unlink(missing_ok=True)


setup(
    ext_modules=[CMakeExtension("onestep_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
