"""LDS harness: how well do attribution scores predict counterfactual retraining?

    python benchmarks/lds.py                 # full run (digits + breast_cancer), ~20 min on 2 cores
    python benchmarks/lds.py --quick         # smoke run, ~2 min

The Linear Datamodeling Score (TRAK paper, eq. 5; math in ``trak_fast/lds.py``):
m subsets S_j of size alpha*n, a model retrained on each (same recipe, own seed), each target's
margin f(z; theta_{S_j}); the prediction is sum_{i in S_j} tau(z)_i; LDS is the Spearman correlation
across subsets, averaged over targets, with a bootstrap 95% interval over targets.

Side by side, on the same checkpoints (M models trained on the full train set, seeds 0..M-1) and the
same subsets:
  * trak_fast TRAK (``trak_fast.attribute``, defaults) for M in {1,2,5,10,20}, k in {512, 2048, none};
  * the same with kind="sparse", nnz in {1, 4, 16}, at M = 5, k = 512 (--sparse-nnz);
  * trak_fast with the factored per-layer projection (``projection="factored"``, ``--factored``:
    16x16, 8x32, 32x8, 32x16 per layer; total k 544, 528, 576, 1088 on the 64-128-10 MLP) at M in {1, 5};
  * MadryLab trak 0.3.2 (CPU path: BasicProjector, float32, its default lambda = 0) at M = 5, k = 512;
  * a gradient dot product (TracIn-style, one checkpoint-averaged step): mean_m Q_m,i <g_m,i, g_m,z>;
  * random scores (the floor, ~0);
and a damping sweep (lambda_rel, at k = 512 and M in {1, 5, 20}) on digits, on a second data set
(scikit-learn's breast_cancer: 569 tumours, 30 features, 2 classes; also embedded, no download) and
on a second architecture for digits (MLP 64-64-64-10), the last two also with the M = 5 comparison.

Everything expensive is cached under ``benchmarks/cache/lds/`` (gitignored): checkpoints, each
(subset, retrain) margin vector, and each method's scores (keyed by its settings and a hash of the
trak_fast sources), so a rerun only computes what changed. Writes ``benchmarks/results/lds.json``,
``lds.md`` and ``lds.png`` (``lds_quick.*`` with --quick).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import trak_fast
from trak_fast.eval import digits
from trak_fast.eval import lds as L

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "lds"
RESULTS = HERE / "results"


# ----------------------------------------------------------------------------------------------
# Problems: a fixed train/target split, a model family and a training recipe.
# ----------------------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_target: torch.Tensor
    y_target: torch.Tensor
    model_kwargs: dict
    recipe: dict = field(default_factory=lambda: dict(epochs=30, lr=1e-2, batch_size=64, weight_decay=1e-4))

    def make_model(self, seed: int) -> nn.Module:
        kwargs = dict(self.model_kwargs)
        if kwargs.pop("depth", 1) == 2:   # a second architecture: 64-64-64-10, two hidden layers
            torch.manual_seed(seed)
            h = kwargs["hidden"]
            return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
        return digits.make_mlp(seed=seed, **kwargs)

    def fit(self, idx: torch.Tensor, seed: int) -> nn.Module:
        """The recipe (``trak_fast.digits.train``) on the training rows ``idx``, init and order from ``seed``."""
        return digits.train(self.make_model(seed), self.x_train[idx], self.y_train[idx], seed=seed, **self.recipe)

    def describe(self) -> str:
        model = self.make_model(0)
        sizes = [m.in_features for m in model if isinstance(m, nn.Linear)] + [model[-1].out_features]
        return f"MLP {'-'.join(map(str, sizes))} ({sum(p.numel() for p in model.parameters())} parameters)"

    @property
    def n(self) -> int:
        return len(self.x_train)

    @property
    def key(self) -> str:
        desc = json.dumps([self.name, self.n, len(self.x_target), self.model_kwargs, self.recipe], sort_keys=True)
        return f"{self.name}-{hashlib.sha1(desc.encode()).hexdigest()[:10]}"

    def batches(self, which: str, batch_size: int = 100):
        x, y = (self.x_train, self.y_train) if which == "train" else (self.x_target, self.y_target)
        return digits.batches(x, y, batch_size)


def load_problem(name: str) -> Problem:
    if name == "digits":
        x, y, xt, yt = digits.load_digits(1000, 100, split_seed=0)
        return Problem("digits", x, y, xt, yt, dict(hidden=128))
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.int64)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        train, target = order[:400], order[400:500]
        mean, std = x[train].mean(0), x[train].std(0)   # standardise with train statistics only
        x = (x - mean) / std
        return Problem("breast_cancer", x[train], y[train], x[target], y[target],
                       dict(hidden=64, in_features=30, classes=2))
    if name == "digits_deep":
        x, y, xt, yt = digits.load_digits(1000, 100, split_seed=0)
        return Problem("digits_deep", x, y, xt, yt, dict(hidden=64, depth=2))
    raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}")


PROBLEMS = ("digits", "breast_cancer", "digits_deep")


@torch.no_grad()
def target_margins(model: nn.Module, problem: Problem) -> torch.Tensor:
    return L.classification_margins(model(problem.x_target), problem.y_target)


def retrain_seed(subset: int, retrain: int) -> int:
    # Disjoint from the checkpoint seeds 0..999 and unique per (subset, retrain) up to 10^5 subsets.
    return 1_000_000 + 100_000 * retrain + subset


# ----------------------------------------------------------------------------------------------
# The on-disk cache: checkpoints, per-(subset, retrain) margins, scores.
# ----------------------------------------------------------------------------------------------
class Cache:
    def __init__(self, problem: Problem, root: Path = CACHE):
        self.problem = problem
        self.dir = root / problem.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.computed = {"checkpoints": 0, "retrains": 0, "scores": 0}

    def checkpoints(self, count: int) -> List[Dict[str, torch.Tensor]]:
        """State dicts of ``count`` models trained on the full train set with seeds 0..count-1."""
        out = []
        for seed in range(count):
            path = self.dir / "checkpoints" / f"seed{seed}.pt"
            if path.exists():
                out.append(torch.load(path))
                continue
            model = self.problem.fit(torch.arange(self.problem.n), seed)
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _atomic_save(lambda p: torch.save(sd, p), path)
            self.computed["checkpoints"] += 1
            out.append(sd)
        return out

    def margins(self, masks: torch.Tensor, retrains: int, tag: str, *, progress: bool = True) -> torch.Tensor:
        """``[m, retrains, n_targets]`` margins of models retrained on each subset (computed if missing)."""
        m = masks.shape[0]
        out = torch.empty(m, retrains, len(self.problem.x_target), dtype=torch.float64)
        t0, done = time.time(), 0
        for j in range(m):
            for r in range(retrains):
                path = self.dir / "margins" / tag / f"j{j:05d}_r{r}.npy"
                if path.exists():
                    out[j, r] = torch.from_numpy(np.load(path))
                    continue
                model = self.problem.fit(masks[j].nonzero().squeeze(1), retrain_seed(j, r))
                margin = target_margins(model, self.problem)
                _atomic_save(lambda p: np.save(p, margin.numpy()), path)
                out[j, r] = margin
                done += 1
                self.computed["retrains"] += 1
            if progress and done and (j + 1) % 20 == 0:
                print(f"  retrained {done} models ({time.time() - t0:.0f} s)", flush=True)
        return out

    def scores(self, key: dict, compute: Callable[[], torch.Tensor]) -> tuple:
        """Cached ``compute()``; returns ``(scores, seconds_it_took_when_computed)``."""
        desc = json.dumps({**key, "src": _source_hash(), "problem": self.problem.key}, sort_keys=True)
        path = self.dir / "scores" / f"{hashlib.sha1(desc.encode()).hexdigest()[:16]}.pt"
        if path.exists():
            blob = torch.load(path)
            return blob["scores"], blob["seconds"]
        t0 = time.perf_counter()
        scores = compute().detach().to(torch.float64).cpu()
        seconds = time.perf_counter() - t0
        _atomic_save(lambda p: torch.save({"scores": scores, "seconds": seconds, "key": desc}, p), path)
        self.computed["scores"] += 1
        return scores, seconds


def _atomic_save(write: Callable[[str], None], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_SOURCE_HASH: Optional[str] = None


def _source_hash() -> str:
    """Hash of the trak_fast sources that produce scores (not the demo/LDS code), for score-cache keys."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha1()
        root = Path(trak_fast.__file__).parent
        for path in sorted(root.rglob("*.py")):
            if path.name not in ("demo.py", "lds.py", "__main__.py"):
                h.update(path.read_bytes())
        _SOURCE_HASH = h.hexdigest()[:12]
    return _SOURCE_HASH


