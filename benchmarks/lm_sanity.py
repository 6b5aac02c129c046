"""Language-model sanity check: do a target sequence's top TRAK proponents come from its own source?

    python benchmarks/lm_sanity.py                          # dense, ~35 s CPU, 1-2 min on the loaded 2 cores
    python benchmarks/lm_sanity.py --projection factored    # factored 16 x 16 per layer

Data: ``--sources`` synthetic sources over one small vocabulary, each a first-order Markov chain
with its own rule: every token has ``--branching`` successors (default 1), drawn per source,
and with probability ``--noise`` the next token is uniform instead. Sequences have random
lengths and are right-padded per batch with an attention mask, so the task's padding handling
is exercised. With 3 equally likely successors per token the share falls to 0.725.
A likely reason: at a well-fitted model a token's margin gradient points away from the
context's other successors, so same-source sequences that branch differently look dissimilar.

Model: a tiny GPT-2 (``GPT2LMHeadModel`` from a ``GPT2Config``, eager attention, no download)
trained on all sources' train sequences with AdamW for a few epochs, ``--models`` times from
different seeds.

TRAK: ``trak_fast.attribute(..., task="language_modeling")`` over the train sequences for
held-out target sequences (fresh draws from the same sources). For each target, the share of
its 10 largest-scoring train sequences (proponents) that come from the target's own source.
Chance is ``1 / sources``. Pass: mean share >= 0.9.

Prints a table and writes ``benchmarks/results/lm_sanity.json``: one entry per projection (and
per ``--seed`` other than 0, which redraws the data, the models and the projection), so dense and
factored runs sit side by side.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

import trak_fast

RESULTS = Path(__file__).resolve().parent / "results" / "lm_sanity.json"


def markov_rules(sources: int, vocab: int, branching: int, seed: int) -> torch.Tensor:
    """``[sources, vocab, vocab]`` transition matrices: each row puts its mass on ``branching`` tokens."""
    g = torch.Generator().manual_seed(seed)
    rules = torch.zeros(sources, vocab, vocab)
    for s in range(sources):
        for i in range(vocab):
            successors = torch.randperm(vocab, generator=g)[:branching]
            rules[s, i, successors] = 1.0 / branching
    return rules


def sample(rules: torch.Tensor, source: int, count: int, min_len: int, max_len: int, noise: float,
           g: torch.Generator) -> List[torch.Tensor]:
    vocab = rules.shape[-1]
    out = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        seq = [int(torch.randint(vocab, (1,), generator=g))]
        for _ in range(length - 1):
            probs = (1 - noise) * rules[source, seq[-1]] + noise / vocab
            seq.append(int(torch.multinomial(probs, 1, generator=g)))
        out.append(torch.tensor(seq))
    return out


def pad_batches(seqs: List[torch.Tensor], batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Right-padded dict batches in order: ``input_ids`` (pad 0) and ``attention_mask``."""
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def make_model(vocab: int, max_len: int, width: int, layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=width, n_layer=layers,
                        n_head=4, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def train(model, batches: List[Dict[str, torch.Tensor]], epochs: int, lr: float, seed: int) -> float:
    """AdamW on the token-mean cross-entropy (padding masked); returns the last epoch's loss per token."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    per_token = float("nan")
    for _ in range(epochs):
        total, tokens = 0.0, 0
        for index in torch.randperm(len(batches), generator=g).tolist():
            batch = batches[index]
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
            logits = model(**batch).logits[:, :-1]       # position t predicts token t + 1
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            count = int((labels != -100).sum())
            total += loss.item() * count
            tokens += count
        per_token = total / tokens
    model.eval()
    return per_token


def projection_kwargs(projection: str, factored_dims: Tuple[int, int]) -> dict:
    if projection == "dense":
        return {}
    accepted = inspect.signature(trak_fast.attribute).parameters
    if "projection" not in accepted or "factored_dims" not in accepted:
        raise SystemExit(
            "lm_sanity: --projection factored needs trak_fast.attribute(projection=..., "
            "factored_dims=...), which this trak_fast "
            f"({trak_fast.__file__}) does not have yet; run with --projection dense")
    return {"projection": "factored", "factored_dims": tuple(factored_dims)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    extra = projection_kwargs(args.projection, args.factored_dims)
    g = torch.Generator().manual_seed(args.seed)
    rules = markov_rules(args.sources, args.vocab, args.branching, args.seed)
    train_seqs, train_src, target_seqs, target_src = [], [], [], []
    for s in range(args.sources):
        train_seqs += sample(rules, s, args.train_per_source, args.min_len, args.max_len, args.noise, g)
        train_src += [s] * args.train_per_source
        target_seqs += sample(rules, s, args.targets_per_source, args.min_len, args.max_len, args.noise, g)
        target_src += [s] * args.targets_per_source
    # Interleave the sources so every batch mixes them (and padding lengths vary within a batch).
    order = torch.randperm(len(train_seqs), generator=g).tolist()
    train_seqs = [train_seqs[i] for i in order]
    train_src = torch.tensor([train_src[i] for i in order])
    target_src = torch.tensor(target_src)
    train_batches = pad_batches(train_seqs, args.batch_size)
    target_batches = pad_batches(target_seqs, args.batch_size)

    t0 = time.perf_counter()
    checkpoints, losses = [], []
    for m in range(args.models):
        model = make_model(args.vocab, args.max_len, args.width, args.layers, seed=1000 + m)
        losses.append(train(model, train_batches, args.epochs, args.lr, seed=2000 + m))
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    train_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    scores = trak_fast.attribute(model, checkpoints, train_batches, target_batches,
                                 task="language_modeling", proj_dim=args.proj_dim, seed=args.seed,
                                 progress=False, **extra)
    trak_s = time.perf_counter() - t0

    top = scores.topk(args.top, dim=0).indices                      # [top, n_targets]
    share = (train_src[top] == target_src[None, :]).double().mean(0)  # [n_targets]
    rows = [{"target": t, "source": int(target_src[t]), "length": len(target_seqs[t]),
             "own_source_share": float(share[t])} for t in range(len(target_seqs))]
    return {
        "projection": args.projection,
        "factored_dims": list(args.factored_dims) if args.projection == "factored" else None,
        "proj_dim": args.proj_dim if args.projection == "dense" else None,
        "mean_own_source_share": float(share.mean()),
        "min_own_source_share": float(share.min()),
        "chance": 1.0 / args.sources,
        "passed": bool(share.mean() >= 0.9),
        "model_params": params,
        "train_loss_per_token": losses,
        "seconds": {"train": round(train_s, 1), "trak": round(trak_s, 1)},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                     if k != "out"},
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
                   "loaded shared machine",
        "targets": rows,
    }


def print_table(report: dict) -> None:
    print(f"\nLM sanity check, projection={report['projection']}"
          + (f" {report['factored_dims']}" if report["factored_dims"] else f" k={report['proj_dim']}")
          + f"; GPT-2 with {report['model_params']:,} params, "
          f"{report['settings']['models']} checkpoint(s), train loss/token "
          + ", ".join(f"{x:.3f}" for x in report["train_loss_per_token"]))
    print(f"{'target':>6} {'source':>6} {'length':>6} {'own-source share of top-10':>27}")
    for row in report["targets"]:
        print(f"{row['target']:>6} {row['source']:>6} {row['length']:>6} {row['own_source_share']:>27.2f}")
    print(f"mean {report['mean_own_source_share']:.3f}, min {report['min_own_source_share']:.2f}, "
          f"chance {report['chance']:.2f}: {'PASS' if report['passed'] else 'FAIL'} (target >= 0.90)")
    print(f"time: train {report['seconds']['train']} s, TRAK {report['seconds']['trak']} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--projection", choices=["dense", "factored"], default="dense")
    parser.add_argument("--factored-dims", type=int, nargs=2, default=(16, 16), metavar=("K_OUT", "K_IN"))
    parser.add_argument("--proj-dim", type=int, default=1024, help="k of the dense projection")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--branching", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--train-per-source", type=int, default=50)
    parser.add_argument("--targets-per-source", type=int, default=5)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    key = report["projection"] + ("" if args.seed == 0 else f", seed {args.seed}")
    results[key] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
