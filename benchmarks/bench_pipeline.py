"""trak_fast's pipeline against MadryLab trak 0.3.2, stage by stage, on the same problem.

Problem: the digits CNN (``trak_fast.digits.make_cnn``, ~0.28M parameters), n = 1000 train and
100 target examples, M = 2 checkpoints, k = 1024, batches of 100. trak runs its own path for
the device (on the CPU: ``BasicProjector``, normal entries, float32, ``use_half_precision=False``);
trak_fast uses ``TRAK`` with a store in a temporary directory and the same kind of matrix.

Stages: featurize (train features and Q for both checkpoints), finalize (trak: ``X (X^T X)^-1``;
trak_fast: the kernels), score (target features for both checkpoints + the ensemble's scores).
Agreement: mean over targets of the Pearson correlation of the score columns, trak_fast vs
trak seed 0 and trak seed 1 vs trak seed 0 (both in trak's ensemble mode, same lambda).

    python benchmarks/bench_pipeline.py [--device cuda] [--out benchmarks/results/...json]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trak_fast.eval import digits  # noqa: E402
from trak_fast.pipeline.trak import TRAK  # noqa: E402

N_TRAIN, N_TARGETS, NUM_MODELS, PROJ_DIM, BATCH = 1000, 100, 2, 1024, 100
LAMBDA = 1e-3     # absolute, trak's convention (its default 0 is singular here: k > n)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_trak(model, checkpoints, train, targets, device, seed, save_dir, kind=None):
    """trak 0.3.2 on its own default path; with ``kind``, a BasicProjector of that kind."""
    from trak import TRAKer
    times = {}
    projector = None
    if kind is not None:
        from trak.projectors import BasicProjector, ProjectionType
        proj_type = ProjectionType.rademacher if kind == "rademacher" else ProjectionType.normal
        num_params = sum(p.numel() for p in model.parameters())
        projector = BasicProjector(grad_dim=num_params, proj_dim=PROJ_DIM, seed=seed, proj_type=proj_type,
                                   device=device, dtype=torch.float32)
    traker = TRAKer(model=copy.deepcopy(model).to(device), task="image_classification",
                    train_set_size=N_TRAIN, save_dir=save_dir, device=device, proj_dim=PROJ_DIM,
                    projector_seed=seed, use_half_precision=False, lambda_reg=LAMBDA,
                    logging_level=logging.ERROR, projector=projector)
    start = time.perf_counter()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for x, y in train:
            traker.featurize((x.to(device), y.to(device)), num_samples=len(y))
    sync(device)
    times["featurize"] = time.perf_counter() - start
    start = time.perf_counter()
    traker.finalize_features()
    sync(device)
    times["finalize"] = time.perf_counter() - start
    start = time.perf_counter()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint("targets", checkpoint, model_id, num_targets=N_TARGETS)
        for x, y in targets:
            traker.score((x.to(device), y.to(device)), num_samples=len(y))
    scores = torch.tensor(traker.finalize_scores("targets")[:].copy())
    sync(device)
    times["score"] = time.perf_counter() - start
    return times, scores, traker.projector.__class__.__name__


def run_trak_fast(model, checkpoints, train, targets, device, kind, save_dir, nnz=4):
    times = {}
    trak = TRAK(save_dir, model, train_size=N_TRAIN, proj_dim=PROJ_DIM, kind=kind, nnz=nnz, seed=0,
                device=device, progress=False)
    start = time.perf_counter()
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize(checkpoint, train, model_id=model_id)
    sync(device)
    times["featurize"] = time.perf_counter() - start
    start = time.perf_counter()
    trak.finalize()
    sync(device)
    times["finalize"] = time.perf_counter() - start
    start = time.perf_counter()
    for model_id, checkpoint in enumerate(checkpoints):
        trak.featurize_targets("targets", checkpoint, targets, model_id=model_id)
    scores = torch.from_numpy(trak.score("targets", ensemble="trak", lambda_reg=LAMBDA).copy())
    sync(device)
    times["score"] = time.perf_counter() - start
    mean_scores = torch.from_numpy(trak.score("targets", overwrite=True).copy())
    return times, scores, mean_scores


def column_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per checkpoint")
    parser.add_argument("--kind", choices=["default", "rademacher", "gaussian", "sparse"], default="default",
                        help="matrix kind on both sides (default: trak's own default for the device, "
                             "normal on the CPU, and the same kind for trak_fast; sparse: trak_fast "
                             "kind='sparse' against trak's default path, which has no sparse kind)")
    parser.add_argument("--nnz", type=int, default=4, help="nnz for --kind sparse (default 4)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_pipeline_<device>.json)")
    args = parser.parse_args(argv)
    device = args.device
    # trak uses normal entries on the CPU and Rademacher on a GPU; trak_fast uses the same kind.
    kind = ("gaussian" if device == "cpu" else "rademacher") if args.kind == "default" else args.kind
    trak_kind = None if args.kind in ("default", "sparse") else args.kind

    x, y, xt, yt = digits.load_digits(N_TRAIN, N_TARGETS)
    checkpoints = []
    for seed in range(NUM_MODELS):
        model = digits.make_cnn(seed=seed)
        digits.train(model, x, y, epochs=args.epochs, seed=seed)
        checkpoints.append({k: v.to(device) for k, v in copy.deepcopy(model.state_dict()).items()})
    model = model.to(device)
    train, targets = digits.batches(x, y, BATCH), digits.batches(xt, yt, BATCH)
    num_params = sum(p.numel() for p in model.parameters())

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fast_times, fast_scores, fast_mean = run_trak_fast(model, checkpoints, train, targets, device,
                                                           kind, os.path.join(tmp, "fast"), args.nnz)
        trak_times, trak_scores, projector = run_trak(model, checkpoints, train, targets, device, 0,
                                                      os.path.join(tmp, "trak0"), trak_kind)
        _, trak_scores_1, _ = run_trak(model, checkpoints, train, targets, device, 1,
                                       os.path.join(tmp, "trak1"), trak_kind)
    for name, times in (("trak 0.3.2", trak_times), ("trak_fast", fast_times)):
        results[name] = dict(times, total=sum(times.values()))

    agreement = {
        "trak_fast_vs_trak_seed0": column_correlation(fast_scores, trak_scores),
        "trak_seed1_vs_trak_seed0": column_correlation(trak_scores_1, trak_scores),
        "trak_fast_mean_ensemble_vs_trak_seed0": column_correlation(fast_mean, trak_scores),
    }
    print(f"\nTRAK pipeline, {device}: CNN {num_params} params, n={N_TRAIN}, targets={N_TARGETS}, "
          f"M={NUM_MODELS}, k={PROJ_DIM}, batch={BATCH}, torch threads={torch.get_num_threads()}")
    print(f"trak 0.3.2 projector: {projector} (float32); trak_fast kind: {kind}\n")
    print(f"{'stage':<11}{'trak 0.3.2 (s)':>16}{'trak_fast (s)':>16}{'speedup':>10}")
    for stage in ("featurize", "finalize", "score", "total"):
        a, b = results["trak 0.3.2"][stage], results["trak_fast"][stage]
        print(f"{stage:<11}{a:>16.2f}{b:>16.2f}{a / b:>9.1f}x")
    print("\nagreement (mean Pearson r over targets):")
    for key, value in agreement.items():
        print(f"  {key:<40}{value:.3f}")

    report = {
        "device": device, "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "num_params": num_params,
        "load_average_at_end": os.getloadavg(),
        "n_train": N_TRAIN, "n_targets": N_TARGETS, "num_models": NUM_MODELS,
        "proj_dim": PROJ_DIM, "batch_size": BATCH, "lambda_reg": LAMBDA, "kind": kind,
        "nnz": args.nnz if kind == "sparse" else None,
        "trak_projector": projector, "seconds": results,
        "speedup_total": results["trak 0.3.2"]["total"] / results["trak_fast"]["total"],
        "agreement": agreement,
    }
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else \
        Path(__file__).resolve().parent / "results" / (
            f"bench_pipeline_{device.split(':')[0]}" + ("" if args.kind == "default" else f"_{args.kind}") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
