"""``python -m trak_fast demo``: attribute a real classifier end to end, in a few minutes on a CPU.

1. Data: scikit-learn's handwritten digits (1,797 real 8x8 images, embedded, no download), a fixed
   split into ``n`` training images and 100 held-out targets (``trak_fast.digits.load_digits``).
2. Models: an ensemble of MLPs 64-128-10 trained from scratch, one seed each.
3. TRAK: ``trak_fast.attribute`` gives ``tau [n, 100]``; ``tau[i, t] > 0`` means training image ``i``
   pushed target ``t``'s margin up (a proponent), ``< 0`` down (an opponent).
4. Output: a table of the top proponents and opponents of a few targets, ``attributions.png``
   (each target beside them, upscaled, labelled with scores), ``scores.npy``, ``summary.json``.
5. Check: the LDS of these scores on a reduced number of retrained subsets (see ``trak_fast.lds``;
   ``benchmarks/lds.py`` is the full harness).

Every stage's time is printed. matplotlib is optional (``pip install trak_fast[demo]``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from . import digits
from . import lds as L

PROG = "python -m trak_fast demo"


def _positive_int(name: str):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value!r}") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {number}")
        return number
    return parse


def _proj_dim(value: str) -> Optional[int]:
    if value.lower() == "none":
        return None
    return _positive_int("--proj-dim")(value)


def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {value!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {value!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {value!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"device {value!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train a small ensemble on scikit-learn's digits, attribute its predictions "
        "with TRAK, print and draw the top proponents/opponents, and check the scores with the LDS.")
    parser.add_argument("--models", type=_positive_int("--models"), default=5,
                        help="number of models in the ensemble (default 5)")
    parser.add_argument("--proj-dim", type=_proj_dim, default=2048,
                        help="projection dimension k, or 'none' for raw gradients (default 2048)")
    parser.add_argument("--kind", choices=["rademacher", "gaussian", "sparse"], default="rademacher",
                        help="random projection kind (default rademacher)")
    parser.add_argument("--nnz", type=_positive_int("--nnz"), default=4,
                        help="nonzeros per row for --kind sparse (1..64, default 4)")
    parser.add_argument("--device", type=_device, default=torch.device("cpu"),
                        help="where TRAK runs: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for smoke tests: 300 training images, 2 models, k=256, 8 LDS subsets")
    parser.add_argument("--targets", type=_positive_int("--targets"), default=4,
                        help="targets shown in the table and the picture (default 4)")
    parser.add_argument("--top", type=_positive_int("--top"), default=5,
                        help="proponents and opponents shown per target (default 5)")
    parser.add_argument("--lds-subsets", type=int, default=50,
                        help="random halves of the training set for the LDS check, each retrained twice "
                             "(margins averaged); 0 skips it (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and the projection (default 0)")
    parser.add_argument("--threads", type=_positive_int("--threads"), default=1,
                        help="CPU threads for torch (default 1: the models are tiny, and on a busy machine extra "
                             "threads spin-wait and slow every stage down many times over)")
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lds_subsets < 0 or args.lds_subsets == 1:
        parser.error(f"argument --lds-subsets: must be 0 (skip) or >= 2, got {args.lds_subsets}")
    args.n_train = 1000
    args.epochs = 30
    if args.quick:
        # Only shrink what the user left at its default.
        defaults = parser.parse_args([])
        args.n_train, args.epochs = 300, 15
        if args.models == defaults.models:
            args.models = 2
        if args.proj_dim == defaults.proj_dim:
            args.proj_dim = 256
        if args.lds_subsets == defaults.lds_subsets:
            args.lds_subsets = 8
    return args


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny MLPs train fastest on one thread; on a busy machine, extra threads spin-wait and a
    0.1 s training run can take tens of seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Stopwatch:
    """Named stage timings, printed as they finish."""

    def __init__(self) -> None:
        self.times: Dict[str, float] = {}

    def run(self, name: str, fn, *a, **kw):
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        self.times[name] = time.perf_counter() - t0
        print(f"[{name}] done in {self.times[name]:.1f} s", flush=True)
        return result


def train_ensemble(x: torch.Tensor, y: torch.Tensor, count: int, seed: int, epochs: int) -> List[dict]:
    """``count`` MLPs trained on all of ``(x, y)``, model ``m`` from seed ``seed + m``; their state_dicts."""
    out = []
    with one_thread():
        for m in range(count):
            model = digits.train(digits.make_mlp(seed=seed + m), x, y, epochs=epochs, seed=seed + m)
            out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def pick_targets(y_target: torch.Tensor, count: int) -> List[int]:
    """The first targets with distinct labels (then any), so the picture shows different digits."""
    chosen, seen = [], set()
    for t, label in enumerate(y_target.tolist()):
        if label not in seen:
            chosen.append(t)
            seen.add(label)
        if len(chosen) == count:
            return chosen
    rest = [t for t in range(len(y_target)) if t not in chosen]
    return chosen + rest[:count - len(chosen)]


def top_examples(scores: torch.Tensor, target: int, top: int) -> Dict[str, List[int]]:
    column = scores[:, target]
    order = torch.argsort(column, descending=True)
    return {"proponents": order[:top].tolist(), "opponents": order.flip(0)[:top].tolist()}


def print_table(scores: torch.Tensor, y_train: torch.Tensor, y_target: torch.Tensor, probs: torch.Tensor,
                targets: List[int], top: int) -> List[dict]:
    """Prints and returns the top proponents/opponents of each target; ``probs [T, 10]``: the ensemble's."""
    rows = []
    predicted = probs.argmax(1)
    for t in targets:
        best = top_examples(scores, t, top)
        p_label = probs[t, int(y_target[t])].item()
        print(f"\ntarget #{t}: label {int(y_target[t])}, ensemble predicts {int(predicted[t])} "
              f"(p(label) = {p_label:.3f})")
        print(f"  {'rank':>4}  {'proponent':>9} {'label':>5} {'score':>10}   {'opponent':>9} {'label':>5} {'score':>10}")
        for r, (p, o) in enumerate(zip(best["proponents"], best["opponents"]), 1):
            print(f"  {r:>4}  {p:>9} {int(y_train[p]):>5} {scores[p, t].item():>+10.4f}   "
                  f"{o:>9} {int(y_train[o]):>5} {scores[o, t].item():>+10.4f}")
        rows.append({"target": t, "label": int(y_target[t]), "predicted": int(predicted[t]), "p_label": p_label,
                     **{kind: [{"index": i, "label": int(y_train[i]), "score": scores[i, t].item()}
                               for i in best[kind]] for kind in ("proponents", "opponents")}})
    return rows


