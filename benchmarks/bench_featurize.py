"""Featurizing GPT-2 language models: the gradient paths against one plain forward+backward pass.

For GPT-2 models built from ``GPT2Config`` (random init, nothing downloaded; SDPA attention (eager for vmap_dense, which has no batching rule for SDPA), no
attention mask: unpadded batches of fixed length 128), in one run:

- ``vmap_dense``: ``gradients="vmap"``, dense projection, ``proj_dim = 2048``;
- ``hooks_dense``: ``gradients="hooks"``, dense projection, ``proj_dim = 2048`` (every parameter
  by hooks: Conv1D, the tied embedding / lm_head, the position table, the layer norms);
- ``hooks_factored``: ``projection="factored"``, 16 x 16 per layer (every parameter: Conv1D
  weights and biases, the tied embedding / lm_head, the position table and the norms; bergson
  leaves the last three out);
- ``fwd_bwd``: the physical limit, one ordinary batched forward and ``backward()`` of the summed
  task output (parameter gradients of the batch, no per-example work);
- ``bergson``: EleutherAI bergson (when importable), ``InMemoryCollector`` with
  ``GradientProcessor(projection_dim=16)`` on the same Conv1D modules, driven by its own
  ``CollectorComputer(...).run_with_collector_hooks()`` (its own loss: summed token cross-entropy).

Each (size, method) runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own:
warm-up batch first (not timed), then ``--batches`` timed batches. tokens/s counts every input
token (B x 128) over the median batch time (robust to a load spike on a shared machine; the
mean is in the JSON). The per-stage shares come from timers around the calls the featurizer
makes (layer callbacks, ``project``, the vmap gradients), a breakdown of the same timed batches.
The dense methods cost ~10 s per example at 124M, so above 50M parameters they time one batch of
``--slow-examples`` (default: the batch size) without warm-up. Children run with
``OMP_WAIT_POLICY=PASSIVE`` (see :func:`child_env`).

Before timing it checks, on the smallest configuration: hooks dense == vmap dense (relative
1e-4), and factored == ``P_out^T G P_in`` formed from the exact per-layer gradients (1e-4).

    python benchmarks/bench_featurize.py [--sizes 1M 10M 14M 124M] [--batch-size 8] [--batches 3]
                                         [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

# Before torch starts OpenMP (see child_env): passive waiting, for this process and its children.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trak_fast  # noqa: E402
from trak_fast import Task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_project import cpu_model  # noqa: E402  (one /proc/cpuinfo reader for the benchmarks)

SEQ_LEN = 128
PROJ_DIM = 2048
FACTORED = (16, 16)
#: GPT-2 shapes: (n_layer, n_embd, n_head, vocab_size, n_positions).
SIZES = {
    "1M": (4, 128, 4, 1024, 128),          # 0.94 M parameters
    "10M": (6, 320, 5, 8192, 128),         # 10.1 M
    "14M": (6, 384, 6, 8192, 128),         # 13.8 M (the 6-layer d = 384 model)
    "124M": (12, 768, 12, 50257, 1024),    # GPT-2 small, 124.4 M
}
METHODS = ("fwd_bwd", "vmap_dense", "hooks_dense", "hooks_factored", "bergson")
SLOW = ("vmap_dense", "hooks_dense")
SLOW_PARAMS = 50_000_000


class NextTokenMargin(Task):
    """``f(z) = sum_t (logit_{t, y_t} - logsumexp_{v != y_t} logit_{t, v})``, ``y_t = x_{t+1}``;
    ``Q = mean_t (1 - p(y_t))``. Batched (hook path) and one-example (vmap path) forms."""

    name = "bench-next-token-margin"

    @staticmethod
    def _margins(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits, target = logits[:, :-1], ids[:, 1:]
        is_target = torch.arange(logits.shape[-1], device=logits.device) == target[..., None]
        correct = logits.gather(-1, target[..., None])[..., 0]
        others = logits.masked_fill(is_target, float("-inf")).logsumexp(-1)
        return (correct - others).sum(-1)

    @staticmethod
    def _q(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        p = logits[:, :-1].detach().float().softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (1 - p).mean(-1)

    def output(self, model, example):
        ids = example["input_ids"][None]
        return self._margins(model(input_ids=ids).logits, ids)[0]

    def outputs(self, model, batch):
        ids = batch["input_ids"]
        return self._margins(model(input_ids=ids).logits, ids)

    def out_to_loss(self, model, batch):
        ids = batch["input_ids"]
        return self._q(model(input_ids=ids).logits, ids)

    def outputs_and_out_to_loss(self, model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits
        return self._margins(logits, ids), self._q(logits, ids)


def make_model(size: str, device: str, attention: str = "sdpa"):
    import transformers

    transformers.logging.set_verbosity_error()
    n_layer, n_embd, n_head, vocab, n_positions = SIZES[size]
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                     n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation=attention)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device).eval()


def make_batches(size: str, batch_size: int, count: int, device: str, seed: int = 1) -> List[dict]:
    vocab = SIZES[size][3]
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch_size, SEQ_LEN), generator=g).to(device)}
            for _ in range(count)]


def conv1d_names(model) -> List[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- stage timers around the featurizer's own calls --------------------------------------------

class Stages:
    """Seconds spent in named regions; nested regions are also counted in their parents."""

    def __init__(self, device: str):
        self.device, self.seconds, self.region = device, {}, "hooks"

    def wrap(self, fn, name: str, region: Optional[str] = None):
        def timed(*args, **kwargs):
            previous = self.region
            if region is not None:
                self.region = region
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                key = name.format(region=self.region)
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.region = previous
        return timed


def instrument(featurizer, stages: Stages) -> None:
    """Timers around the featurizer's calls (instance attributes and featurize's module globals,
    restored by the caller's process exiting: this runs in a throw-away child)."""
    import importlib

    from trak_fast.features.gradients.hooks import LayerTap

    W = importlib.import_module("trak_fast.features.gradients.writer")
    V = importlib.import_module("trak_fast.features.gradients.vmap")
    W.project = stages.wrap(W.project, "project ({region})")
    V.per_example_grads = stages.wrap(V.per_example_grads, "vmap grads")
    featurizer._vmap_features = stages.wrap(featurizer._vmap_features, "vmap part", region="vmap")
    featurizer._hook_features = stages.wrap(featurizer._hook_features, "hook pass", region="hooks")
    taps = featurizer._taps

    def timed_taps(*args, **kwargs):
        return [LayerTap(t.module, t.adapter, stages.wrap(t.on_input, "layer callbacks"),
                         stages.wrap(t.on_grad, "layer callbacks")) for t in taps(*args, **kwargs)]
    featurizer._taps = timed_taps


