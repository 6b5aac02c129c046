"""Which kernel row weights and damping give the best LDS? (chooses DEFAULT_KERNEL_WEIGHTS)

    python benchmarks/kernel_weights.py            # all problems, ~5 min when the LDS cache is warm

For every problem of the LDS harness (``benchmarks/lds.py``: the same subsets, retrained
margins and checkpoints, shared through its cache) plus wine (scikit-learn's, embedded, MLP
13-32-3; never used to choose anything), at k = 512: featurize each checkpoint once, then for
``kernel_weights`` in {none, out_to_loss, fisher} and lambda_rel in a sweep, the scores of
``trak_fast.kernel.compute_kernel(phi, weights=...)`` + ``trak_fast.score.model_scores`` (the
code ``attribute`` runs), ensembled over M checkpoints, and their LDS with a bootstrap 95%
interval. Also the gradient dot product, and ``kernel="full"`` against ``"per_layer"`` on
``projection="per_layer"`` features. Writes results/kernel_weights.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds as H                                     # noqa: E402  (the harness: problems, cache)

from trak_fast import featurize                     # noqa: E402
from trak_fast.eval import lds as L                      # noqa: E402
from trak_fast.scoring.kernel import compute_kernel, compute_kernels, kernel_blocks, kernel_row_weights  # noqa: E402
from trak_fast.scoring.scores import block_scores, model_scores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> H.Problem:
    if name != "wine":
        return H.load_problem(name)
    from sklearn.datasets import load_wine
    data = load_wine()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, target = order[:128], order[128:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return H.Problem("wine", x[train], y[train], x[target], y[target],
                     dict(hidden=32, in_features=13, classes=3))


def run_problem(name: str, models: list, lambdas: list, weights: list, k: int, n_boot: int) -> list:
    problem = load(name)
    cache = H.Cache(problem)
    masks = L.draw_subsets(problem.n, 100, 0.5, seed=0)
    margins = cache.margins(masks, 2, "a0.5_s0", progress=False).mean(1)
    ckpts = cache.checkpoints(max(models))
    feats = []
    for m, sd in enumerate(ckpts):
        model = problem.make_model(0)
        f = featurize(model, sd, problem.batches("train"), proj_dim=k, seed=0, model_id=m)
        t = featurize(model, sd, problem.batches("target"), proj_dim=k, seed=0, model_id=m,
                      out_to_loss=False, what="targets").phi
        feats.append((f.phi, f.out_to_loss, t))
    rows = []
    for M in models:
        q_mean = torch.stack([q.double() for _, q, _ in feats[:M]]).mean(0)
        dot = torch.stack([(q.double()[:, None] * phi.double()) @ t.double().T
                           for phi, q, t in feats[:M]]).mean(0)
        r = L.lds(dot, masks, margins, n_boot=n_boot)
        rows.append({"problem": name, "M": M, "method": "gradient dot product", **r.as_dict()})
        print(f"  {name:<14} M={M:<3} gradient dot product          LDS {r}", flush=True)
        for w in weights:
            for lam in lambdas:
                s = 0
                for phi, q, t in feats[:M]:
                    kernel = compute_kernel(phi, weights=kernel_row_weights(w, q))
                    s = s + model_scores(phi, t, kernel, lambda_reg=lam, relative_lambda=True).double()
                r = L.lds((s / M) * q_mean[:, None], masks, margins, n_boot=n_boot)
                rows.append({"problem": name, "M": M, "method": "trak_fast", "kernel_weights": w,
                             "lambda_rel": lam, **r.as_dict()})
                print(f"  {name:<14} M={M:<3} {w:<12} lambda_rel={lam:<5} LDS {r}", flush=True)
    return rows


def run_per_layer(name: str, M: int, k: int, lam: float, n_boot: int) -> list:
    """``kernel="full"`` against ``"per_layer"`` on the same ``projection="per_layer"`` features."""
    problem = load(name)
    cache = H.Cache(problem)
    masks = L.draw_subsets(problem.n, 100, 0.5, seed=0)
    margins = cache.margins(masks, 2, "a0.5_s0", progress=False).mean(1)
    ckpts = cache.checkpoints(M)
    rows = []
    for kernel in ("full", "per_layer"):
        s, q_sum, seconds = 0, 0, 0.0
        for m, sd in enumerate(ckpts):
            model = problem.make_model(0)
            f = featurize(model, sd, problem.batches("train"), proj_dim=k, seed=0, model_id=m,
                          projection="per_layer")
            t = featurize(model, sd, problem.batches("target"), proj_dim=k, seed=0, model_id=m,
                          projection="per_layer", out_to_loss=False, what="targets").phi
            t0 = time.perf_counter()
            kernels = compute_kernels(f.phi, kernel_blocks(f.layout, k, kernel),
                                      weights=kernel_row_weights("out_to_loss", f.out_to_loss))
            out = torch.zeros(f.phi.shape[0], t.shape[0])
            block_scores(f.phi, t, kernels, lambda_reg=lam, relative_lambda=True, out=out)
            seconds += time.perf_counter() - t0
            s, q_sum = s + out.double(), q_sum + f.out_to_loss.double()
        r = L.lds((s / M) * (q_sum / M)[:, None], masks, margins, n_boot=n_boot)
        blocks = kernel_blocks(f.layout, k, kernel)
        rows.append({"problem": name, "M": M, "method": f"per_layer projection, kernel={kernel}",
                     "kernel_weights": "out_to_loss", "lambda_rel": lam,
                     "blocks": [b.stop - b.start for b in blocks],
                     "kernel_entries": sum((b.stop - b.start) ** 2 for b in blocks),
                     "kernel_and_solve_seconds": round(seconds, 3), **r.as_dict()})
        print(f"  {name:<14} M={M:<3} per_layer features, kernel={kernel:<9} blocks "
              f"{rows[-1]['blocks']} LDS {r} ({seconds:.2f} s kernel+solve)", flush=True)
    return rows


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# LDS by kernel row weights and damping (k = {report['k']})", "",
             f"Machine: {report['machine']}; torch {report['torch']}. 100 half subsets, 2 retrains each.", ""]
    for problem in dict.fromkeys(r["problem"] for r in report["rows"]):
        for M in dict.fromkeys(r["M"] for r in report["rows"] if r["problem"] == problem):
            rows = [r for r in report["rows"] if r["problem"] == problem and r["M"] == M]
            lines += [f"## {problem}, M = {M}", "", "| kernel_weights | lambda_rel | LDS [95% CI] |",
                      "|---|---|---|"]
            best = max(r["lds"] for r in rows)
            for r in rows:
                cell = f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                cell = f"**{cell}**" if r["lds"] == best else cell
                lines.append(f"| {r.get('kernel_weights', r['method'])} | {r.get('lambda_rel', '-')} | {cell} |")
            lines.append("")
    lines += ["## kernel='full' against 'per_layer' (projection='per_layer', out_to_loss, lambda_rel 3, M = 5)",
              "", "| problem | kernel | blocks k_l | kernel entries | kernel + solve s | LDS [95% CI] |",
              "|---|---|---|---|---|---|"]
    for r in report.get("per_layer", []):
        lines.append(f"| {r['problem']} | {r['method'].split('=')[-1]} | {r['blocks']} | "
                     f"{r['kernel_entries']} | {r['kernel_and_solve_seconds']} | "
                     f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["digits", "breast_cancer", "digits_deep", "wine"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.3, 1.0, 3.0, 10.0, 30.0])
    parser.add_argument("--weights", nargs="+", default=["none", "out_to_loss", "fisher"])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    report = {"k": args.k, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": []}
    for name in args.problems:
        models = [1, 5] if name == "digits" else [5]
        report["rows"] += run_problem(name, models, args.lambdas, args.weights, args.k, args.n_boot)
        report["per_layer"] = report.get("per_layer", []) + run_per_layer(name, 5, args.k, 3.0, args.n_boot)
    report["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel_weights.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, RESULTS / "kernel_weights.md")
    print(f"wrote {RESULTS / 'kernel_weights.md'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
