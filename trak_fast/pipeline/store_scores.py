"""Scores from a store's train rows: the column-wise scoring step of :meth:`trak_fast.TRAK.score`.

A store holds, per checkpoint ``m``, either TRAK's ``Phi_m`` and ``Q_m`` (curvature
``"kernel"``: the kernels ``finalize`` saved, or computed here in one pass) or the Fisher's
``[G | S_1 .. S_C]`` rows (curvature ``"fisher"``: :func:`trak_fast.scoring.fisher.fisher_scores`,
a layer at a time). Under a process group each rank scores its share of the target columns.
"""
from __future__ import annotations

import logging
from typing import Any, List, Sequence

import numpy as np
import torch

from ..features.layout import FeatureBlock
from ..scoring.fisher import fisher_scores
from ..scoring.kernel import (Kernel, check_kernel, compute_kernels, kernel_blocks, kernel_matrix,
                              kernel_row_weights)
from ..scoring.scores import add_checkpoint_scores, finish_ensemble
from ..settings import ScoreSettings
from . import distributed
from .store import Store

logger = logging.getLogger("trak_fast")


def checkpoint_kernels(store: Store, model_id: int, scoring: ScoreSettings,
                       layout: Sequence[FeatureBlock], device: Any) -> List[Any]:
    """``[(block, Kernel)]`` saved by ``finalize``, or computed from the stored features
    (one pass) when that (kernel, kernel_weights) pair was not finalized.
    ``ensemble="trak"`` recomputes a dual kernel in the primal form."""
    primal = scoring.ensemble == "trak"
    n, k = store.settings["train_size"], store.settings["num_features"]
    features, out_to_loss = store.read_train_arrays(model_id)
    weights = kernel_row_weights(scoring.kernel_weights, out_to_loss)
    stored = store.stored_kernels(model_id, f"{scoring.kernel}/{scoring.kernel_weights}")
    if stored is None:
        logger.info("model_id %d: computing kernel=%r, kernel_weights=%r from the stored "
                    "features (finalize(kernel=..., kernel_weights=...) would save it)",
                    model_id, scoring.kernel, scoring.kernel_weights)
        return compute_kernels(features, kernel_blocks(layout, k, scoring.kernel),
                               form="primal" if primal else "auto", device=device,
                               where=f"model_id {model_id}", weights=weights)
    out = []
    for b, load in stored:
        block = FeatureBlock(b["layer"], b["start"], b["stop"], b["layer"])
        if primal and b["form"] != "primal":
            matrix = kernel_matrix(features[:, b["start"]:b["stop"]], device=device)
            kernel = Kernel(matrix, "primal", n)
        else:
            kernel = Kernel(torch.from_numpy(load()), b["form"], n, weights)
        out.append((block, check_kernel(kernel, f"model_id {model_id}")))
    return out


def score_columns(store: Store, path: Any, name: str, ids: Sequence[int], scoring: ScoreSettings,
                  *, layout: Sequence[FeatureBlock], proj_dim: Any, num_grad_params: int,
                  device: Any, progress: bool) -> None:
    """Writes this rank's target columns (all of them in one process) of the scores file
    ``path`` of experiment ``name``: the mean over checkpoints ``ids`` of their scores (times
    the mean ``Q`` for TRAK's kernel, see :mod:`trak_fast.scoring.scores`)."""
    out = np.lib.format.open_memmap(path, mode="r+")
    n, t = out.shape
    c0, c1 = distributed.share(t)
    if c0 == c1:
        return
    k = store.settings["num_features"]
    if store.settings.get("curvature", "kernel") == "fisher":
        total = torch.zeros(n, c1 - c0, dtype=torch.float64)
        blocks = kernel_blocks(layout, k, scoring.kernel)
        for model_id in ids:
            rows = store.read_train_arrays(model_id)[0]          # [n, (1 + C) k]: [G | S_1 .. S_C]
            targets = np.load(store.targets_path(name, model_id))[c0:c1]
            fisher_scores(rows, None, targets, blocks, scoring.lambda_reg, device=device,
                          out=total, sampled_offset=k, chunks=store.settings.get("fisher_chunks", 1),
                          normalize=scoring.normalize)
        out[:, c0:c1] = (total / len(ids)).numpy()
        out.flush()
        return
    part = out if (c0, c1) == (0, t) else np.zeros((n, c1 - c0), dtype=np.float32)
    q_sum = torch.zeros(n, dtype=torch.float64)
    for model_id in ids:
        features, out_to_loss = store.read_train_arrays(model_id)
        targets = torch.from_numpy(np.load(store.targets_path(name, model_id))[c0:c1])
        add_checkpoint_scores(features, targets, checkpoint_kernels(store, model_id, scoring, layout, device),
                              scoring, out=part, proj_dim=proj_dim, num_grad_params=num_grad_params,
                              device=device, progress=progress)
        q_sum += torch.from_numpy(np.asarray(out_to_loss, dtype=np.float64))
    finish_ensemble(part, q_sum, len(ids))
    if part is not out:
        out[:, c0:c1] = part
    out.flush()
