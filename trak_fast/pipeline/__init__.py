"""The pipeline: :func:`~.attribute.attribute` (in memory) and :class:`~.trak.TRAK` (a resumable
store, :mod:`.store`), with the up-front checks (:mod:`.checks`), example fingerprints
(:mod:`.fingerprint`) and data parallelism (:mod:`.distributed`) they share."""
from .attribute import attribute
from .fingerprint import ExampleMismatchError
from .store import STORE_FORMAT_VERSION, StoreBusyError, StoreMismatchError
from .trak import TRAK

__all__ = ["attribute", "TRAK", "ExampleMismatchError", "STORE_FORMAT_VERSION", "StoreBusyError",
           "StoreMismatchError"]
