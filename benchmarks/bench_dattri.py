"""dattri 0.3.0's TRAKAttributor on the digits MLP, with its own projector and with
trak_fast's drop-in (trak_fast.compat.dattri.use_trak_fast), each stage timed in one run.

    python benchmarks/bench_dattri.py [--n-train 1000 --n-targets 100 --proj-dim 512 --hidden 128]

Stages: `cache` (per-example gradients of the training set, their projection and the
X^T X inverse) and `attribute` (the same for the targets, and the scores). Also reports
the Pearson r of each run's scores with dattri's own (seed 0), next to the r of two dattri
seeds. Prints a table and writes JSON (default benchmarks/results/bench_dattri_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-targets", type=int, default=100)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import dattri
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    import trak_fast
    from bench_project import cpu_flags, cpu_model
    from trak_fast.compat import dattri as td
    from trak_fast.eval.digits import load_digits, make_mlp, train

    xtr, ytr, xte, yte = load_digits(n_train=args.n_train, n_targets=args.n_targets)
    model = train(make_mlp(hidden=args.hidden), xtr, ytr, epochs=20)
    n_params = sum(p.numel() for p in model.parameters())

    def loss_f(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def prob_f(params, data):
        return torch.exp(-loss_f(params, data))

    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size, shuffle=False)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=args.batch_size, shuffle=False)

    def run(proj_type, seed, ours):
        task = AttributionTask(loss_func=loss_f, model=model, checkpoints=model.state_dict())
        attributor = TRAKAttributor(task=task, correct_probability_func=prob_f, device="cpu",
                                    projector_kwargs={"proj_dim": args.proj_dim, "proj_seed": seed,
                                                      "proj_type": proj_type, "proj_max_batch_size": 32,
                                                      "device": "cpu"})
        with (td.use_trak_fast() if ours else _nothing()):
            start = time.perf_counter()
            attributor.cache(train_loader)
            t_cache = time.perf_counter() - start
            start = time.perf_counter()
            scores = attributor.attribute(test_loader)
            t_attr = time.perf_counter() - start
        return scores, t_cache, t_attr

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    reference, _, _ = run("normal", 0, False)
    rows = []
    for proj_type, ours in (("normal", False), ("normal", True), ("rademacher", False), ("rademacher", True),
                            ("sjlt", True)):
        scores, t_cache, t_attr = run(proj_type, 1, ours)
        rows.append({"proj_type": proj_type, "projector": "trak_fast" if ours else "dattri",
                     "cache_s": t_cache, "attribute_s": t_attr, "total_s": t_cache + t_attr,
                     "r_vs_dattri_normal_seed0": corr(scores, reference)})
    for r in rows:
        base = next(b for b in rows if b["proj_type"] == r["proj_type"] and b["projector"] == "dattri") \
            if r["proj_type"] != "sjlt" else None
        r["speedup_vs_dattri_same_type"] = None if base is None else base["total_s"] / r["total_s"]

    meta = {"machine": f"{cpu_model()} ({cpu_flags()})", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dattri": getattr(dattri, "__version__", "0.3.0"),
            "trak_fast": trak_fast.__version__, "n_train": args.n_train, "n_targets": args.n_targets,
            "proj_dim": args.proj_dim, "n_params": n_params, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# {meta['machine']}, {meta['threads']} threads; digits MLP ({n_params} parameters), "
          f"n_train={args.n_train}, n_targets={args.n_targets}, proj_dim={args.proj_dim}")
    print("| proj_type | projector | cache (s) | attribute (s) | total (s) | speedup | r vs dattri normal seed 0 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = "-" if r["speedup_vs_dattri_same_type"] is None else f"{r['speedup_vs_dattri_same_type']:.1f}x"
        print(f"| {r['proj_type']} | {r['projector']} | {r['cache_s']:.2f} | {r['attribute_s']:.2f} | "
              f"{r['total_s']:.2f} | {speed} | {r['r_vs_dattri_normal_seed0']:.3f} |")
    out = args.out or os.path.join(HERE, "results", "bench_dattri_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
