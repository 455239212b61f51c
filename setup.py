"""Build vllm_umim and its native ops (csrc/) with torch's cpp_extension.

CPU sources (``csrc/*.cpp``) are always compiled into ``vllm_umim._C``; CUDA twins
(``csrc/*.cu``) are added only when torch was built with CUDA and nvcc is present.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch that is
already installed (an isolated build would download a CUDA torch).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


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
    name="vllm_umim",
    version="0.1.0",
    description="UMIM token merging (multi-step input merging) for vLLM",
    packages=find_packages(include=["vllm_umim", "vllm_umim.*"]),
    package_data={"vllm_umim": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "safetensors",
        "tqdm",
        "transformers",
    ],
    extras_require={
        "data": ["gguf", "accelerate", "pyarrow"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "console_scripts": ["vllm-umim = vllm_umim.cli.main:main"],
        "vllm.general_plugins": [
            "umim = vllm_umim.engine.plugin:register",  # scheduler, worker, config (offline LLM and server)
            "umim_server = vllm_umim.server.plugin:register",  # --umim-* flags, usage.umim, /metrics
        ],
    },
)
