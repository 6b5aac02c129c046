"""TRAKer + TrakFastProjector under trak's defaults vs the docs/migrating.md snippet's settings.

Digits MLP 64-16-10 (1,210 parameters), n = 1,000 train examples, 50 targets, k = 2048 > n,
one checkpoint, CPU. For each TRAKer configuration: the mean over targets of the Pearson
correlation of its score column with ``trak_fast.attribute(..., ensemble="trak")`` (same seed,
same lambda_reg), and the relative error. Prints a table and writes
benchmarks/results/migration_defaults.json.
"""
import copy
import json
import logging
import time
from pathlib import Path
import tempfile

import torch
from trak import TRAKer

from trak_fast.eval import digits
from trak_fast.pipeline.attribute import attribute
from trak_fast.compat.trak import TrakFastProjector

N, T, K = 1000, 50, 2048


def traker_scores(model, checkpoint, x, y, xt, yt, seed, half, lam):
    num_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=copy.deepcopy(model), task="image_classification", train_set_size=N,
                        projector=TrakFastProjector(num_params, K, seed, "rademacher", "cpu"),
                        device="cpu", save_dir=save_dir, use_half_precision=half, lambda_reg=lam,
                        logging_level=logging.ERROR)
        traker.load_checkpoint(checkpoint, model_id=0)
        for batch in digits.batches(x, y, 100):
            traker.featurize(batch, num_samples=len(batch[1]))
        traker.finalize_features()
        traker.start_scoring_checkpoint("t", checkpoint, 0, num_targets=T)
        for batch in digits.batches(xt, yt, 25):
            traker.score(batch, num_samples=len(batch[1]))
        return torch.tensor(traker.finalize_scores("t")[:].astype("float64"))


def column_r(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).mean().item()


def main():
    torch.set_num_threads(1)
    x, y, xt, yt = digits.load_digits(N, T)
    model = digits.train(digits.make_mlp(16, seed=0), x, y, epochs=10, seed=0)
    checkpoint = copy.deepcopy(model.state_dict())
    rows = []
    for half, lam in [(True, 0.0), (False, 0.0), (True, 1e-2), (False, 1e-2)]:
        start = time.time()
        ours = attribute(model, [checkpoint], digits.batches(x, y, 100), digits.batches(xt, yt, 25),
                         proj_dim=K, seed=0, ensemble="trak", lambda_reg=lam, progress=False).double()
        s0 = traker_scores(model, checkpoint, x, y, xt, yt, 0, half, lam)
        s1 = traker_scores(model, checkpoint, x, y, xt, yt, 1, half, lam)
        rows.append({"use_half_precision": half, "lambda_reg": lam,
                     "r_vs_attribute_trak": column_r(s0, ours),
                     "rel_err_vs_attribute_trak": ((s0 - ours).norm() / ours.norm()).item(),
                     "r_seed0_vs_seed1": column_r(s0, s1), "seconds": time.time() - start})
    print(f"n = {N}, k = {K}, t = {T}, digits MLP 64-16-10, CPU (loaded shared 2-core machine)")
    print("| use_half_precision | lambda_reg | r vs attribute(trak) | rel. err | r seed 0 vs 1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['use_half_precision']} | {r['lambda_reg']} | {r['r_vs_attribute_trak']:.3f} | "
              f"{r['rel_err_vs_attribute_trak']:.2e} | {r['r_seed0_vs_seed1']:.3f} |")
    out = Path(__file__).parent / "results" / "migration_defaults.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"n": N, "k": K, "t": T, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
