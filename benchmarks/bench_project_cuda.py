"""Times the projection on a CUDA GPU: trak_fast against cuBLAS with P materialized and peers.

In one run, Rademacher, at B in {32, 256, 1024}, n in {2^22, 2^25}, k in {1024, 4096}
(shapes whose inputs do not fit in GPU memory are skipped and say so):
  - trak_fast.project in each precision (fp32, tf32, bf16), P generated on the fly, with the
    strategy the shape rule picks;
  - trak_fast.project in bf16 with each strategy forced (TRAK_FAST_CUDA_STRATEGY=fused: the fused
    kernel; =gemm: P generated in 16384-row chunks into a workspace, then cuBLAS);
  - torch.mm with P = projection_matrix(...) materialized beforehand in the same precision
    (fp32 with TF32 off, fp32 with TF32 on, bf16 with g converted beforehand): the cuBLAS
    ceiling when P costs nothing, where P fits;
  - MadryLab fast_jl 0.1.3 (what trak's CudaProjector calls), when installed;
  - sjlt 0.1.7 (a sparse JL transform: a different, cheaper algorithm, for reference).
Before timing, every trak_fast precision is checked against a float64 reference on a corner
of the output (8 rows x 256 columns), the materialized GEMMs against trak_fast (same matrix),
and the peers (different matrices) by norm preservation: mean ||P^T g||^2 / ||g||^2 ~ 1.

Times are CUDA-event medians after a warm-up call; every input is >= 512 MB, far larger than
L2, so one input buffer per shape is not served from the cache (the code still rotates copies
when an input is small). A wall-clock budget (--budget-s) skips what no longer fits, and says
so in the table and the JSON.

    python benchmarks/bench_project_cuda.py [--out results.json] [--budget-s 240]
    python benchmarks/bench_project.py --device cuda [...]   # the same, through the lead's script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_project_cuda.json")
PRECISIONS = ("fp32", "tf32", "bf16")
# Error bounds against float64 (as in tests/test_cuda.py).
TOL = {"fp32": 5e-5, "tf32": 1.5e-3, "bf16": 5e-3}
SEED = 0


# ---- timing --------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], object], target_s: float, max_reps: int,
              warm_up: bool = True) -> Dict[str, object]:
    """Median of CUDA-event times after one warm-up call (skip it when the caller has just
    run fn); reps chosen to take ~target_s, at least 2 timed calls."""
    if warm_up:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    first = start.elapsed_time(end)
    reps = max(1, min(max_reps - 1, int(target_s * 1000 / max(first, 1e-3)) - 1))
    times = [first]
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "times_ms": times, "reps": len(times)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


# ---- references and alternatives ----------------------------------------------------------------
def corner_reference(g: torch.Tensor, k: int, rows: int = 8, cols: int = 256) -> torch.Tensor:
    """float64 out[:rows, :cols] (entries of R do not depend on k; scale 1/sqrt(k))."""
    import trak_fast

    cols = min(cols, k)
    rows = min(rows, g.shape[0])
    n = g.shape[1]
    out = torch.zeros(rows, cols, dtype=torch.float64, device="cuda")
    block = 2**21
    for r0 in range(0, n, block):
        nr = min(block, n - r0)
        r = trak_fast.projection_matrix(nr, cols, seed=SEED, feature_offset=r0, device="cuda",
                                        scale=1.0)
        out += g[:rows, r0:r0 + nr].double() @ r.double()
    return out / math.sqrt(k)


def materialize(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Unscaled R = projection_matrix(n, k, scale=1) in `dtype` (+-1: exact in bf16), filled
    block by block so that no float32 copy of all of it exists."""
    import trak_fast

    p = torch.empty(n, k, dtype=dtype, device="cuda")
    block = max(1, 2**28 // (4 * k))
    for r0 in range(0, n, block):
        nr = min(block, n - r0)
        p[r0:r0 + nr] = trak_fast.projection_matrix(nr, k, seed=SEED, feature_offset=r0,
                                                    device="cuda", scale=1.0).to(dtype)
    return p


def peer_fast_jl():
    try:
        import fast_jl  # noqa: F401
    except Exception as exc:  # not built or failed to load: recorded, not fatal
        return None, f"fast_jl unavailable: {type(exc).__name__}: {exc}"
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(g: torch.Tensor, k: int) -> torch.Tensor:
        # trak's CudaProjector: batches of 32 rows through project_rademacher_32 when B > 16.
        batch = g.shape[0]
        name = "project_rademacher_" + ("8" if batch <= 8 else "16" if batch <= 16 else "32")
        return getattr(fast_jl, name)(g, k, SEED, sms)

    return run, ("fast_jl 0.1.3 (project_rademacher_*, num_feature_tiles = SM count, as trak; "
                 "fp16 tensor cores: rounds g to fp16 internally)")


def peer_sjlt(n: int, k: int):
    try:
        from sjlt import SJLTProjection

        proj = SJLTProjection(original_dim=n, proj_dim=k, c=1, device="cuda")
    except Exception as exc:  # not built, failed to load, or failed to set up
        return None, f"sjlt unavailable: {type(exc).__name__}: {str(exc)[:300]}"
    return (lambda g, _k: proj(g)), "sjlt 0.1.7 (SJLTProjection, c=1, its defaults)"


# ---- one shape -----------------------------------------------------------------------------------
def bench_shape(batch: int, n: int, k: int, args, deadline: float, log) -> List[dict]:
    import trak_fast

    rows: List[dict] = []
    base = {"kind": "rademacher", "B": batch, "n": n, "k": k, "flop": 2.0 * batch * n * k}
    g_bytes = batch * n * 4
    if time.monotonic() > deadline:
        return [dict(base, method="(shape)", status="skipped: time budget")]
    free, _total = torch.cuda.mem_get_info()
    if g_bytes > 0.8 * free:
        rows.append(dict(base, method="(shape)", status=f"skipped: g needs {g_bytes / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free"))
        return rows
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = 1 if g_bytes >= 8 * l2 else min(8, math.ceil(8 * l2 / g_bytes))
    torch.manual_seed(batch + n + k)
    inputs = [torch.randn(batch, n, device="cuda") for _ in range(copies)]
    turn = [0]

    def next_input() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % copies
        return inputs[turn[0]]

    g0 = inputs[0]
    ref_corner = corner_reference(g0, k)
    results: Dict[str, torch.Tensor] = {}

    def record(method: str, precision: str, fn: Callable[[torch.Tensor], torch.Tensor],
               check: Callable[[torch.Tensor], Dict[str, object]], note: str = "") -> None:
        row = dict(base, method=method, precision=precision, note=note)
        if time.monotonic() > deadline:
            rows.append(dict(row, status="skipped: time budget"))
            log(f"  {method:<22} skipped (time budget)")
            return
        try:
            out = fn(g0)
            torch.cuda.synchronize()
            row.update(check(out))
            results[f"{method}/{precision}"] = out
            del out
            # The checked call above was the warm-up.
            row.update(time_cuda(lambda: fn(next_input()), args.target_s, args.max_reps,
                                 warm_up=False))
            row["tflops"] = row["flop"] / (row["median_ms"] * 1e-3) / 1e12
            row["g_gb_per_s"] = g_bytes / (row["median_ms"] * 1e-3) / 1e9
            row["status"] = "ok" if row.get("check_ok", True) else "WRONG"
            log(f"  {method:<22} {precision:<5} {row['median_ms']:10.2f} ms  "
                f"{row['tflops']:7.1f} TFLOP/s  {row.get('check', '')}")
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = f"skipped: out of memory ({str(exc).splitlines()[0][:120]})"
            log(f"  {method:<22} {precision:<5} out of memory")
        except Exception as exc:  # a peer failing must not end the run
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {method:<22} {precision:<5} {row['status']}")
        torch.cuda.empty_cache()
        rows.append(row)

    # trak_fast, each precision, checked against the float64 corner.
    for precision in PRECISIONS:
        def check(out, precision=precision):
            err = rel_err(out[:ref_corner.shape[0], :ref_corner.shape[1]], ref_corner)
            return {"rel_err_vs_fp64_corner": err, "check_ok": err < TOL[precision],
                    "check": f"err vs fp64 {err:.2e}"}
        record("trak_fast", precision,
               lambda g, p=precision: trak_fast.project(g, k, seed=SEED, precision=p), check)

    # The two CUDA strategies for bf16, forced (TRAK_FAST_CUDA_STRATEGY, read at every call):
    # the fused kernel and generate-then-GEMM; the row above is what the shape rule picks.
    def forced(strategy):
        def run(g):
            before = os.environ.get("TRAK_FAST_CUDA_STRATEGY")
            os.environ["TRAK_FAST_CUDA_STRATEGY"] = strategy
            try:
                return trak_fast.project(g, k, seed=SEED, precision="bf16")
            finally:
                if before is None:
                    os.environ.pop("TRAK_FAST_CUDA_STRATEGY", None)
                else:
                    os.environ["TRAK_FAST_CUDA_STRATEGY"] = before
        return run

    for strategy in ("fused", "gemm"):
        def check(out):
            err = rel_err(out[:ref_corner.shape[0], :ref_corner.shape[1]], ref_corner)
            res = {"rel_err_vs_fp64_corner": err, "check_ok": err < TOL["bf16"],
                   "check": f"err vs fp64 {err:.2e}"}
            return res
        record(f"trak_fast {strategy}", "bf16", forced(strategy), check,
               note=f"TRAK_FAST_CUDA_STRATEGY={strategy}")

    # cuBLAS with P materialized in each precision, where it fits; same matrix, so compared
    # with trak_fast's result in the same precision.
    scale = 1.0 / math.sqrt(k)
    for precision in PRECISIONS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        p_bytes = n * k * (2 if precision == "bf16" else 4)
        extra = batch * n * 2 if precision == "bf16" else 0
        free, _ = torch.cuda.mem_get_info()
        if p_bytes + extra > 0.85 * free:
            rows.append(dict(base, method="torch.mm (P materialized)", precision=precision,
                             status=f"skipped: P needs {p_bytes / 1e9:.1f} GB, "
                                    f"{free / 1e9:.1f} GB free"))
            log(f"  torch.mm (P materialized) {precision:<5} skipped: P does not fit")
            continue
        if time.monotonic() > deadline:
            rows.append(dict(base, method="torch.mm (P materialized)", precision=precision,
                             status="skipped: time budget"))
            continue
        # R is unscaled +-1 (exact in bf16); the scale multiplies the [B, k] result.
        p_mat = materialize(n, k, dtype)
        g_cast = {id(x): x.to(dtype) for x in inputs} if precision == "bf16" else None
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

        # (bf16: cuBLAS's output is bf16 too, one more rounding than trak_fast's float32.)
        def mm(g, p_mat=p_mat, g_cast=g_cast):
            a = g_cast[id(g)] if g_cast is not None else g
            return torch.mm(a, p_mat).float().mul_(scale)

        def check(out, precision=precision):
            mine = results.get(f"trak_fast/{precision}")
            err = rel_err(out[:ref_corner.shape[0], :ref_corner.shape[1]], ref_corner)
            res = {"rel_err_vs_fp64_corner": err, "check_ok": err < TOL[precision],
                   "check": f"err vs fp64 {err:.2e}"}
            if mine is not None:
                res["rel_err_vs_trak_fast"] = rel_err(out, mine)
                res["check"] += f", vs trak_fast {res['rel_err_vs_trak_fast']:.1e}"
            return res
        record("torch.mm (P materialized)", precision, mm, check,
               note=f"P {p_bytes / 1e9:.1f} GB materialized beforehand")
        torch.backends.cuda.matmul.allow_tf32 = False
        del p_mat, g_cast
        torch.cuda.empty_cache()

    # Peers: different matrices, checked by norm preservation (unscaled +-1 for fast_jl).
    g_norm2 = (g0.double() ** 2).sum(1)

    def norm_check(out, unscaled: bool):
        ratio = float(((out.double() ** 2).sum(1) / g_norm2).mean() / (k if unscaled else 1))
        ok = abs(ratio - 1) < 5 * math.sqrt(2.0 / k) + 0.05
        return {"norm_ratio": ratio, "check_ok": ok, "check": f"mean |Pg|^2/|g|^2 {ratio:.3f}"}

    if not args.no_peers:
        fn, note = peer_fast_jl()
        if fn is None:
            rows.append(dict(base, method="fast_jl", precision="fp32", status=note))
        else:
            record("fast_jl", "fp32", lambda g: fn(g, k), lambda o: norm_check(o, True), note)
        fn, note = (None, "") if time.monotonic() > deadline else peer_sjlt(n, k)
        if fn is None:
            rows.append(dict(base, method="sjlt", precision="fp32",
                             status=note or "skipped: time budget"))
        else:
            record("sjlt", "fp32", fn, lambda o: norm_check(o, False), note)
    del inputs, results
    torch.cuda.empty_cache()
    return rows


def ceilings() -> Dict[str, float]:
    """The two ceilings of METHOD.md, measured here: device-to-device copy bandwidth (bytes
    read + written) and the bf16 8192^3 matrix product on random data."""
    res: Dict[str, float] = {}
    x = torch.randn(2**29, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    t = time_cuda(lambda: y.copy_(x), 0.3, 20)["median_ms"]
    res["copy_tb_per_s"] = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, 0.3, 50)["median_ms"]
    res["bf16_gemm_tflops"] = 2 * 8192**3 / (t * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return res


# ---- report ---------------------------------------------------------------------------------------
def meta() -> Dict[str, object]:
    import trak_fast

    props = torch.cuda.get_device_properties(0)
    info = {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size,
            "gpu_memory_bytes": props.total_memory, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "trak_fast": trak_fast.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        from trak_fast import _build_info
        info["trak_fast_build"] = {"cuda": _build_info.CUDA_VERSION, "archs": _build_info.CUDA_ARCHS}
    except Exception:
        pass
    try:
        import subprocess
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
    return info


def table(rows: List[dict]) -> str:
    shapes: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault((r["B"], r["n"], r["k"]), {})[f"{r['method']}/{r.get('precision', '')}"] = r

    def ms(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r.get("status") == "ok":
            return f"{r['median_ms']:.1f}"
        if r.get("status") == "WRONG":
            return f"{r['median_ms']:.1f} WRONG"
        status = str(r.get("status", ""))
        return "skip" if status.startswith("skipped") else "n/a" if "unavailable" in status else "err"

    cols = [("tf fp32", "trak_fast/fp32"), ("tf tf32", "trak_fast/tf32"), ("tf bf16", "trak_fast/bf16"),
            ("fused bf16", "trak_fast fused/bf16"), ("gemm bf16", "trak_fast gemm/bf16"),
            ("mm fp32", "torch.mm (P materialized)/fp32"), ("mm tf32", "torch.mm (P materialized)/tf32"),
            ("mm bf16", "torch.mm (P materialized)/bf16"), ("fast_jl", "fast_jl/fp32"), ("sjlt", "sjlt/fp32")]
    lines = ["times in ms (median); tf = trak_fast.project; mm = torch.mm with P materialized",
             "| B | n | k | " + " | ".join(c[0] for c in cols)
             + " | bf16 vs fast_jl | bf16 / mm bf16 | gemm vs fused |",
             "|" + "---|" * (len(cols) + 6)]
    for (b, n, k), byname in shapes.items():
        if "(shape)/" in byname:
            lines.append(f"| {b} | 2^{int(math.log2(n))} | {k} | " + byname["(shape)/"]["status"] + " |")
            continue
        cells = [ms(byname.get(key)) for _, key in cols]

        def ratio(mine: str, other: str) -> str:
            """other's time / mine: my throughput relative to other's."""
            ra, rc = byname.get(mine), byname.get(other)
            if not (ra and rc and ra.get("status") == "ok" and rc.get("status") == "ok"):
                return "-"
            return f"{rc['median_ms'] / ra['median_ms']:.2f}x"
        lines.append(f"| {b} | 2^{int(math.log2(n))} | {k} | " + " | ".join(cells) + " | "
                     + ratio("trak_fast/bf16", "fast_jl/fp32") + " | "
                     + ratio("trak_fast/bf16", "torch.mm (P materialized)/bf16") + " | "
                     + ratio("trak_fast gemm/bf16", "trak_fast fused/bf16") + " |")
    lines.append("bf16 vs fast_jl: fast_jl time / trak_fast bf16 time (throughput ratio). "
                 "bf16 / mm bf16: cuBLAS time / trak_fast time (share of the GEMM's throughput). "
                 "gemm vs fused: fused time / generate-then-GEMM time (> 1: GEMM faster). "
                 "tf bf16 is what the shape rule picks (project_cuda.cu: gemm at B >= 128, k >= 256).")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON path")
    parser.add_argument("--batches", default="256,32,1024", help="comma-separated B values")
    parser.add_argument("--log2-ns", default="25,22", help="comma-separated log2(n) values")
    parser.add_argument("--ks", default="4096,1024", help="comma-separated k values")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget")
    parser.add_argument("--target-s", type=float, default=1.0, help="timed seconds per method")
    parser.add_argument("--max-reps", type=int, default=10)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_project_cuda: no CUDA device", file=sys.stderr)
        return 2
    import trak_fast  # noqa: F401  (fails early if the extension is broken)

    start = time.monotonic()
    deadline = start + args.budget_s
    info = meta()
    print(f"# {info['gpu']} ({info['sms']} SMs), torch {info['torch']} CUDA {info['torch_cuda']}", flush=True)
    info["ceilings"] = ceilings()
    print(f"# ceilings: copy {info['ceilings']['copy_tb_per_s']:.2f} TB/s, bf16 GEMM "
          f"{info['ceilings']['bf16_gemm_tflops']:.0f} TFLOP/s", flush=True)
    batches = [int(x) for x in args.batches.split(",")]
    ns = [2 ** int(x) for x in args.log2_ns.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    # The two target shapes first (B=256, k=4096 at both n), so the budget never cuts them.
    shapes = [(b, n, k) for b in batches for n in ns for k in ks]
    shapes.sort(key=lambda s: (s[0] != 256 or s[2] != 4096, s))
    rows: List[dict] = []
    out_path = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    for batch, n, k in shapes:
        print(f"B={batch} n=2^{int(math.log2(n))} k={k}", flush=True)
        rows += bench_shape(batch, n, k, args, deadline, lambda s: print(s, flush=True))
        with open(out_path, "w") as f:  # rewritten after every shape: a timeout keeps the rest
            json.dump({"meta": info, "rows": rows, "complete": False}, f, indent=1, default=str)
    info["wall_s"] = time.monotonic() - start
    with open(out_path, "w") as f:
        json.dump({"meta": info, "rows": rows, "complete": True}, f, indent=1, default=str)
    print(table(rows))
    print(f"ceilings: copy {info['ceilings']['copy_tb_per_s']:.2f} TB/s, bf16 GEMM "
          f"{info['ceilings']['bf16_gemm_tflops']:.0f} TFLOP/s; JSON: {out_path}")
    wrong = [r for r in rows if r.get("status") == "WRONG" and r["method"] == "trak_fast"]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
