"""Tasks: what TRAK differentiates (the model output f) and how it weights train rows (Q).

:mod:`.base` defines :class:`Task` (and the math of f and Q); :mod:`.classification` and
:mod:`.language_modeling` the built-in tasks; :func:`get_task` turns a name into one.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

from .base import Task, batch_size_of
from .classification import ClassificationTask, RegressionTask
from .language_modeling import IGNORE_INDEX, LanguageModelingTask, positions_from_mask

_BUILT_IN: Dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "language_modeling": LanguageModelingTask,
}


def get_task(task: Union[str, Task, None]) -> Task:
    """Returns ``task`` itself, or the built-in task of that name."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in _BUILT_IN:
        return _BUILT_IN[task]()
    raise ValueError(
        f"task must be a trak_fast.Task or one of {sorted(_BUILT_IN)}, got {task!r}"
    )


__all__ = ["Task", "ClassificationTask", "RegressionTask", "LanguageModelingTask", "get_task",
           "batch_size_of", "positions_from_mask", "IGNORE_INDEX"]
