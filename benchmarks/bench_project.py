"""Times the projection: trak_fast on the fly against P materialized and against peers.

CPU (default), in one run, float32:
  - trak_fast.project (P generated on the fly, tile by tile);
  - grads @ P with P = projection_matrix(...) materialized beforehand (the GEMM limit);
  - MadryLab trak 0.3.2's BasicProjector (what TRAK users run on a CPU today);
and a large shape (B=8, n=2^26, k=2048, where P would be 512 GiB) for peak extra memory.

--small-batch instead times the two CPU paths for Rademacher float32 (the register kernel
and tiles + GEMM, forced with TRAK_FAST_CPU_KERNEL) at n=2^23, k=2048, B in 1, 8, 32, 64,
sweeps B further at n=2^20 for the crossover (AVX-512 here; the AVX2 + FMA variant in a
child process), checks the issue's targets, and bounds what a register path could gain
for the Gaussian kind (from tiles + GEMM at B = 1 and 8, see gaussian_bound). Times are the minimum
of --repeat runs (the least disturbed run on a shared machine).

    python benchmarks/bench_project.py                 # CPU table + JSON
    python benchmarks/bench_project.py --small-batch   # small-batch table + JSON
    python benchmarks/bench_project.py --device cuda   # the GPU benchmark (bench_project_cuda.py)
    python benchmarks/bench_project.py --sparse        # kind="sparse" against rademacher (below)

Prints a table and writes JSON (default benchmarks/results/bench_project_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return " ".join(f for f in ("avx", "avx2", "fma", "f16c", "avx512f") if f in flags)
    except OSError:
        pass
    return "unknown"


def median_time(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_shape(batch: int, n: int, k: int, repeat: int, with_trak: bool):
    import trak_fast

    rows = []
    grads = torch.randn(batch, n)
    for kind in ("rademacher", "gaussian"):
        P = trak_fast.projection_matrix(n, k, seed=0, kind=kind)
        on_the_fly = trak_fast.project(grads, k, seed=0, kind=kind)
        materialized = grads @ P
        err = rel_err(on_the_fly, materialized)
        assert err < 1e-4, f"project disagrees with the materialized GEMM ({kind}): {err}"
        t_gemm = median_time(lambda: grads @ P, repeat)
        del P, materialized
        t_ours = median_time(lambda: trak_fast.project(grads, k, seed=0, kind=kind), repeat)
        row = {"kind": kind, "B": batch, "n": n, "k": k, "project_s": t_ours,
               "materialized_gemm_s": t_gemm, "ratio_vs_gemm": t_ours / t_gemm, "rel_err_vs_gemm": err}
        if with_trak:
            from trak.projectors import BasicProjector, ProjectionType

            proj_type = ProjectionType.rademacher if kind == "rademacher" else ProjectionType.normal
            projector = BasicProjector(grad_dim=n, proj_dim=k, seed=0, proj_type=proj_type,
                                       device="cpu", dtype=torch.float32)
            theirs = projector.project(grads, model_id=0)
            # Different matrices: compare the preserved squared norm (theirs is unscaled).
            norm_ratio = (theirs.norm() ** 2 / k / grads.norm() ** 2).item()
            assert abs(norm_ratio - 1) < 0.2, f"BasicProjector output looks wrong: {norm_ratio}"
            t_trak = median_time(lambda: projector.project(grads, model_id=0), repeat)
            row.update({"trak_basic_projector_s": t_trak, "speedup_vs_trak": t_trak / t_ours})
            del projector
        rows.append(row)
    return rows


_LARGE_CHILD = r"""
import json, sys, time, torch, trak_fast
batch, n, k = map(int, sys.argv[1:4])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
grads = torch.randn(batch, n)
out = torch.zeros(batch, k)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter (Linux >= 4.0) now that input and output exist
before = status("VmRSS:")
start = time.perf_counter()
trak_fast.project(grads, k, out=out)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_extra_bytes": status("VmHWM:") - before,
                  "finite": bool(torch.isfinite(out).all())}))