def draw(table: List[dict], x_train: torch.Tensor, x_target: torch.Tensor, path: Path) -> bool:
    """Saves the picture: one row per target, [target | proponents | opponents], 8x8 images upscaled."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} "
              "(install it with `pip install matplotlib` or `pip install trak_fast[demo]`)")
        return False
    top = len(table[0]["proponents"])
    cols = 1 + 2 * top + 1          # target, proponents, a spacer, opponents (spacer after the target too)
    fig, axes = plt.subplots(len(table), cols + 1, figsize=(1.25 * (cols + 1), 1.85 * len(table) + 0.6),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 0.25] + [1] * top + [0.25] + [1] * top})
    for r, row in enumerate(table):
        cells = ([("target", row["target"], None, x_target[row["target"]])] + [None]
                 + [("proponent", e["index"], e, x_train[e["index"]]) for e in row["proponents"]] + [None]
                 + [("opponent", e["index"], e, x_train[e["index"]]) for e in row["opponents"]])
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            role, index, entry, image = cell
            ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            color = {"target": "black", "proponent": "tab:green", "opponent": "tab:red"}[role]
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2.5 if role != "target" else 1.5)
            if role == "target":
                ax.set_title(f"target #{index}: label {row['label']}\npred {row['predicted']}, "
                             f"p = {row.get('p_label', float('nan')):.2f}", fontsize=8)
            else:
                ax.set_title(f"{entry['score']:+.3f}\n#{index}  label {entry['label']}", fontsize=7.5, color=color)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    # Group headings above the first proponent and the first opponent column.
    for column, text, color in [(2, "top proponents (raise the target's margin)", "tab:green"),
                                (3 + top, "top opponents (lower it)", "tab:red")]:
        fig.text(axes[0, column].get_position().x0, 0.985, text, color=color, ha="left", va="top", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def lds_check(scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_target: torch.Tensor,
              y_target: torch.Tensor, subsets: int, seed: int, epochs: int, retrains: int = 2) -> L.LDSResult:
    """Retrains ``retrains`` models per random half of the training set (own seeds), averages their target
    margins, and scores the prediction ``sum_{i in S_j} tau_i`` against them (``trak_fast.lds``)."""
    masks = L.draw_subsets(len(x), subsets, 0.5, seed=seed)
    margins = torch.zeros(subsets, len(x_target), dtype=torch.float64)
    with one_thread():
        for j in range(subsets):
            idx = masks[j].nonzero().squeeze(1)
            for r in range(retrains):
                model_seed = 10_000 + 1_000 * r + seed + j
                model = digits.train(digits.make_mlp(seed=model_seed), x[idx], y[idx], epochs=epochs, seed=model_seed)
                with torch.no_grad():
                    margins[j] += L.classification_margins(model(x_target), y_target) / retrains
    return L.lds(scores, masks, margins)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from ..pipeline.attribute import attribute   # the pipeline; imported here so --help stays instant

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, attribute)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, attribute) -> int:
    clock = Stopwatch()
    x, y, xt, yt = clock.run("load data", digits.load_digits, args.n_train, 100, split_seed=0)
    print(f"  digits: {len(x)} training images, {len(xt)} held-out targets, 8x8 pixels, 10 classes")
    ckpts = clock.run(f"train {args.models} models", train_ensemble, x, y, args.models, args.seed, args.epochs)
    model = digits.make_mlp(seed=args.seed)
    with torch.no_grad():
        probs = torch.zeros(len(xt), 10)
        accs = []
        for sd in ckpts:
            model.load_state_dict(sd)
            logits = model(xt)
            accs.append((logits.argmax(1) == yt).float().mean().item())
            probs += torch.softmax(logits, dim=1) / len(ckpts)
    predicted = probs.argmax(1)
    print(f"  held-out accuracy per model: {', '.join(f'{a:.3f}' for a in accs)}; "
          f"ensemble {(predicted == yt).float().mean().item():.3f}")

    k = "none (raw gradients)" if args.proj_dim is None else args.proj_dim
    print(f"  TRAK: M = {args.models}, k = {k}, {args.kind}, device {args.device}")
    scores = clock.run("TRAK", attribute, digits.make_mlp(seed=args.seed), ckpts, digits.batches(x, y),
                       digits.batches(xt, yt), proj_dim=args.proj_dim, kind=args.kind, nnz=args.nnz, seed=args.seed,
                       device=args.device, progress=False)
    scores = scores.detach().cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "scores.npy", scores.numpy())

    shown = pick_targets(yt, min(args.targets, len(yt)))
    table = print_table(scores, y, yt, probs, shown, min(args.top, len(x)))
    picture = args.out / "attributions.png"
    drawn = clock.run("picture", draw, table, x, xt, picture)
    if drawn:
        print(f"  wrote {picture}")

    result = None
    if args.lds_subsets:
        print(f"  LDS: {args.lds_subsets} random halves of the training set, 2 retrained models each "
              "(the full harness, benchmarks/lds.py, uses 100 halves)")
        result = clock.run("LDS check", lds_check, scores, x, y, xt, yt, args.lds_subsets, args.seed, args.epochs)
        print(f"  LDS = {result.mean:.3f}, 95% CI [{result.ci_low:.3f}, {result.ci_high:.3f}] over {len(yt)} targets "
              "(Spearman between predicted and retrained margins; 0 = no signal, 1 = perfect)")

    total = sum(clock.times.values())
    print("\nstage times:")
    for name, seconds in clock.times.items():
        print(f"  {name:<16} {seconds:7.1f} s")
    print(f"  {'total':<16} {total:7.1f} s")
    summary = {"settings": {"models": args.models, "proj_dim": args.proj_dim, "kind": args.kind, "nnz": args.nnz,
                            "device": str(args.device), "n_train": len(x), "n_targets": len(xt),
                            "quick": args.quick, "seed": args.seed},
               "accuracy": {"per_model": accs, "ensemble": (predicted == yt).float().mean().item()},
               "scores_shape": list(scores.shape), "table": table, "stage_seconds": clock.times,
               "lds": None if result is None else {**result.as_dict(), "subsets": args.lds_subsets},
               "picture": str(picture) if drawn else None}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}/scores.npy, summary.json" + (", attributions.png" if drawn else ""))
    return 0