# ----------------------------------------------------------------------------------------------
# Methods: each returns scores [n_train, n_targets] (larger = raises the target's margin more).
# ----------------------------------------------------------------------------------------------
def trak_fast_scores(problem: Problem, ckpts: Sequence[dict], proj_dim: Optional[int], **kwargs) -> torch.Tensor:
    """``trak_fast.attribute`` in one call (used to check the per-checkpoint path below)."""
    from trak_fast.pipeline.attribute import attribute

    return attribute(problem.make_model(0), list(ckpts), problem.batches("train"), problem.batches("target"),
                     proj_dim=proj_dim, seed=0, progress=False, **kwargs)


class PerCheckpoint:
    """trak_fast's building blocks, one checkpoint at a time, with each ``S_m`` cached on disk.

    ``S_m = Phi_m (K_m + lambda_m I)^-1 Phi_m(targets)^T`` and ``Q_m`` do not depend on the other
    checkpoints, so every ensemble size M is a prefix average (``tau_M = mean_{m<M} S_m *
    mean_{m<M} Q_m``, exactly what ``attribute`` computes), and each damping value reuses the
    features: featurize once per (k, checkpoint), solve once per lambda.
    """

    def __init__(self, cache: Cache, ckpts: Sequence[dict], kernel_weights: str):
        self.cache, self.ckpts, self.problem = cache, ckpts, cache.problem
        self.kernel_weights = kernel_weights

    def _path(self, k: Optional[int], model_id: int, lam: float, factored: Optional[tuple] = None) -> Path:
        desc = {"k": k, "m": model_id, "lam": lam, "src": _source_hash(), "w": self.kernel_weights}
        if factored is not None:
            desc["factored"] = list(factored)
        desc = json.dumps(desc, sort_keys=True)
        return self.cache.dir / "per_checkpoint" / f"{hashlib.sha1(desc.encode()).hexdigest()[:16]}.pt"

    def get(self, k: Optional[int], model_id: int, lambdas: Sequence[float],
            factored: Optional[tuple] = None) -> Dict[float, dict]:
        """``{lambda: {"S": [n, T], "Q": [n], "seconds": featurize + solve time}}`` for one checkpoint.

        ``factored=(k_out, k_in)``: the factored per-layer projection (``projection="factored"``)
        instead of a dense one; ``k`` is then unused (the total k follows from the layers).
        """
        from trak_fast.features.loop import featurize
        from trak_fast.scoring.kernel import compute_kernel, kernel_row_weights
        from trak_fast.scoring.scores import model_scores

        out, missing = {}, []
        for lam in lambdas:
            path = self._path(k, model_id, lam, factored)
            if path.exists():
                out[lam] = torch.load(path)
            else:
                missing.append(lam)
        if not missing:
            return out
        model, sd = self.problem.make_model(0), self.ckpts[model_id]
        how = dict(proj_dim=k) if factored is None else \
            dict(proj_dim=None, projection="factored", factored_dims=tuple(factored))
        t0 = time.perf_counter()
        phi, q = featurize(model, sd, self.problem.batches("train"), seed=0, model_id=model_id, **how)
        phi_t = featurize(model, sd, self.problem.batches("target"), seed=0, model_id=model_id,
                          out_to_loss=False, what="targets", **how).phi
        kernel = compute_kernel(phi, weights=kernel_row_weights(self.kernel_weights, q))
        shared = time.perf_counter() - t0
        for lam in missing:
            t1 = time.perf_counter()
            s = model_scores(phi, phi_t, kernel, lambda_reg=lam, relative_lambda=True)
            blob = {"S": s, "Q": q.to(torch.float64), "seconds": shared + time.perf_counter() - t1}
            blob["num_features"] = phi.shape[1]
            _atomic_save(lambda p: torch.save(blob, p), self._path(k, model_id, lam, factored))
            self.cache.computed["scores"] += 1
            out[lam] = blob
        return out

    def ensemble(self, k: Optional[int], M: int, lam: float, factored: Optional[tuple] = None) -> tuple:
        """``(tau [n, T] float64, seconds)`` for the first ``M`` checkpoints."""
        parts = [self.get(k, m, [lam], factored)[lam] for m in range(M)]
        s = torch.stack([p["S"].to(torch.float64) for p in parts]).mean(0)
        q = torch.stack([p["Q"] for p in parts]).mean(0)
        return s * q[:, None], sum(p["seconds"] for p in parts)


