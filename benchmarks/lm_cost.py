"""The cost of the language-model defaults against raw per-example gradients (issue 24).

``trak_fast.attribute(task="language_modeling")`` at its defaults (factored k x k features, k from the width,
per-layer Fisher with 4 rows per sequence) against the gradient dot product on raw per-example
gradients (``featurize(proj_dim=None)`` of the train loss and the targets' margins, then one
product): the models, data and code of ``bench_lm_lds.py`` (its cached full-data checkpoint 0),
the two timed alternately ``--repeat`` times after one untimed call each, 1 torch thread.
Prints the seconds and the ratio (minimum and median over the repeats) and writes JSON.

    python benchmarks/lm_cost.py                        # small and medium -> results/lm_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def alternate(methods: dict, repeat: int, ours: str, base: str) -> dict:
    """``{"seconds": {name: [s, ...]}, "ratio_min", "ratio_median"}``: each callable of
    ``methods`` once untimed (first calls, allocator, module probing), then all of them in turn
    ``repeat`` times; the ratios are ``ours``'s time over ``base``'s."""
    seconds = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeat):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    a, b = seconds[ours], seconds[base]
    return {"seconds": seconds, "ratio_min": min(a) / min(b),
            "ratio_median": statistics.median(a) / statistics.median(b)}


def write_report(report: dict, out: Path) -> dict:
    """``report`` with the date, machine and torch version added, written to ``out`` as JSON."""
    from kernel_choice import cpu_model
    report = {**report, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
                         f"thread(s), load average {os.getloadavg()[0]:.1f} at the end",
              "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


def measure(size: str, repeat: int) -> dict:
    import bench_lm_lds as B
    import lm_methods as L
    import trak_fast

    args = B.parse_args(["--size", size])
    train_ids, target_ids, digest = B.make_corpus(args.n_train, args.n_targets, args.seq_len)
    full = B.Models(args, train_ids, target_ids, digest).full(0)
    model = B.make_model(size, args.seq_len, 0)
    train = B.batches(train_ids, args.prompt_len, args.batch_size_features)
    targets = B.batches(target_ids, args.prompt_len, args.batch_size_features)

    def defaults():
        return trak_fast.attribute(model, [full["sd"]], train, targets, task="language_modeling",
                                   seed=0, progress=False)

    def grad_dot():
        ck = L.Checkpoint(model, full["sd"], 0, train, targets, full["exp_avg_sq"])
        return L.grad_dot_scores(ck, "raw")[0]

    timed = alternate({"trak_fast defaults": defaults, "grad dot (raw)": grad_dot}, repeat,
                      "trak_fast defaults", "grad dot (raw)")
    return {"size": size, "model_params": sum(p.numel() for p in model.parameters()),
            "n_train": args.n_train, "n_targets": args.n_targets, **timed}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small", "medium"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "lm_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(size, args.repeat) for size in args.sizes]
    print(f"{'size':8s} {'defaults s (min/median)':>24s} {'grad dot s (min/median)':>24s} "
          f"{'ratio min':>10s} {'ratio median':>13s}")
    for r in rows:
        ours, base = r["seconds"]["trak_fast defaults"], r["seconds"]["grad dot (raw)"]
        print(f"{r['size']:8s} {min(ours):11.2f} / {statistics.median(ours):5.2f}       "
              f"{min(base):11.2f} / {statistics.median(base):5.2f}       "
              f"{r['ratio_min']:10.2f} {r['ratio_median']:13.2f}")
    return write_report({"rows": rows}, args.out)


if __name__ == "__main__":
    main()