"""


def bench_large(batch: int, n: int, k: int):
    """Peak resident memory beyond input and output for a P that could never be stored.

    Runs in a fresh process: the peak-RSS counter is reset once the input and output exist,
    so the number counts everything the call touches (tile buffers, the thread pool's
    start-up, temporaries), with no memory left over from earlier runs to reuse."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _LARGE_CHILD, str(batch), str(n), str(k)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"B": batch, "n": n, "k": k, "seconds": child["seconds"], "P_would_be_GiB": n * k * 4 / 2**30,
            "input_MiB": batch * n * 4 / 2**20, "peak_extra_MiB": child["peak_extra_bytes"] / 2**20,
            "finite": child["finite"]}


# ---- small batches: the register kernel against tiles + GEMM ---------------------------

def _time_path(path, grads, k, repeat, kind="rademacher"):
    os.environ["TRAK_FAST_CPU_KERNEL"] = path
    try:
        import trak_fast

        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = trak_fast.project(grads, k, seed=0, kind=kind)
            times.append(time.perf_counter() - start)
        return min(times), out
    finally:
        os.environ.pop("TRAK_FAST_CPU_KERNEL", None)


def _both_paths(batch, n, k, repeat):
    grads = torch.randn(batch, n)
    t_reg, a = _time_path("registers", grads, k, repeat)
    t_tile, b = _time_path("tiles", grads, k, repeat)
    err = rel_err(a, b)
    assert err < 1e-4, f"the two CPU paths disagree at B={batch}, n={n}, k={k}: {err}"
    return {"B": batch, "n": n, "k": k, "registers_s": t_reg, "tiles_s": t_tile,
            "registers_per_row_s": t_reg / batch, "tiles_per_row_s": t_tile / batch,
            "speedup": t_tile / t_reg, "rel_err_between_paths": err}


_AVX2_CHILD = r"""
import json, os, sys, time, torch, trak_fast
n, k, repeat = map(int, sys.argv[1:4])
os.environ["TRAK_FAST_CPU_KERNEL"] = "registers"
rows = []
for batch in map(int, sys.argv[4].split(",")):
    g = torch.randn(batch, n)
    times = []
    for _ in range(repeat):
        start = time.perf_counter(); trak_fast.project(g, k); times.append(time.perf_counter() - start)
    rows.append({"B": batch, "registers_avx2_s": min(times)})
print(json.dumps(rows))
"""


def gaussian_bound(t1, t8):
    """What a register path could gain for the Gaussian kind, from tiles + GEMM at B = 1, 8.

    Model: T(B) = G + B c, with G the generation of all n x k entries (paid once per call,
    whatever B) and c the GEMM per batch row. A register path still pays G (Box-Muller per
    entry is the same work in registers or into a tile), so its time is at least G and its
    speedup at B = 1 at most T(1) / G, with G = (8 T(1) - T(8)) / 7 (c clamped at >= 0)."""
    c = max((t8 - t1) / 7, 0.0)
    g = t1 - c
    return {"generation_s": g, "gemm_per_row_s": c, "max_register_speedup_B1": t1 / g}


def _gaussian_rows(n, k, repeat):
    t = {b: _time_path("tiles", torch.randn(b, n), k, repeat, kind="gaussian")[0] for b in (1, 8)}
    return {"kind": "gaussian", "n": n, "k": k, "tiles_B1_s": t[1], "tiles_B8_s": t[8],
            **gaussian_bound(t[1], t[8])}


