"""The README's TRAKer migration snippet, run exactly as written (trak 0.3.2), against trak_fast.

The snippet is read from README.md (the fenced block that builds ``TrakFastProjector``) and
executed with a ``model`` and ``train_set`` in scope; the TRAKer it builds then runs trak's
unchanged workflow. Its scores must equal ``attribute(..., ensemble="trak")`` with the same
projection seed and ``lambda_reg`` (the same features and the same formula), up to float32
rounding. Before the fix the snippet kept trak's ``use_half_precision=True`` and
``lambda_reg=0``, which gives noise (the README explains why).
"""
import copy
import logging
import re
from pathlib import Path

import torch

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute

import trak  # noqa: E402,F401  (traker==0.3.2 is a test dependency)

README = Path(__file__).resolve().parents[1] / "README.md"
N_TRAIN, N_TARGETS = 300, 20


def migration_snippet():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matching = [b for b in blocks if "TrakFastProjector(grad_dim" in b and "TRAKer(" in b]
    assert len(matching) == 1, "README must hold exactly one TRAKer migration snippet"
    return matching[0]


def test_migration_snippet_as_written_matches_attribute_trak_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # TRAKer writes to ./trak_results by default
    logging.getLogger("TRAK").setLevel(logging.ERROR)
    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    model = digits.train(digits.make_mlp(16, seed=0), x, y, epochs=8, seed=0)
    checkpoint = copy.deepcopy(model.state_dict())
    namespace = {"model": copy.deepcopy(model), "train_set": torch.utils.data.TensorDataset(x, y)}
    exec(compile(migration_snippet(), "README.md snippet", "exec"), namespace)
    traker, projector = namespace["traker"], namespace["projector"]

    traker.load_checkpoint(checkpoint, model_id=0)
    for batch in digits.batches(x, y, 100):
        traker.featurize(batch, num_samples=len(batch[1]))
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", checkpoint, 0, num_targets=N_TARGETS)
    for batch in digits.batches(xt, yt, 10):
        traker.score(batch, num_samples=len(batch[1]))
    scores = torch.tensor(traker.finalize_scores("targets")[:].copy()).double()

    expected = attribute(model, [checkpoint], digits.batches(x, y, 100), digits.batches(xt, yt, 10),
                         proj_dim=projector.proj_dim, seed=projector.seed, ensemble="trak",
                         lambda_reg=traker.lambda_reg, progress=False).double()
    assert projector.proj_dim > N_TRAIN      # the case where trak's defaults give noise
    assert torch.isfinite(scores).all() and scores.abs().max() > 0
    assert ((scores - expected).norm() / expected.norm()).item() < 1e-3
