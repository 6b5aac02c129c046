"""The projection: the C++/CUDA op (:mod:`.library`), its Python wrappers (:mod:`.projection`:
``project``, ``projection_matrix``, ``model_seed``) and the :class:`~.projector.Projector` object."""
from .projection import MAX_SEED, check_int, check_kind, check_nnz, model_seed, project, projection_matrix
from .projector import Projector

__all__ = ["project", "projection_matrix", "model_seed", "Projector", "check_int", "check_kind",
           "check_nnz", "MAX_SEED"]
