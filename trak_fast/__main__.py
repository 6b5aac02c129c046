"""Command line: ``python -m trak_fast {build,score,info,demo}`` (build and score: :mod:`trak_fast.cli`)."""
from __future__ import annotations

import sys
from typing import List, Optional


def info() -> int:
    import torch

    import trak_fast
    from trak_fast.ops import library as _ops

    try:
        from trak_fast import _build_info as build
    except ImportError:  # an install without setup.py's record
        build = None
    compiled = _ops.has_cuda_kernels()
    print(f"trak_fast {trak_fast.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if compiled and build is not None:
        print(f"CUDA kernels: compiled with CUDA {build.CUDA_VERSION} for archs {build.CUDA_ARCHS}")
        built_major = str(build.CUDA_VERSION).split(".")[0]
        torch_major = (torch.version.cuda or "").split(".")[0]
        verdict = "matches" if built_major == torch_major else "DOES NOT MATCH"
        print(f"CUDA version check: compiled {build.CUDA_VERSION} {verdict} torch's {torch.version.cuda}")
    else:
        print(f"CUDA kernels: {'compiled' if compiled else 'not compiled (CPU only build)'}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print("GPU: none visible")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "info":
        return info()
    if argv and argv[0] == "demo":
        from trak_fast.eval import demo

        return demo.main(argv[1:])
    from trak_fast import cli

    if not argv:
        cli.parser().print_help()
        return 2
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
