"""trak_fast: TRAK data attribution with an on-the-fly random projection kernel."""
from .projection import model_seed, project, projection_matrix
from .projector import Projector

__version__ = "0.1.0"

__all__ = ["project", "projection_matrix", "model_seed", "Projector", "__version__"]
