"""Build vkern._C from csrc/ through CMake when nvcc is available; otherwise install the pure Python
package (Triton and PyTorch backends) and say so. Switches:
  VKERN_SKIP_CUDA_BUILD=1   never build vkern._C
  VKERN_CUDA_ARCHS=90a;80   target architectures (default 90a: Hopper with wgmma/TMA)
  VKERN_PTXAS_VERBOSE=1     print registers/spills per kernel
  CUDACXX / CUDA_HOME       where nvcc is
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc():
    for candidate in (os.environ.get("CUDACXX"),
                      os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                      shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


class CMakeBuild(build_ext):
    def run(self):
        nvcc = find_nvcc()
        if os.environ.get("VKERN_SKIP_CUDA_BUILD") == "1" or nvcc is None:
            why = "VKERN_SKIP_CUDA_BUILD=1" if nvcc else "nvcc not found"
            print(f"vkern: {why}: installing without vkern._C (Triton and PyTorch backends only)")
            self.extensions = []
        self._nvcc = nvcc
        super().run()

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("VKERN_CUDA_ARCHS", "90a")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVKERN_CUDA_ARCHS={archs}",
            f"-DVKERN_OUTPUT_DIR={out_dir}",
            f"-DVKERN_PTXAS_VERBOSE={'ON' if os.environ.get('VKERN_PTXAS_VERBOSE') == '1' else 'OFF'}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


setup(ext_modules=[Extension("vkern._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
