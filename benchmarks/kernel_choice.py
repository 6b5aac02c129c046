"""The CPU kernel choice (issue 25, part 1): the register kernel against tiles + GEMM over shapes.

For float32 Rademacher projections, times both CPU kernels (forced with TRAK_FAST_CPU_KERNEL) and
a GEMM with P materialized ahead, over B x n x k, for 1 and 2 threads and for each instruction
set this CPU can take (AVX-512 where present, then AVX2 + FMA via TRAK_FAST_DISABLE_AVX512=1),
each combination in a child process (the thread count and the ISA switches are read once).
Shapes whose P has more than --max-entries entries are skipped (the GEMM baseline needs P in
memory; the tile kernel's generation alone takes seconds there) and listed as skipped.

    python benchmarks/kernel_choice.py                      # -> results/kernel_choice.json
    python benchmarks/kernel_choice.py --quick              # a few shapes, to try it
    python benchmarks/kernel_choice.py --small-batch-goal   # B = 1 vs 64 per row -> results/kernel_choice_small_batch_goal.json
    python benchmarks/kernel_choice.py --large-batches      # B 256..1024, n = 2^20, k 1024 and 4096
                                                            # -> results/kernel_choice_large_batches_all_registers.json

The default rule is the register kernel at every B (so a call gives the same bits whatever its
batch size, thread count and instruction set). The report gives, per machine kind (ISA and
thread count), the worst ratio of the default's kernel to the better kernel over every measured
shape (the issue's bound: <= 1.10 everywhere), and the same for the earlier batch thresholds
(registers when B <= t), for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 128)
NS = (2**16, 2**20, 2**23)
KS = (256, 1024, 2048, 4096)
LARGE_BATCHES = (256, 384, 512, 1024)
LARGE_KS = (1024, 4096)
HEADLINE = (64, 2**20, 1024)  # the shape with the materialized-P GEMM baseline

_CHILD = r"""
import json, os, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import trak_fast
shapes = json.loads(sys.argv[2]); repeat = int(sys.argv[3])
def timed(fn):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - start)
    return best, out
rows = []
for B, n, k, gemm in shapes:
    g = torch.randn(B, n)
    row = {"B": B, "n": n, "k": k}
    outs = {}
    for path in ("registers", "tiles"):
        os.environ["TRAK_FAST_CPU_KERNEL"] = path
        row[path + "_s"], outs[path] = timed(lambda: trak_fast.project(g, k, seed=0))
    os.environ.pop("TRAK_FAST_CPU_KERNEL")
    row["bitwise_equal"] = bool(torch.equal(outs["registers"], outs["tiles"]))
    row["rel_diff"] = float((outs["registers"] - outs["tiles"]).norm() / outs["tiles"].norm())
    if gemm:
        p = trak_fast.projection_matrix(n, k, seed=0)
        row["gemm_s"] = timed(lambda: g @ p)[0]
        del p
    rows.append(row)
    print(json.dumps(row), flush=True)
