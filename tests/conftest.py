import os
import sys

import torch

# tests/ holds helpers (reference_matrix.py) imported by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The suite runs many small ops; one intra-op thread avoids oversubscription on small
# CI machines. Tests that exercise the multi-threaded kernel paths set threads themselves.
torch.set_num_threads(1)


def _devices():
    from trak_fast.ops import library
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and library.has_cuda_kernels() else [])


#: The devices every device-parametrized test runs on: the CPU, and CUDA where a GPU and the
#: CUDA kernels are present. Import it as ``from conftest import DEVICES``.
DEVICES = _devices()
