"""The native build of vllm_umim (metadata, dependencies, entry points: pyproject.toml).

CPU sources (``csrc/*.cpp``) are always compiled into ``vllm_umim._C``; CUDA twins
(``csrc/*.cu``) are added only when torch was built with CUDA and nvcc is present.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch that is
already installed (an isolated build would download a CUDA torch).
"""

import glob

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def native_extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cuda = sorted(glob.glob("csrc/*.cu"))
    cxx_flags = ["-O3", "-std=c++17"]
    if torch.version.cuda and CUDA_HOME and cuda:
        return CUDAExtension(
            "vllm_umim._C",
            cpp + cuda,
            define_macros=[("UMIM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    return CppExtension("vllm_umim._C", cpp, extra_compile_args=cxx_flags)


setup(
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
)
