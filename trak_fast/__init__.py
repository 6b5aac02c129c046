"""trak_fast: TRAK data attribution with an on-the-fly random projection kernel.

The projection (C++/CUDA op): :func:`project`, :func:`projection_matrix`, :func:`model_seed`,
:class:`Projector`. TRAK on top of it: :func:`attribute` (one call, in memory) and
:class:`TRAK` (store-backed, resumable), with their building blocks (tasks, featurize,
kernel, scores). Compatibility with MadryLab's trak and fast_jl lives in
:mod:`trak_fast.compat` (imported on demand).
"""
from .projection import model_seed, project, projection_matrix
from .projector import Projector
from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, Task
from .featurize import Features, Featurizer, featurize, target_features
from .kernel import DEFAULT_LAMBDA_REL, Kernel, RegularizedInverse, compute_kernel, kernel_matrix
from .score import model_scores
from .attribute import attribute
from .fingerprint import ExampleMismatchError
from .store import STORE_FORMAT_VERSION, StoreBusyError, StoreMismatchError
from .trak import TRAK

__version__ = "0.1.0"

__all__ = [
    "project", "projection_matrix", "model_seed", "Projector",
    "attribute", "TRAK",
    "Task", "ClassificationTask", "RegressionTask", "LanguageModelingTask",
    "featurize", "target_features", "Features", "Featurizer",
    "kernel_matrix", "compute_kernel", "Kernel", "RegularizedInverse", "DEFAULT_LAMBDA_REL",
    "model_scores",
    "STORE_FORMAT_VERSION", "StoreMismatchError", "StoreBusyError", "ExampleMismatchError",
    "__version__",
]
