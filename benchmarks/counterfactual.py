"""Counterfactual check: does removing a target's top TRAK proponents hurt it more than random removals?

    python benchmarks/counterfactual.py            # ~2-4 min on 2 shared cores (retrains cached)

For each of a handful of digits targets and each r:
  * remove the r training examples with the largest TRAK score for that target, retrain;
  * remove r random training examples, retrain;
and compare the target's margin with that of a model trained on the full training set from the same
seed (a paired difference, so seed noise mostly cancels). Each is repeated over a few seeds.
Reports the mean margin drop (full - removed; larger = the removal hurt the target more), its
standard error over (target, seed) pairs, and how often the target's prediction flips.

Scores: trak_fast defaults (relative damping) at M = 5, k = 512, from the LDS harness's cached
checkpoints (``benchmarks/lds.py``), so both scripts attribute the same models. Writes
``benchmarks/results/counterfactual.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds as harness  # noqa: E402  (benchmarks/lds.py: problems, caches, per-checkpoint scores)

from trak_fast.eval import lds as L  # noqa: E402


def margin_of(problem: harness.Problem, keep: torch.Tensor, seed: int, target: int, cache_dir: Path,
              tag: str) -> tuple:
    """``(margin, predicted_label)`` of ``target`` for a model trained on rows ``keep`` from ``seed`` (cached)."""
    path = cache_dir / f"{tag}_s{seed}.json"
    if path.exists():
        blob = json.loads(path.read_text())
        return blob["margins"][target] if isinstance(blob["margins"], list) else blob["margins"], blob["pred"]
    model = problem.fit(keep, seed)
    with torch.no_grad():
        logits = model(problem.x_target)
    margins = L.classification_margins(logits, problem.y_target).tolist()
    preds = logits.argmax(1).tolist()
    full = tag.startswith("full")
    blob = {"margins": margins if full else margins[target], "pred": preds if full else preds[target]}
    harness._atomic_save(lambda p: Path(p).write_text(json.dumps(blob)), path)
    return (margins[target], preds) if full else (margins[target], preds[target])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    problem = harness.load_problem("digits")
    cache = harness.Cache(problem)
    ckpts = cache.checkpoints(args.models)
    from trak_fast.scoring.kernel import DEFAULT_LAMBDA_REL

    scores, _ = harness.PerCheckpoint(cache, ckpts).ensemble(args.proj_dim, args.models, DEFAULT_LAMBDA_REL)
    cache_dir = cache.dir / "counterfactual"
    n = problem.n
    all_rows = torch.arange(n)
    targets = list(range(args.targets))
    records = []
    t0 = time.time()
    for seed in args.seeds:
        for t in targets:
            m_full, preds = margin_of(problem, all_rows, 5000 + seed, t, cache_dir, "full")
            full_pred = preds[t]
            for r in args.r:
                top = torch.argsort(scores[:, t], descending=True)[:r]
                rand = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 * seed + 100 * t + r))[:r]
                for method, removed in (("trak", top), ("random", rand)):
                    keep = torch.ones(n, dtype=torch.bool)
                    keep[removed] = False
                    # The cache key names the removed rows, so new scores never reuse old retrains.
                    removed_key = hashlib.sha1(removed.sort().values.numpy().tobytes()).hexdigest()[:12]
                    m, pred = margin_of(problem, keep.nonzero().squeeze(1), 5000 + seed, t, cache_dir,
                                        f"{method}_t{t}_r{r}_{removed_key}")
                    records.append({"seed": seed, "target": t, "r": r, "method": method, "margin_full": m_full,
                                    "margin_removed": m, "drop": m_full - m,
                                    "flipped": bool(full_pred == int(problem.y_target[t]) and pred != full_pred)})
        print(f"  seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    summary = []
    for r in args.r:
        for method in ("trak", "random"):
            drops = np.array([x["drop"] for x in records if x["r"] == r and x["method"] == method])
            flips = np.array([x["flipped"] for x in records if x["r"] == r and x["method"] == method])
            summary.append({"r": r, "method": method, "mean_margin_drop": float(drops.mean()),
                            "stderr": float(drops.std(ddof=1) / np.sqrt(len(drops))),
                            "fraction_flipped": float(flips.mean()), "pairs": int(len(drops))})
    mean_full = float(np.mean([x["margin_full"] for x in records if x["method"] == "trak"]))
    return {"settings": {"targets": targets, "r": args.r, "seeds": args.seeds, "M": args.models,
                         "proj_dim": args.proj_dim, "lambda_rel": DEFAULT_LAMBDA_REL, "n_train": n},
            "mean_full_margin": mean_full, "summary": summary, "records": records,
            "seconds": round(time.time() - t0, 1)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, default=10, help="the first N held-out digits targets (default 10)")
    p.add_argument("--r", type=int, nargs="+", default=[20, 100], help="examples removed (default 20 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="retraining seeds (default 0 1 2)")
    p.add_argument("--models", type=int, default=5, help="checkpoints for the TRAK scores (default 5)")
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=harness.RESULTS / "counterfactual.json")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nmean margin of the {len(report['settings']['targets'])} targets with the full training set: "
          f"{report['mean_full_margin']:.2f}")
    print(f"{'r':>5} {'removed':<8} {'mean margin drop':>17} {'stderr':>8} {'flipped':>8}")
    for row in report["summary"]:
        print(f"{row['r']:>5} {row['method']:<8} {row['mean_margin_drop']:>17.3f} {row['stderr']:>8.3f} "
              f"{row['fraction_flipped']:>8.2f}")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
