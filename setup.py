"""Build script for trak_fast's C++/CUDA extension (trak_fast._C).

TRAK_FAST_CUDA=1 forces the CUDA build (and fails loudly if it is impossible),
TRAK_FAST_CUDA=0 skips it; unset, CUDA kernels are built when a CUDA toolkit and a
CUDA build of torch are both present. A GPU is not needed to compile them.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# torch's toolkit auto-detection follows `which nvcc`, which on some machines finds
# /usr/local/bin/nvcc and concludes CUDA_HOME=/usr/local. Prefer the real toolkit.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def cuda_requested():
    flag = os.environ.get("TRAK_FAST_CUDA", "").strip()
    has_toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    has_torch_cuda = torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not has_toolkit:
            sys.exit("TRAK_FAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to the toolkit).")
        if not has_torch_cuda:
            sys.exit("TRAK_FAST_CUDA=1 but torch %s is a CPU-only build." % torch.__version__)
        return True
    if flag:
        sys.exit("TRAK_FAST_CUDA must be 0 or 1, got %r" % flag)
    return has_toolkit and has_torch_cuda


def nvcc_version():
    out = subprocess.run(
        [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return "unknown"


def write_build_info(with_cuda, archs, cuda_version):
    path = os.path.join(HERE, "trak_fast", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; not tracked by git.\n")
        f.write("CUDA_COMPILED = %r\n" % with_cuda)
        f.write("CUDA_VERSION = %r\n" % cuda_version)
        f.write("CUDA_ARCHS = %r\n" % archs)
        f.write("TORCH_VERSION = %r\n" % torch.__version__)


def extensions():
    with_cuda = cuda_requested()
    # No contraction: the matrix definition must round the same everywhere. The other two
    # flags let the compiler vectorize the branch-free generator; they change no result.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    # at::parallel_for is a header template over OpenMP: without -fopenmp it silently runs on
    # one thread. torch ships its own libgomp, which the loader reuses (same soname).
    link_flags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if not with_cuda:
        write_build_info(False, None, None)
        return [cpp_extension.CppExtension(
            "trak_fast._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for A100-class and Hopper, plus PTX for newer cards.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
    write_build_info(True, archs, nvcc_version())
    nvcc_flags = ["-O3", "-Xcompiler", "-ffp-contract=off", "-lineinfo",
                  "-DTRAK_FAST_WITH_CUDA"]
    return [cpp_extension.CUDAExtension(
        "trak_fast._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        define_macros=[("TRAK_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
    )]


setup(
    packages=find_packages(include=["trak_fast", "trak_fast.*"]),
    package_data={"trak_fast": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)},
)