def small_batch(meta, repeat, out_path, n=2**23, k=2048, sweep_n=2**20):
    import subprocess

    table = [_both_paths(b, n, k, repeat) for b in (1, 8, 32, 64)]
    sweep_batches = (1, 8, 32, 64, 128, 256)
    sweep = [_both_paths(b, sweep_n, k, repeat) for b in sweep_batches]
    env = dict(os.environ, TRAK_FAST_DISABLE_AVX512="1")
    proc = subprocess.run([sys.executable, "-c", _AVX2_CHILD, str(sweep_n), str(k), str(repeat),
                           ",".join(map(str, sweep_batches))], env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        for row, child in zip(sweep, json.loads(proc.stdout.strip().splitlines()[-1])):
            row["registers_avx2_s"] = child["registers_avx2_s"]
    gaussian = _gaussian_rows(sweep_n, k, repeat)

    by_b = {r["B"]: r for r in table}
    today = "tiles_s"  # the path every call took before the register kernel
    targets = {
        "B1_per_row_over_B64_per_row": by_b[1]["registers_s"] / (by_b[64]["registers_s"] / 64),
        "B8_speedup_vs_tiles": by_b[8][today] / by_b[8]["registers_s"],
        "B64_speedup_vs_tiles": by_b[64][today] / by_b[64]["registers_s"],
    }
    targets["met"] = {"B1 per row <= 3x B64 per row": targets["B1_per_row_over_B64_per_row"] <= 3,
                      "B8 >= 2x faster": targets["B8_speedup_vs_tiles"] >= 2,
                      "B64 no slower": targets["B64_speedup_vs_tiles"] >= 1}

    print(f"# {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, float32, rademacher, "
          f"min of {repeat} runs")
    print(f"## n = {n}, k = {k}")
    print("| B | registers (s) | tiles + GEMM (s) | registers per row (s) | tiles per row (s) | speedup |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['B']} | {r['registers_s']:.3f} | {r['tiles_s']:.3f} | {r['registers_per_row_s']:.4f} | "
              f"{r['tiles_per_row_s']:.4f} | {r['speedup']:.2f}x |")
    print(f"\n## crossover sweep, n = {sweep_n}, k = {k} (per row, s)")
    print("| B | registers AVX-512 | registers AVX2 + FMA | tiles + GEMM | faster |")
    print("|---|---|---|---|---|")
    for r in sweep:
        avx2 = r.get("registers_avx2_s", float("nan")) / r["B"]
        winner = "registers" if r["registers_s"] < r["tiles_s"] else "tiles"
        print(f"| {r['B']} | {r['registers_per_row_s']:.4f} | {avx2:.4f} | {r['tiles_per_row_s']:.4f} | {winner} |")
    print(f"\n## gaussian, n = {sweep_n}, k = {k}, tiles + GEMM: B = 1 {gaussian['tiles_B1_s']:.3f} s, "
          f"B = 8 {gaussian['tiles_B8_s']:.3f} s; generation {gaussian['generation_s']:.3f} s, GEMM "
          f"{gaussian['gemm_per_row_s']:.4f} s per row: a register path gains at most "
          f"{gaussian['max_register_speedup_B1']:.2f}x at B = 1")
    print(f"\ntargets: B1/B64 per row = {targets['B1_per_row_over_B64_per_row']:.2f}x, "
          f"B8 speedup = {targets['B8_speedup_vs_tiles']:.2f}x, B64 speedup = {targets['B64_speedup_vs_tiles']:.2f}x; "
          f"{targets['met']}")
    out = out_path or os.path.join(HERE, "results", "bench_project_cpu_small_batch.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "table": table, "sweep": sweep, "gaussian": gaussian, "targets": targets,
                   "avx2_child_error": None if proc.returncode == 0 else proc.stderr[-2000:]}, f, indent=2)
    print(f"wrote {out}")
    return 0


# ---- kind="sparse" ------------------------------------------------------------------------
# One run: kind="rademacher" and kind="sparse" at several nnz on the same grads, the ratio of
# their times, and the peak extra memory of the sparse kind at two n (it must not grow with n).

_SPARSE_MEMORY_CHILD = r"""
import json, sys, time, torch, trak_fast
batch, n, k, nnz = map(int, sys.argv[1:5])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
grads = torch.randn(batch, n)
out = torch.zeros(batch, k)
trak_fast.project(grads[:, :4096], k, kind="sparse", nnz=nnz)  # start the thread pool
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
start = time.perf_counter()
trak_fast.project(grads, k, kind="sparse", nnz=nnz, out=out)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_extra_bytes": status("VmHWM:") - before}))
"""


