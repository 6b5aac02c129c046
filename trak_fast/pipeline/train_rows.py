"""The store's train rows: the resumable featurize loop and the checks that every checkpoint's
rows hold the same examples (see :mod:`trak_fast.pipeline.store` for the files)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..features.loop import batches
from ..features.model import Batch
from . import distributed
from .fingerprint import check_rows, example_hashes, signature
from .store import Store


class _WrongLength(Exception):
    """The train loader yielded more or fewer than train_size examples."""


def reference_examples(store: Store, exclude: Optional[int] = None
                       ) -> Tuple[Optional[int], Optional[np.ndarray]]:
    """``(model_id, hashes [n, 2])`` every checkpoint's train rows are compared with: the
    lowest fully featurized model_id, else the lowest with any rows (``None`` if none).

    One reference, not all checkpoints: each is checked against it, which makes all of
    them agree, and memory stays ``16 n`` bytes however many checkpoints there are.
    """
    models = store.metadata["models"]
    ids = sorted((not entry["featurized"], int(i)) for i, entry in models.items()
                 if int(i) != exclude)
    for _, model_id in ids:
        hashes = store.read_train_examples(model_id)
        if hashes is not None and hashes[:, 1].any():
            return model_id, hashes
    return None, None


def check_same_train_examples(store: Store, ids: Sequence[int]) -> None:
    """All checkpoints' train rows hold the same examples (jobs that ran at the same time
    could only check each other's rows finished by then)."""
    reference_id, reference = reference_examples(store)
    if reference is None:
        return
    for model_id in ids:
        hashes = None if model_id == reference_id else store.read_train_examples(model_id)
        if hashes is not None:
            check_rows(hashes, reference, where=f"the train rows of model_id {model_id}",
                       first_row=0, against=f"those of model_id {reference_id}",
                       start_over="Featurize one of them again from scratch (delete its "
                       "model_<id> folder) with the loader of the other.")


def write_train_features(store: Store, featurizer, train: Iterable[Batch], model_id: int, *,
                         feature_dtype: str, progress: bool) -> None:
    """The resumable loop of :meth:`trak_fast.TRAK.featurize` (the caller holds the lock).

    Every batch is fingerprinted (:mod:`trak_fast.pipeline.fingerprint`) before any work and
    compared with the finished rows it covers (a resume) and with the finished rows of
    every other checkpoint; its hashes are written before its ``finished`` marks. If the
    loader turns out to yield more or fewer than ``train_size`` examples, the rows this
    call wrote are un-marked: which examples they hold is unknown.
    """
    features, out_to_loss, finished, examples = store.open_train_arrays(model_id, feature_dtype)
    own = np.array(examples)
    own[np.asarray(finished) == 0] = 0
    reference_id, reference = reference_examples(store, exclude=model_id)
    start_over = (f"To featurize model_id {model_id} from scratch, delete "
                  f"{str(store.model_dir(model_id))!r} and call featurize again "
                  "(or use a new save_dir).")
    n, row = store.settings["train_size"], 0
    written: List[Tuple[int, int]] = []      # row ranges this call marked finished
    try:
        for item in batches(train, "train", featurizer.task, progress=progress,
                            desc=f"featurizing model {model_id}"):
            row, size = item.first_row, item.size
            if row + size > n:
                raise _WrongLength(f"train yielded more than train_size = {n} examples "
                                   f"({row + size} by batch {item.index})")
            row += size
            if not distributed.owns(item.index):     # another rank's batch (b -> rank b % W)
                continue
            start, stop = item.first_row, row
            hashes = example_hashes(item.batch, item.where)
            now = signature(item.batch)
            check_rows(hashes, own[start:stop], where=item.where, first_row=start,
                       against=f"the rows an earlier featurize of model_id {model_id} "
                       "wrote (resume)", reference=own, start_over=start_over, now=now)
            if reference is not None:
                check_rows(hashes, reference[start:stop], where=item.where, first_row=start,
                           against=f"the train examples of model_id {reference_id}",
                           reference=reference, now=now, start_over="Every checkpoint must "
                           "see the train examples in the order of the first one.")
            if finished[start:stop].all():
                continue
            phi, q = featurizer.compute(item.batch, size, where=item.where)
            features[start:stop] = phi.cpu().numpy()
            out_to_loss[start:stop] = q.cpu().numpy()
            features.flush()
            out_to_loss.flush()
            examples[start:stop] = hashes
            examples.flush()
            written.append((start, stop))
            finished[start:stop] = 1       # only after the rows themselves are written
            finished.flush()
        if row != n:
            raise _WrongLength(f"train yielded {row} examples, the store expects train_size = {n}"
                               + (" (an empty loader?)" if row == 0 else ""))
    except _WrongLength as exc:
        for start, stop in written:         # marks first: a finished row always has its hash
            finished[start:stop] = 0
        finished.flush()
        for start, stop in written:
            examples[start:stop] = 0
        examples.flush()
        kept = " The rows written by this call are not kept." if written else ""
        raise ValueError(f"{exc}.{kept}") from None