def stage_shares(method: str, s: Dict[str, float], total: float) -> Dict[str, float]:
    """Exclusive seconds per stage (from the nested timers) as shares of ``total``."""
    callbacks, hook_pass = s.get("layer callbacks", 0.0), s.get("hook pass", 0.0)
    proj_hooks, proj_vmap = s.get("project (hooks)", 0.0), s.get("project (vmap)", 0.0)
    vmap_part, vmap_grads = s.get("vmap part", 0.0), s.get("vmap grads", 0.0)
    out = {"fwd+bwd hook pass": hook_pass - callbacks}
    if method == "hooks_factored":
        out["factored projection (layer callbacks)"] = callbacks
    else:
        out["per-example grads from hooks"] = callbacks - proj_hooks
        out["dense projection"] = proj_hooks + proj_vmap
    out["vmap per-example grads"] = vmap_grads
    out["vmap other"] = vmap_part - vmap_grads - proj_vmap
    out["other (Q forward, setup per batch)"] = total - hook_pass - vmap_part
    return {k: v / total for k, v in out.items() if abs(v) > 1e-9 or k.startswith("fwd")}


# ---- one (size, method) in a fresh process -----------------------------------------------------

def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device, size, method = spec["device"], spec["size"], spec["method"]
    # vmap has no batching rule for CPU SDPA (a slow fallback): its rows use eager attention;
    # --attention eager gives every method eager attention (a like-for-like comparison).
    model = make_model(size, device, "eager" if method == "vmap_dense" else spec["attention"])
    num_params = sum(p.numel() for p in model.parameters())
    slow = method in SLOW and num_params > SLOW_PARAMS
    batch_size = min(spec["batch_size"], spec["slow_examples"]) if slow else spec["batch_size"]
    count = 1 if slow else spec["batches"]
    warm = None if slow else make_batches(size, batch_size, 1, device, seed=0)[0]
    batches = make_batches(size, batch_size, count, device)
    result = {"size": size, "method": method, "num_params": num_params, "batch_size": batch_size,
              "timed_batches": count, "warmup": warm is not None}
    t0 = time.perf_counter()
    stages = None
    if method == "fwd_bwd":
        task = NextTokenMargin()

        def step(batch):
            task.outputs(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
    elif method == "bergson":
        step, stages = bergson_runner(model, spec, batch_size, count, warm, batches, result)
    else:
        kwargs = dict(task=NextTokenMargin(), proj_dim=PROJ_DIM)
        if method == "vmap_dense":
            kwargs["gradients"] = "vmap"
        elif method == "hooks_dense":
            kwargs["gradients"] = "hooks"
        else:
            kwargs.update(gradients="hooks", projection="factored", factored_dims=FACTORED, proj_dim=None)
        featurizer = trak_fast.Featurizer(model, model.state_dict(), **kwargs)
        result["num_features"] = featurizer.num_features
        result["hooked_params"] = sum(featurizer.params[n].numel() for n in featurizer.plan.hooked)
        result["vmapped_params"] = sum(featurizer.params[n].numel() for n in featurizer.plan.vmapped)
        stages = Stages(device)

        def step(batch):
            phi, _ = featurizer(batch)
            phi.cpu()
    result["setup_seconds"] = time.perf_counter() - t0
    result["rss_after_setup_mb"] = rss_mb()
    if method != "bergson":
        if warm is not None:
            step(warm)
        sync(device)
        if stages is not None:
            instrument(featurizer, stages)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for batch in batches:
            sync(device)
            t0 = time.perf_counter()
            step(batch)
            sync(device)
            times.append(time.perf_counter() - t0)
    else:
        times = step()
    total = sum(times)
    median = sorted(times)[len(times) // 2]
    result["seconds_per_batch"] = times
    result["tokens_per_s"] = batch_size * SEQ_LEN / median
    result["tokens_per_s_mean"] = batch_size * SEQ_LEN * count / total
    result["seconds_per_example"] = median / batch_size
    if stages is not None and isinstance(stages, Stages):
        result["stage_seconds"] = stages.seconds
        result["stage_shares"] = stage_shares(method, stages.seconds, total)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bergson_runner(model, spec, batch_size, count, warm, batches, result):
    """bergson's own driver: an ``InMemoryCollector`` per run, warm-up run first."""
    from bergson import CollectorComputer, GradientProcessor, InMemoryCollector, IndexConfig
    from datasets import Dataset

    base = model.base_model
    targets = set(conv1d_names(base))
    result["tracked_modules"] = len(targets)
    result["include_bias"] = spec.get("bergson_bias", False)

    def run(rows: List[dict]) -> float:
        ids = torch.cat([b["input_ids"] for b in rows]).cpu()
        data = Dataset.from_dict({"input_ids": ids.tolist()})
        size = rows[0]["input_ids"].shape[0]
        index = [list(range(i, i + size)) for i in range(0, len(ids), size)]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = IndexConfig(run_path=os.path.join(tmp, "run"), projection_dim=FACTORED[0])
            os.makedirs(cfg.partial_run_path, exist_ok=True)
            processor = GradientProcessor(projection_dim=FACTORED[0], include_bias=result["include_bias"])
            collector = InMemoryCollector(model=base, data=data, cfg=cfg, processor=processor,
                                          target_modules=targets)
            computer = CollectorComputer(model=model, data=data, collector=collector, batches=index, cfg=cfg)
            sync(spec["device"])
            t0 = time.perf_counter()
            computer.run_with_collector_hooks(desc="bench")
            sync(spec["device"])
            seconds = time.perf_counter() - t0
        result["num_features"] = sum(g.shape[1] for g in collector.gradients.values())
        result["rows"] = int(next(iter(collector.gradients.values())).shape[0])
        return seconds

    def step():
        if warm is not None:
            run([warm])
        return [run([batch]) for batch in batches]
    return step, None


def child_env() -> dict:
    """The children's environment: ``OMP_WAIT_POLICY=PASSIVE`` unless set. On a machine shared
    with other jobs, OpenMP threads that spin while they wait for a busy core made 2 threads up
    to 20x slower than 1 in our runs; passive waiting removes that (and costs nothing when the
    machine is quiet enough to notice)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def spawn(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"size": spec["size"], "method": spec["method"], "error": tail}
    return json.loads(lines[-1])


# ---- correctness before timing -------------------------------------------------------------

def check_correctness(device: str) -> dict:
    """On the smallest configuration: hooks dense vs vmap dense, factored vs ``P_out^T G P_in``."""
    model = make_model("1M", device)
    batch = make_batches("1M", 3, 1, device, seed=5)
    task = NextTokenMargin()
    dense = {g: trak_fast.featurize(model, model.state_dict(), batch, task=task, gradients=g,
                                    proj_dim=PROJ_DIM, device=device).phi.double()
             for g in ("vmap", "hooks")}
    rel_dense = ((dense["hooks"] - dense["vmap"]).norm() / dense["vmap"].norm()).item()
    # Exact per-layer gradients (raw, hook path) projected by hand with the featurizer's matrices.
    # The Conv1D layers' form by hand (embeddings and norms: tests/test_hf_families.py).
    conv1d = [f"{name}.{role}" for name, m in model.named_modules() if type(m).__name__ == "Conv1D"
              for role in ("weight", "bias")]
    factored = trak_fast.Featurizer(model, model.state_dict(), task=task, gradients="hooks", proj_dim=None,
                                    projection="factored", factored_dims=FACTORED, device=device,
                                    grad_wrt=conv1d)
    phi_f = factored(batch[0])[0].double()
    raw = trak_fast.Featurizer(model, model.state_dict(), task=task, gradients="hooks", proj_dim=None,
                               grad_wrt=factored.grad_names, device=device)
    phi_raw = raw(batch[0])[0].double()
    raw_cols = {b.name: (b.start, b.stop) for b in raw.layout}
    pieces = []
    for block in factored.layout:
        start, stop = raw_cols[block.name]
        g = phi_raw[:, start:stop]
        key = block.name.rsplit(".", 1)[0] + ".weight"
        p_out = factored.matrices.p_out[key].double()
        if block.name.endswith(".weight"):           # Conv1D stores W [d_in, d_out] = G^T
            d_in, d_out = factored.params[block.name].shape
            G = g.reshape(-1, d_in, d_out).transpose(1, 2)
            p_in = factored.matrices.p_in[key].double()
            pieces.append((p_out.T @ G @ p_in).reshape(len(g), -1))
        else:
            pieces.append(g @ p_out)
    ref = torch.cat(pieces, 1)
    rel_factored = ((phi_f - ref).norm() / ref.norm()).item()
    out = {"hooks_vs_vmap_dense_rel": rel_dense, "factored_vs_explicit_rel": rel_factored,
           "factored_num_features": factored.num_features}
    if rel_dense > 1e-4 or rel_factored > 1e-4:
        raise SystemExit(f"correctness check failed: {out}")
    return out


# ---- the run -----------------------------------------------------------------------------------

def bergson_available() -> Optional[str]:
    try:
        import importlib.metadata as md

        import bergson  # noqa: F401
        return md.version("bergson")
    except Exception as exc:   # not installed, or a dependency missing
        print(f"bergson not importable ({type(exc).__name__}: {exc}); skipping it")
        return None


def targets(results: Dict[str, Dict[str, dict]]) -> List[dict]:
    """The issue's targets, evaluated on this run's numbers."""
    rows = []

    def tps(size, method):
        r = results.get(size, {}).get(method)
        return r.get("tokens_per_s") if r and "error" not in r else None

    def rss(size, method):
        r = results.get(size, {}).get(method)
        return r.get("peak_rss_mb") if r and "error" not in r else None

    for size in results:
        v, h, f, p, b = (tps(size, m) for m in ("vmap_dense", "hooks_dense", "hooks_factored", "fwd_bwd", "bergson"))
        if v and h:
            need = 0.9 if size == "1M" else 1.0
            rows.append({"size": size, "target": f"hooks dense >= {need}x vmap dense tokens/s",
                         "ratio": h / v, "met": h / v >= need})
            rv, rh = rss(size, "vmap_dense"), rss(size, "hooks_dense")
            rows.append({"size": size, "target": "hooks dense peak RSS <= vmap dense",
                         "ratio": rh / rv, "met": rh <= rv})
        if f and p:
            rows.append({"size": size, "target": "factored >= 0.8x plain fwd+bwd tokens/s",
                         "ratio": f / p, "met": f / p >= 0.8})
        if f and v and results[size]["hooks_factored"]["num_params"] > SLOW_PARAMS:
            rows.append({"size": size, "target": "factored >= 8x vmap dense tokens/s",
                         "ratio": f / v, "met": f / v >= 8})
        if f and b:
            rows.append({"size": size, "target": "factored >= bergson tokens/s (16x16, Conv1D modules)",
                         "ratio": f / b, "met": f >= b})
    return rows


def print_table(results: Dict[str, Dict[str, dict]]) -> None:
    print(f"\n{'size':<6}{'params':>8} {'method':<16}{'B x n':>7}{'tokens/s':>10}{'s/example':>11}"
          f"{'x fwd+bwd':>10}{'peak RSS MB':>12}  stages (share of time)")
    for size, methods in results.items():
        base = methods.get("fwd_bwd", {}).get("tokens_per_s")
        for method, r in methods.items():
            if "error" in r:
                print(f"{size:<6}{'':>8} {method:<16} ERROR: {r['error'].strip().splitlines()[-1][:120]}")
                continue
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("stage_shares", {}).items())
            ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
            print(f"{size:<6}{r['num_params'] / 1e6:>7.1f}M {method:<16}"
                  f"{r['batch_size']:>4}x{r['timed_batches']:<2}{r['tokens_per_s']:>10.1f}"
                  f"{r['seconds_per_example']:>11.3f}{ratio:>10}{r['peak_rss_mb']:>12.0f}  {shares}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per configuration")
    parser.add_argument("--slow-examples", type=int, default=8,
                        help="batch size of the dense methods above 50M parameters (one timed batch, "
                             "no warm-up: ~10 s per example)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                        help="attention of every method but vmap_dense (always eager) [sdpa]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bergson-bias", action="store_true",
                        help="bergson with include_bias=True (its default is False)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--machine-state", default="machine state not stated (pass --machine-state)",
                        help="recorded in the JSON")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return {}
    torch.set_num_threads(args.threads)
    report = {"device": args.device, "cpu": cpu_model(), "cores": os.cpu_count(),
              "machine_state": args.machine_state, "torch": torch.__version__, "threads": args.threads, "attention": args.attention,
              "seq_len": SEQ_LEN, "proj_dim": PROJ_DIM, "factored_dims": FACTORED,
              "batch_size": args.batch_size, "batches": args.batches, "slow_examples": args.slow_examples,
              "configs": {s: dict(zip(("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"), v))
                          for s, v in SIZES.items() if s in args.sizes},
              "omp_wait_policy": child_env()["OMP_WAIT_POLICY"],
              "load_average_at_start": os.getloadavg()}
    import transformers
    report["transformers"] = transformers.__version__
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    if not args.skip_check:
        report["checks"] = check_correctness(args.device)
        print("correctness:", report["checks"])
    methods = list(args.methods)
    if "bergson" in methods:
        report["bergson"] = bergson_available()
        if report["bergson"] is None:
            methods.remove("bergson")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "bench_featurize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict[str, dict]] = {}
    report["results"] = results
    for size in args.sizes:
        results[size] = {}
        for method in methods:
            spec = dict(size=size, method=method, device=args.device, threads=args.threads,
                        attention=args.attention,
                        batch_size=args.batch_size, batches=args.batches,
                        slow_examples=args.slow_examples, bergson_bias=args.bergson_bias)
            t0 = time.time()
            results[size][method] = r = spawn(spec)
            print(f"  {size} {method}: " + (f"{r['tokens_per_s']:.1f} tokens/s, peak RSS "
                                            f"{r['peak_rss_mb']:.0f} MB" if "error" not in r else
                                            "ERROR " + r["error"][-300:]) + f" ({time.time() - t0:.0f} s)",
                  flush=True)
            out.write_text(json.dumps({**report, "partial": True}, indent=1))   # survives an interrupted run
    report["targets"] = targets(results)
    report["load_average_at_end"] = os.getloadavg()
    print_table(results)
    print("\ntargets:")
    for t in report["targets"]:
        print(f"  {t['size']:<6}{t['target']:<58}{t['ratio']:>7.2f}  {'met' if t['met'] else 'MISSED'}")
    print(f"\n{report['cpu']}, {args.threads} threads, {args.machine_state}; load average "
          f"{report['load_average_at_start'][0]:.1f} -> {report['load_average_at_end'][0]:.1f}")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