"""


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    except (OSError, IndexError):
        return "unknown"
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl") if f" {f}" in flags)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_kinds():
    """``(name, env)`` of each instruction-set path this CPU can run."""
    kinds = []
    if "avx512f" in cpu_flags():
        kinds.append(("avx512", {}))
    kinds.append(("avx2+fma", {"TRAK_FAST_DISABLE_AVX512": "1"}))
    return kinds


def run(args) -> dict:
    shapes = [(b, n, k, args.gemm_all or (b, n, k) == args.headline)
              for n in args.ns for k in args.ks for b in args.batches if n * k <= args.max_entries]
    skipped = [(b, n, k) for n in args.ns for k in args.ks for b in args.batches
               if n * k > args.max_entries]
    results = {}
    for kind, env in machine_kinds():
        for threads in args.threads:
            name = f"{kind}, {threads} thread(s)"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(threads), json.dumps(shapes),
                                   str(args.repeat)], env={**os.environ, **env},
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            results[name] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            print(f"{name}: {len(results[name])} shapes in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"meta": {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(),
                     "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "repeat": args.repeat, "max_entries": args.max_entries,
                     "default_rule": DEFAULT_RULE},
            "skipped": skipped, "results": results, "rules": rules(results)}


DEFAULT_RULE = "registers at every B (the default)"
BOUND = 1.10  # the bound on the default kernel's time over the better kernel's


def rules(results: dict) -> dict:
    """Worst ratio (rule's kernel / better kernel) per machine kind: the default rule, and the
    earlier batch thresholds for comparison."""
    candidates = {DEFAULT_RULE: lambda r: True}
    for t in (0, 64, 128, 256, 384, 512):
        candidates[f"registers when B <= {t}"] = lambda r, t=t: r["B"] <= t
    out = {}
    for rule, registers in candidates.items():
        worst = {}
        for name, rows in results.items():
            ratios = [(r["registers_s"] if registers(r) else r["tiles_s"]) / min(r["registers_s"], r["tiles_s"])
                      for r in rows]
            worst[name] = max(ratios) if ratios else None
        measured = [v for v in worst.values() if v is not None]
        out[rule] = {"worst_ratio": worst, "max": max(measured) if measured else None}
    return out


def print_report(report: dict) -> None:
    print(f"# {report['meta']['cpu']} ({report['meta']['flags']}), min of {report['meta']['repeat']}")
    for name, rows in report["results"].items():
        print(f"\n## {name}: registers / tiles (time ratio; < 1: registers faster)")
        ns_ks = sorted({(r["n"], r["k"]) for r in rows})
        batches = sorted({r["B"] for r in rows})
        print("| n, k | " + " | ".join(f"B={b}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for n, k in ns_ks:
            cells = []
            for b in batches:
                r = next((r for r in rows if (r["B"], r["n"], r["k"]) == (b, n, k)), None)
                cells.append("-" if r is None else f"{r['registers_s'] / r['tiles_s']:.2f}")
            print(f"| 2^{n.bit_length() - 1}, {k} | " + " | ".join(cells) + " |")
        for r in rows:
            if "gemm_s" in r and (r["B"], r["n"], r["k"]) == HEADLINE:
                print(f"B=64, n=2^20, k=1024: registers {r['registers_s'] / r['gemm_s']:.2f}x, tiles "
                      f"{r['tiles_s'] / r['gemm_s']:.2f}x the materialized GEMM")
    print("\n| rule | worst ratio to the better kernel, per machine kind | max |")
    print("|---|---|---|")
    for rule, v in sorted(report["rules"].items(), key=lambda kv: (kv[1]["max"] is None, kv[1]["max"])):
        cells = ", ".join(f"{k}: {x:.2f}" for k, x in v["worst_ratio"].items() if x is not None)
        print(f"| {rule} | {cells} | {v['max']:.2f} |" if v["max"] is not None else f"| {rule} | - | - |")
    default = report["rules"][DEFAULT_RULE]["max"]
    if default is not None:
        verdict = "within" if default <= BOUND else "OUTSIDE"
        print(f"\ndefault rule: worst {default:.2f}x the better kernel, {verdict} the {BOUND:.2f} bound")


_GOAL_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import trak_fast
n, k, repeat = 2**23, 2048, int(sys.argv[2])
out = {}
for B in (1, 64):
    g = torch.randn(B, n)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter(); trak_fast.project(g, k, seed=0); best = min(best, time.perf_counter() - start)
    out[B] = best
print(json.dumps(out))
"""


def small_batch_goal(args) -> dict:
    """The small-batch goal: B = 1's time per row at most 3x B = 64's, n = 2^23, k = 2048, the
    default kernel, 2 threads, on each ISA path."""
    rows = {}
    for kind, env in machine_kinds():
        proc = subprocess.run([sys.executable, "-c", _GOAL_CHILD, "2", str(args.repeat)],
                              env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind}: {proc.stderr[-2000:]}")
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = seconds["1"] / (seconds["64"] / 64)
        rows[kind] = {"default_kernel_seconds": seconds, "B1_per_row_over_B64_per_row": ratio}
        print(f"{kind}: B = 1 {seconds['1']:.3f} s, B = 64 {seconds['64']:.3f} s: per row "
              f"{ratio:.2f}x B = 64's (goal <= 3)", flush=True)
    return {"n": 2**23, "k": 2048, "threads": 2, "repeat": args.repeat, "paths": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{cpu_model()} ({cpu_flags()}), load average {os.getloadavg()[0]:.1f}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--max-entries", type=int, default=2**33, help="skip shapes with n k above this")
    p.add_argument("--gemm-all", action="store_true", help="the GEMM baseline at every shape, not only the headline")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--large-batches", action="store_true",
                   help=f"B in {LARGE_BATCHES}, n = 2^20, k in {LARGE_KS}; no GEMM baseline")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="instead of the grid's")
    p.add_argument("--ns", type=int, nargs="+", default=None)
    p.add_argument("--ks", type=int, nargs="+", default=None)
    p.add_argument("--out", default=None, help="JSON path (default results/kernel_choice[_large_batches_all_registers].json)")
    p.add_argument("--small-batch-goal", action="store_true",
                   help="B = 1 against B = 64 per row at n = 2^23, k = 2048 (goal <= 3x) instead")
    args = p.parse_args(argv)
    if args.small_batch_goal:
        report = small_batch_goal(args)
        out = args.out or os.path.join(HERE, "results", "kernel_choice_small_batch_goal.json")
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out}")
        return 0
    given = (args.batches, args.ns, args.ks)
    if args.quick:
        defaults = ((1, 8, 64), (2**16, 2**20), (256, 1024))
    elif args.large_batches:
        defaults = (LARGE_BATCHES, (2**20,), LARGE_KS)
    else:
        defaults = (BATCHES, NS, KS)
    args.batches, args.ns, args.ks = (g or d for g, d in zip(given, defaults))
    args.headline = None if args.large_batches else HEADLINE
    name = "kernel_choice_large_batches_all_registers.json" if args.large_batches else "kernel_choice.json"
    args.out = args.out or os.path.join(HERE, "results", name)
    report = run(args)
    print_report(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
