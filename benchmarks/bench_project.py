"""Times the projection: trak_fast on the fly against P materialized and against peers.

CPU (default), in one run, float32:
  - trak_fast.project (P generated on the fly, tile by tile);
  - grads @ P with P = projection_matrix(...) materialized beforehand (the GEMM limit);
  - MadryLab trak 0.3.2's BasicProjector (what TRAK users run on a CPU today);
and a large shape (B=8, n=2^26, k=2048, where P would be 512 GiB) for peak extra memory.

    python benchmarks/bench_project.py                 # CPU table + JSON
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
