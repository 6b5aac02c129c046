"""trak_fast: TRAK data attribution with an on-the-fly random projection kernel.

Where things live (each folder a subsystem; nothing imports back up into a caller):

- :mod:`trak_fast.ops`: the C++/CUDA projection op and its wrappers (:func:`project`,
  :func:`projection_matrix`, :func:`model_seed`, :class:`Projector`);
- :mod:`trak_fast.settings`: :class:`FeatureSettings` and :class:`ScoreSettings`;
- :mod:`trak_fast.features`: tasks, per-example gradients (``features.gradients``), the
  featurizer and the featurize loop;
- :mod:`trak_fast.scoring`: the kernel, its damped solve and the scores;
- :mod:`trak_fast.pipeline`: :func:`attribute`, :class:`TRAK` and its store, checks,
  fingerprints, ``torch.distributed``;
- :mod:`trak_fast.compat`: drop-ins for MadryLab's trak, fast_jl and dattri (on demand);
- :mod:`trak_fast.eval`: LDS, the embedded digits data, the demo.
"""
import importlib
import importlib.util
import sys
import types

from .ops import Projector, model_seed, project, projection_matrix
from .settings import DEFAULT_LAMBDA_REL, FeatureSettings, ScoreSettings
from .features import (ClassificationTask, Features, Featurizer, LanguageModelingTask,
                       RegressionTask, Task, featurize, target_features)
from .scoring import (Kernel, RegularizedInverse, TopK, compute_kernel, kernel_matrix, model_scores,
                      top_k)
from .pipeline import (STORE_FORMAT_VERSION, TRAK, ExampleMismatchError, StoreBusyError,
                       StoreMismatchError, attribute)

__version__ = "0.2.0"

__all__ = [
    "project", "projection_matrix", "model_seed", "Projector",
    "FeatureSettings", "ScoreSettings",
    "attribute", "TRAK",
    "Task", "ClassificationTask", "RegressionTask", "LanguageModelingTask",
    "featurize", "target_features", "Features", "Featurizer",
    "kernel_matrix", "compute_kernel", "Kernel", "RegularizedInverse", "DEFAULT_LAMBDA_REL",
    "model_scores", "top_k", "TopK",
    "STORE_FORMAT_VERSION", "StoreMismatchError", "StoreBusyError", "ExampleMismatchError",
    "__version__",
]

#: Module paths of trak_fast 0.1 (a flat package) and where they live now: ``import
#: trak_fast.kernel`` keeps working and gives the module at its new place.
MOVED = {
    "_ops": "ops.library", "projection": "ops.projection", "projector": "ops.projector",
    "tasks": "features.tasks", "layout": "features.layout", "featurize": "features.loop",
    "gradients": "features.gradients", "kernel": "scoring.kernel", "score": "scoring.scores",
    "checks": "pipeline.checks", "fingerprint": "pipeline.fingerprint", "store": "pipeline.store",
    "trak": "pipeline.trak", "attribute": "pipeline.attribute",
    "distributed": "pipeline.distributed", "lds": "eval.lds", "digits": "eval.digits",
    "demo": "eval.demo",
}


class _MovedModules:
    """Finds ``trak_fast.<old name>[.<submodule>]`` and gives the module at its new path."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != __name__ or parts[1] not in MOVED:
            return None
        module = importlib.import_module(".".join([__name__, MOVED[parts[1]]] + parts[2:]))
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module))


class _AliasLoader:
    """Hands the import system the module itself (not a second copy of its file)."""

    def __init__(self, module):
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec      # the import system set it to the alias's spec


class _Package(types.ModuleType):
    """Keeps ``trak_fast.featurize`` and ``trak_fast.attribute`` the functions when their 0.1
    modules are imported by the old path (the import system would bind the module there)."""

    def __setattr__(self, name, value):
        if name in ("featurize", "attribute") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.meta_path.insert(0, _MovedModules)   # before the path finder: no second copy of a module
sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    """``trak_fast.digits`` and the other 0.1 module names as attributes."""
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