def bench_sparse(batch: int, n: int, k: int, repeat: int, nnzs=(1, 4, 16)):
    import subprocess

    import trak_fast

    grads = torch.randn(batch, n)
    t_rad = median_time(lambda: trak_fast.project(grads, k, kind="rademacher"), repeat)
    rows = [{"kind": "rademacher", "nnz": None, "B": batch, "n": n, "k": k, "project_s": t_rad,
             "speedup_vs_rademacher": 1.0}]
    for nnz in nnzs:
        # Sanity check on a slice against the float64 oracle.
        part = grads[:, :20000]
        ref = part.double() @ trak_fast.projection_matrix(20000, k, kind="sparse", nnz=nnz, dtype=torch.float64)
        err = rel_err(trak_fast.project(part, k, kind="sparse", nnz=nnz), ref)
        assert err < 1e-5, f"sparse project disagrees with the oracle: {err}"
        t = median_time(lambda: trak_fast.project(grads, k, kind="sparse", nnz=nnz), repeat)
        rows.append({"kind": "sparse", "nnz": nnz, "B": batch, "n": n, "k": k, "project_s": t,
                     "speedup_vs_rademacher": t_rad / t, "rel_err_vs_oracle": err})
    del grads
    memory = []
    for mem_n in (n, 4 * n):
        proc = subprocess.run([sys.executable, "-c", _SPARSE_MEMORY_CHILD, str(batch), str(mem_n), str(k), "4"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            memory.append({"n": mem_n, "error": proc.stderr[-2000:]})
            continue
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        memory.append({"B": batch, "n": mem_n, "k": k, "nnz": 4, "seconds": child["seconds"],
                       "input_MiB": batch * mem_n * 4 / 2**20,
                       "peak_extra_MiB": child["peak_extra_bytes"] / 2**20})
    return rows, memory


def sparse_main(args) -> int:
    import trak_fast

    meta = {"machine": f"{cpu_model()} ({cpu_flags()})", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "trak_fast": trak_fast.__version__, "dtype": "float32",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows, memory = bench_sparse(args.batch, args.n, args.k, args.repeat)
    print(f"# {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, float32")
    print("| kind | nnz | B | n | k | project (s) | speedup vs rademacher |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['nnz'] or '-'} | {r['B']} | {r['n']} | {r['k']} | {r['project_s']:.3f} | "
              f"{r['speedup_vs_rademacher']:.1f}x |")
    print("\n| sparse nnz=4: n | input (MiB) | seconds | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    for m in memory:
        if "error" in m:
            print(f"| {m['n']} | error: {m['error'][-200:]} |")
        else:
            print(f"| {m['n']} | {m['input_MiB']:.0f} | {m['seconds']:.3f} | {m['peak_extra_MiB']:.1f} |")
    out = args.out or os.path.join(HERE, "results", "bench_project_sparse_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "memory": memory}, f, indent=2)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=2**20)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-trak", action="store_true", help="skip MadryLab trak's BasicProjector")
    parser.add_argument("--no-large", action="store_true", help="skip the B=8, n=2^26, k=2048 memory run")
    parser.add_argument("--small-batch", action="store_true",
                        help="the small-batch table: register kernel vs tiles + GEMM (see above)")
    parser.add_argument("--out", default=None, help="JSON path")
    parser.add_argument("--sparse", action="store_true", help="only the kind='sparse' section")
    args, rest = parser.parse_known_args(argv)
    if args.sparse and args.device == "cpu":
        return sparse_main(args)

    if args.device == "cuda":
        import bench_project_cuda

        return bench_project_cuda.main(rest + (["--out", args.out] if args.out else []))

    import trak_fast

    meta = {"machine": f"{cpu_model()} ({cpu_flags()})", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "trak_fast": trak_fast.__version__, "dtype": "float32",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.small_batch:
        return small_batch(meta, args.repeat, args.out)
    rows = bench_shape(args.batch, args.n, args.k, args.repeat, not args.no_trak)
    large = None if args.no_large else bench_large(8, 2**26, 2048)

    print(f"# {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, float32")
    print(f"| kind | B | n | k | trak_fast project (s) | P materialized, GEMM (s) | ratio vs GEMM "
          f"| trak BasicProjector (s) | trak_fast speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['B']} | {r['n']} | {r['k']} | {r['project_s']:.3f} | "
              f"{r['materialized_gemm_s']:.3f} | {r['ratio_vs_gemm']:.2f}x | "
              f"{r.get('trak_basic_projector_s', float('nan')):.3f} | {r.get('speedup_vs_trak', float('nan')):.1f}x |")
    if large:
        print(f"\nlarge: {large}")
    out = args.out or os.path.join(HERE, "results", "bench_project_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "large": large}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
