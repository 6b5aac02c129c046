import os
import sys

import torch

# tests/ holds helpers (reference_matrix.py) imported by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The suite runs many small ops; one intra-op thread avoids oversubscription on small
# CI machines. Tests that exercise the multi-threaded kernel paths set threads themselves.
torch.set_num_threads(1)