def per_example_margin_grads(problem: Problem, sd: dict, x: torch.Tensor, y: torch.Tensor):
    """Full per-example gradients ``[B, p]`` of the margin and ``Q = 1 - p(y|x)`` for one checkpoint."""
    from torch.func import functional_call, grad, vmap

    model = problem.make_model(0)
    params = {k: v.detach() for k, v in sd.items()}

    def margin(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return L.classification_margins(logits, yi.view(1)).squeeze(0)

    g = vmap(grad(margin), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1).to(torch.float64)
    with torch.no_grad():
        prob = torch.softmax(functional_call(model, params, (x,)).double(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return flat, 1.0 - prob


def grad_dot_scores(problem: Problem, ckpts: Sequence[dict]) -> torch.Tensor:
    """``tau[i, t] = mean_m Q_m,i <grad f_m(z_i), grad f_m(z_t)>``: the first-order effect of one SGD step
    on z_i (its loss gradient is -Q_i grad f(z_i)) on the target margin, averaged over checkpoints."""
    total = 0.0
    for sd in ckpts:
        g_train, q = per_example_margin_grads(problem, sd, problem.x_train, problem.y_train)
        g_target, _ = per_example_margin_grads(problem, sd, problem.x_target, problem.y_target)
        total = total + q[:, None] * (g_train @ g_target.T)
    return total / len(ckpts)


def reference_trak_scores(problem: Problem, ckpts: Sequence[dict], proj_dim: Optional[int],
                          lambda_rel: float = 1.0, kernel_weights: str = "none") -> torch.Tensor:
    """A direct float64 implementation of the estimator, to cross-check the pipeline.

    phi = P_m^T grad f (P from ``trak_fast.projection_matrix``, seed ``model_seed(0, m)``, scaled 1/sqrt(k)),
    W = diag(1, Q or Q^2 for kernel_weights none / out_to_loss / fisher), lambda = lambda_rel *
    tr(Phi^T W Phi) / n, S_m = Phi (Phi^T W Phi + lambda I)^-1 Phi_t^T, solved in the primal form;
    tau = mean_m S_m * mean_m Q_m (row-wise).
    """
    s_sum, q_sum = 0.0, 0.0
    for m, sd in enumerate(ckpts):
        g_train, q = per_example_margin_grads(problem, sd, problem.x_train, problem.y_train)
        g_target, _ = per_example_margin_grads(problem, sd, problem.x_target, problem.y_target)
        if proj_dim is not None:
            P = trak_fast.projection_matrix(g_train.shape[1], proj_dim, seed=trak_fast.model_seed(0, m),
                                            dtype=torch.float64)
            g_train, g_target = g_train @ P, g_target @ P
        w = {"none": torch.ones_like(q), "out_to_loss": q, "fisher": q * q}[kernel_weights]
        kernel = g_train.T @ (w[:, None] * g_train)
        lam = lambda_rel * torch.trace(kernel) / len(g_train)
        damped = kernel + lam * torch.eye(kernel.shape[0], dtype=torch.float64)
        s_sum = s_sum + g_train @ torch.linalg.solve(damped, g_target.T)
        q_sum = q_sum + q
    return (s_sum / len(ckpts)) * (q_sum / len(ckpts))[:, None]


def trak032_scores(problem: Problem, ckpts: Sequence[dict], proj_dim: int, lambda_reg: float = 0.0) -> torch.Tensor:
    """MadryLab trak 0.3.2, CPU path (BasicProjector, float32), its classification task and ensembling."""
    import logging

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = problem.make_model(0)   # TRAKer loads checkpoints into this object; it is ours to lose
    grad_dim = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as save_dir:
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", dtype=torch.float32)
        traker = TRAKer(model=model, task="image_classification", train_set_size=problem.n, save_dir=save_dir,
                        device="cpu", projector=projector, proj_dim=proj_dim, use_half_precision=False,
                        lambda_reg=lambda_reg, logging_level=logging.ERROR)
        for model_id, sd in enumerate(ckpts):
            traker.load_checkpoint(sd, model_id=model_id)
            for x, y in problem.batches("train"):
                traker.featurize(batch=(x, y), num_samples=len(x))
        traker.finalize_features()
        for model_id, sd in enumerate(ckpts):
            traker.start_scoring_checkpoint("lds", sd, model_id=model_id, num_targets=len(problem.x_target))
            for x, y in problem.batches("target"):
                traker.score(batch=(x, y), num_samples=len(x))
        scores = traker.finalize_scores("lds")
    return torch.as_tensor(np.asarray(scores), dtype=torch.float64)


def random_scores(problem: Problem, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(problem.n, len(problem.x_target), generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def evaluate(rows: list, masks: torch.Tensor, margins: torch.Tensor, row: dict, scores: torch.Tensor,
             seconds: float, n_boot: int) -> dict:
    if not torch.isfinite(scores).all():
        raise RuntimeError(f"non-finite scores from {row}")
    result = L.lds(scores, masks, margins, n_boot=n_boot)
    out = {**row, **result.as_dict(), "score_seconds": round(seconds, 3)}
    rows.append(out)
    print(f"  {row['dataset']:<14} {row['method']:<22} M={row.get('M')!s:<4} k={_fmt_k(row.get('proj_dim')):<5} "
          f"lambda={row.get('lambda')!s:<6} LDS {result}  ({seconds:.1f} s)", flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    from trak_fast.scoring.kernel import DEFAULT_LAMBDA_REL

    torch.set_num_threads(args.threads)
    report: dict = {"settings": vars(args).copy(), "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "default_lambda_rel": DEFAULT_LAMBDA_REL,
                    "datasets": {}, "checks": {}, "rows": []}
    rows = report["rows"]
    for name in args.datasets:
        problem = load_problem(name)
        cache = Cache(problem)
        t0 = time.time()
        print(f"[{name}] n={problem.n} targets={len(problem.x_target)} m={args.m} alpha={args.alpha} "
              f"retrains={args.retrains}  cache: {cache.dir}", flush=True)
        masks = L.draw_subsets(problem.n, args.m, args.alpha, seed=args.subset_seed)
        margins_all = cache.margins(masks, args.retrains, f"a{args.alpha}_s{args.subset_seed}")
        margins = margins_all.mean(dim=1)
        first = name == args.datasets[0]
        models = args.models if first else [args.headline_models]
        ckpts = cache.checkpoints(max(models + args.sweep_models))
        acc = [digits.accuracy(_load(problem, sd), problem.x_target, problem.y_target) for sd in ckpts]
        # How repeatable is retraining itself? The Spearman, across subsets, between two retrains'
        # margins (per target, averaged): noise that no attribution method can predict.
        noise = None
        if args.retrains >= 2:
            noise = torch.nanmean(L.spearman(margins_all[:, 0].T, margins_all[:, 1].T)).item()
        single = margins_all[:, 0]
        report["datasets"][name] = {"n_train": problem.n, "n_targets": len(problem.x_target),
                                    "model": problem.describe(),
                                    "checkpoint_accuracy_mean": float(np.mean(acc)),
                                    "retrain_vs_retrain_spearman": noise,
                                    "setup_seconds": round(time.time() - t0, 1)}
        print(f"  checkpoints' target accuracy {np.mean(acc):.3f}; setup {time.time() - t0:.0f} s"
              + (f"; retrain-vs-retrain Spearman {noise:.3f}" if noise is not None else ""), flush=True)
        per_ckpt = PerCheckpoint(cache, ckpts, args.kernel_weights)

        def ev(row: dict, scores: torch.Tensor, seconds: float) -> None:
            row = {"dataset": name, **row}
            evaluate(rows, masks, margins, row, scores, seconds, args.n_boot)
            if args.retrains >= 2:   # the same scores against single-retrain margins, for comparison
                rows[-1]["lds_single_retrain"] = L.lds(scores, masks, single, n_boot=10).mean

        def cached(row: dict, fn: Callable[[], torch.Tensor]) -> None:
            ev(row, *cache.scores(row, fn))

        dims = args.dims if first else [512]
        for k in dims:
            for M in models:
                ev({"group": "main", "method": "trak_fast", "M": M, "proj_dim": k, "lambda": DEFAULT_LAMBDA_REL},
                   *per_ckpt.ensemble(k, M, DEFAULT_LAMBDA_REL))
        for dims_f in (args.factored if first else []):
            # The factored per-layer projection (hook path), next to dense k at the same M.
            k_total = per_ckpt.get(None, 0, [DEFAULT_LAMBDA_REL], dims_f)[DEFAULT_LAMBDA_REL]["num_features"]
            for M in args.factored_models:
                ev({"group": "main", "method": f"trak_fast factored {dims_f[0]}x{dims_f[1]}", "M": M,
                    "proj_dim": k_total, "lambda": DEFAULT_LAMBDA_REL, "factored_dims": list(dims_f)},
                   *per_ckpt.ensemble(None, M, DEFAULT_LAMBDA_REL, dims_f))
        if first:
            # The per-checkpoint path must be exactly what a user gets from trak_fast.attribute.
            direct = trak_fast_scores(problem, ckpts[:2], 512,
                                      kernel_weights=args.kernel_weights).to(torch.float64)
            blocks, _ = per_ckpt.ensemble(512, 2, DEFAULT_LAMBDA_REL)
            report["checks"]["attribute_vs_per_checkpoint_max_rel_diff"] = \
                ((direct - blocks).abs().max() / blocks.abs().max()).item()
            print(f"  check: attribute() vs per-checkpoint path, max rel diff "
                  f"{report['checks']['attribute_vs_per_checkpoint_max_rel_diff']:.1e}", flush=True)
        if args.reference and first:
            cached({"group": "check", "method": "float64 reference", "M": 5, "proj_dim": 512, "lambda": DEFAULT_LAMBDA_REL,
                    "kernel_weights": args.kernel_weights},
                   lambda: reference_trak_scores(problem, ckpts[:5], 512, DEFAULT_LAMBDA_REL,
                                                 args.kernel_weights))
        if not args.skip_trak032:
            for M in (args.trak032_models if first else [args.headline_models]):
                cached({"group": "main", "method": "trak 0.3.2", "M": M, "proj_dim": 512, "lambda": 0.0},
                       lambda: trak032_scores(problem, ckpts[:M], 512))
        if first:   # kind="sparse" at the headline M, k = 512 (Rademacher's row is above)
            for nnz in args.sparse_nnz:
                cached({"group": "main", "method": f"trak_fast sparse nnz={nnz}", "M": args.headline_models,
                        "proj_dim": 512, "lambda": DEFAULT_LAMBDA_REL, "kernel_weights": args.kernel_weights},
                       lambda: trak_fast_scores(problem, ckpts[:args.headline_models], 512, kind="sparse",
                                                nnz=nnz, kernel_weights=args.kernel_weights).to(torch.float64))
        for M in sorted({1, args.headline_models} & set(models)):
            cached({"group": "main", "method": "gradient dot product", "M": M, "proj_dim": None, "lambda": None},
                   lambda: grad_dot_scores(problem, ckpts[:M]))
        cached({"group": "main", "method": "random", "M": None, "proj_dim": None, "lambda": None},
               lambda: random_scores(problem))
        for m in range(max(args.sweep_models)):   # featurize each checkpoint once for the whole sweep
            per_ckpt.get(512, m, args.lambdas)
        for M in args.sweep_models:
            for lam in args.lambdas:
                ev({"group": "damping", "method": "trak_fast", "M": M, "proj_dim": 512, "lambda": lam},
                   *per_ckpt.ensemble(512, M, lam))
        report["datasets"][name]["computed"] = dict(cache.computed)
    return report


def _load(problem: Problem, sd: dict) -> nn.Module:
    model = problem.make_model(0)
    model.load_state_dict(sd)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def _fmt_k(k) -> str:
    return "none" if k is None else str(k)


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [f"# LDS (m = {s['m']} subsets, alpha = {s['alpha']}, {s['retrains']} retrain(s) per subset, "
             f"95% bootstrap CI over targets)", ""]
    for name, info in report["datasets"].items():
        lines.append(f"- **{name}**: {info['model']}, n = {info['n_train']}, {info['n_targets']} targets, "
                     f"checkpoint accuracy "
                     f"{info['checkpoint_accuracy_mean']:.3f}"
                     + (f", retrain-vs-retrain Spearman {info['retrain_vs_retrain_spearman']:.3f}"
                        if info["retrain_vs_retrain_spearman"] is not None else ""))
    single = s["retrains"] >= 2
    lines += ["", f"trak_fast rows: kernel_weights={s.get('kernel_weights')!r} (K = Phi^T W Phi). "
              "lambda: relative damping lambda_rel for trak_fast (lambda = lambda_rel * tr(Phi^T W Phi) / n); "
              "absolute for trak 0.3.2 (its default, 0). Scoring time: featurize + kernel + solve on this "
              "machine's 2 shared CPU cores (from the first, uncached run)"
              + (f"; {s['machine_note']}" if s.get("machine_note") else "") + ".", "",
              "## Methods", "",
              "| data set | method | M | k | lambda | LDS | 95% CI |" + (" LDS, 1 retrain |" if single else "")
              + " scoring time (s) |",
              "|---|---|---|---|---|---|---|" + ("---|" if single else "") + "---|"]
    for r in report["rows"]:
        if r["group"] not in ("main", "check"):
            continue
        lines.append(f"| {r['dataset']} | {r['method']} | {r['M'] if r['M'] is not None else '-'} | "
                     f"{_fmt_k(r['proj_dim']) if r['method'] not in ('random',) else '-'} | "
                     f"{r['lambda'] if r['lambda'] is not None else '-'} | {r['lds']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] |"
                     + (f" {r['lds_single_retrain']:.3f} |" if single else "")
                     + f" {r['score_seconds']:.1f} |")
    checks = report.get("checks", {})
    if checks:
        lines += ["", "Checks: " + ", ".join(f"{k} = {v:.2e}" for k, v in checks.items())]
    damping = [r for r in report["rows"] if r["group"] == "damping"]
    if damping:
        columns = [(name, M) for name in report["datasets"] for M in s["sweep_models"]]
        lines += ["", "## Damping sweep (trak_fast, k = 512, lambda = lambda_rel * tr(Phi^T Phi) / n; "
                      "LDS with 95% CI; best per column in bold)", "",
                  "| lambda_rel | " + " | ".join(f"{name}, M = {M}" for name, M in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        best = {c: max((r["lds"] for r in damping if (r["dataset"], r["M"]) == c), default=None) for c in columns}
        for lam in s["lambdas"]:
            cells = []
            for c in columns:
                r = next((r for r in damping if (r["dataset"], r["M"]) == c and r["lambda"] == lam), None)
                text = f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r else "-"
                cells.append(f"**{text}**" if r and r["lds"] == best[c] else text)
            lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    name = report["settings"]["datasets"][0]
    rows = [r for r in report["rows"] if r["group"] == "main" and r["dataset"] == name]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for k, color in zip(report["settings"]["dims"], ["tab:blue", "tab:orange", "tab:green"]):
        pts = sorted((r["M"], r["lds"], r["ci_low"], r["ci_high"]) for r in rows
                     if r["method"] == "trak_fast" and r["proj_dim"] == k)
        if pts:
            M, y, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(M, y, yerr=[y - lo, hi - y], marker="o", capsize=3, color=color,
                        label=f"trak_fast, k = {_fmt_k(k)}")
    for method, marker, color in [("trak 0.3.2", "s", "tab:red"), ("gradient dot product", "^", "tab:purple")]:
        pts = sorted((r["M"], r["lds"], r["ci_low"], r["ci_high"]) for r in rows if r["method"] == method)
        if pts:
            M, y, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(M, y, yerr=[y - lo, hi - y], marker=marker, linestyle="--", capsize=3, color=color,
                        label=method + (" (k = 512)" if method.startswith("trak ") else ""))
    rnd = [r for r in rows if r["method"] == "random"]
    if rnd:
        ax.axhline(rnd[0]["lds"], color="grey", linestyle=":", label="random scores")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20])
    ax.set_xticklabels(["1", "2", "5", "10", "20"])
    ax.set_xlabel("models in the ensemble (M)")
    ax.set_ylabel("LDS (mean over targets, 95% CI)")
    s = report["settings"]
    ax.set_title(f"LDS on {name} (m = {s['m']} subsets of {s['alpha']:g} n)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _factored_dims(text: str) -> tuple:
    try:
        k_out, k_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KOUTxKIN such as 16x16, got {text!r}") from None
    return k_out, k_in


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(PROBLEMS), choices=PROBLEMS,
                   help="the first gets the full method comparison; the others the M = 5 comparison and sweep")
    p.add_argument("--m", type=int, default=100, help="number of subsets (default 100)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    p.add_argument("--retrains", type=int, default=2, help="models averaged per subset (default 2)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--models", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="ensemble sizes M")
    p.add_argument("--dims", type=lambda v: None if v.lower() == "none" else int(v), nargs="+",
                   default=[512, 2048, None], help="projection dims k ('none': raw gradients)")
    p.add_argument("--factored", type=_factored_dims, nargs="*", default=[(16, 16), (8, 32), (32, 8), (32, 16)],
                   metavar="KOUTxKIN", help="factored per-layer projections (projection='factored', "
                   "factored_dims=(k_out, k_in)) scored on the first data set, e.g. 16x16")
    p.add_argument("--factored-models", type=int, nargs="+", default=[1, 5], help="M for the factored rows")
    p.add_argument("--trak032-models", type=int, nargs="+", default=[1, 5, 10], help="M for MadryLab trak 0.3.2")
    p.add_argument("--skip-trak032", action="store_true", help="leave MadryLab trak out")
    p.add_argument("--reference", action="store_true", help="add the float64 reference estimator (M=5, k=512)")
    p.add_argument("--sweep-models", type=int, nargs="+", default=[1, 5, 20], help="M values of the damping sweep")
    p.add_argument("--headline-models", type=int, default=5,
                   help="M of the second data sets' method comparison (default 5)")
    p.add_argument("--lambdas", type=float, nargs="*", default=[1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--sparse-nnz", type=int, nargs="*", default=[1, 4, 16],
                   help="nnz values of kind='sparse' rows (M = --headline-models, k = 512)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--kernel-weights", default=None, choices=["none", "out_to_loss", "fisher"],
                   help="kernel row weights of the trak_fast rows (default: trak_fast's default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are tiny, and on a shared machine extra "
                        "threads spin-wait: 2 threads made one retrain 50x slower under load)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 subsets, M in {1, 5}, k = 512, short sweep")
    p.add_argument("--machine-note", default="", help="a note on the machine's state for lds.md (e.g. load)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.kernel_weights is None:
        from trak_fast.settings import DEFAULT_KERNEL_WEIGHTS
        args.kernel_weights = DEFAULT_KERNEL_WEIGHTS
    if args.quick:
        args.m, args.models, args.dims, args.lambdas, args.sweep_models = 20, [1, 5], [512], [0.1, 1.0], [5]
        args.factored, args.factored_models = args.factored[:1], [5]
    for flag in ("m", "retrains", "headline_models"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.models = sorted(set(args.models) | {args.headline_models})
    t0 = time.time()
    report = run(args)
    report["total_seconds"] = round(time.time() - t0, 1)
    report["settings"]["out"] = str(report["settings"]["out"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "lds_quick" if args.quick else "lds"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(report, args.out / f"{stem}.md")
    write_plot(report, args.out / f"{stem}.png")
    print((args.out / f"{stem}.md").read_text())
    print(f"total {report['total_seconds']:.0f} s; wrote {args.out}/{stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
