"""Language-model LDS: trak_fast, its peers and curvature prototypes on a small GPT-2 (issue 24).

    python benchmarks/bench_lm_lds.py                       # 2-layer width-64 GPT-2 (~110k params)
    python benchmarks/bench_lm_lds.py --size medium         # 4 layers, width 96 (~470k params)
    python benchmarks/bench_lm_lds.py --completion          # loss on completions only (-100 prompt)
    python benchmarks/bench_lm_lds.py --methods grad_dot,fisher_factored   # a subset of methods

**Corpus.** Real English text that is on every machine with this venv, no download: the
docstrings of ~90 modules of Python's standard library (``inspect.getdoc`` of each module and of
its public members), whitespace collapsed, characters outside printable ASCII dropped. Tokens are
characters (vocabulary 96: printable ASCII and one unknown id). The docstrings are shuffled with
a fixed seed and cut into non-overlapping chunks of ``--seq-len`` characters; the first chunks
until ``--n-train + --n-targets`` are split at random into train sequences and target sequences,
so most targets have train chunks from the same docstring (and module) as neighbours. The corpus
depends on the Python version (3.11 here); its SHA-1 goes into the JSON.

**Models.** ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` (eager attention, no dropout,
tied embeddings, never downloaded), trained from scratch with AdamW on the token-mean
cross-entropy. M = 3 full-data models (seeds 0, 1, 2) and ``--subsets`` random halves of the train
set, each retrained once with its own seed (init and order). Everything trained is cached under
``benchmarks/cache/lm_lds/`` (gitignored).

**Measurement.** For a target ``z`` the output is ``f(z) = sum_t m_t``, the summed margins
``m_t = logit_y - logsumexp_{c != y} logit`` of ``task="language_modeling"``. LDS = mean over
targets of Spearman (``scipy.stats.spearmanr``) between ``sum_{i in S_j} tau[i, z]`` and
``f(z; theta_{S_j})`` over subsets ``j``, 95% bootstrap interval over targets (2000 draws).

**Methods** (``benchmarks/lm_methods.py``): each turns one checkpoint into scores ``S_m [n, t]``
(and the TRAK forms also ``Q_m``); the ensemble over M models is ``mean_m S_m`` (TRAK forms:
``mean_m(S_m) * mean_m(Q_m)``, as trak_fast does). "seconds per model" is the wall time of one
checkpoint's features, curvature and scores (train and targets), averaged over the M = 3 models,
on this machine in its current state (recorded in the JSON); compare times only between rows of
one run (each row records when its run finished and the load average then). A run's rows replace
the same rows of an earlier run with the same settings in the JSON; the others are kept.

Writes ``benchmarks/results/bench_lm_lds[_<size>][_completion].json``.
"""
from __future__ import annotations

import argparse
import itertools
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

import trak_fast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# benchmarks/cache/ is gitignored; where it is a dangling link, the (also ignored) build/ folder.
CACHE = (HERE / "cache" / "lm_lds") if (HERE / "cache").exists() or not (HERE / "cache").is_symlink() \
    else HERE.parent / "build" / "bench_cache" / "lm_lds"
RESULTS = HERE / "results"

# ----------------------------------------------------------------------------------------------
# Corpus: Python standard-library docstrings, character tokens.
# ----------------------------------------------------------------------------------------------
STDLIB_MODULES = [
    "os", "re", "json", "collections", "itertools", "functools", "string", "textwrap", "random",
    "math", "statistics", "pathlib", "argparse", "logging", "datetime", "calendar", "heapq",
    "bisect", "fractions", "decimal", "csv", "shutil", "subprocess", "threading", "queue",
    "socket", "email", "http.client", "urllib.parse", "inspect", "typing", "dataclasses", "enum",
    "abc", "io", "tempfile", "glob", "fnmatch", "difflib", "pprint", "copy", "pickle", "struct",
    "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid", "unittest", "doctest",
    "contextlib", "operator", "weakref", "types", "sched", "time", "locale", "gettext", "codecs",
    "unicodedata", "base64", "binascii", "html", "xml.dom.minidom", "sqlite3", "asyncio",
    "concurrent.futures", "multiprocessing", "signal", "traceback", "warnings", "tokenize", "ast",
    "dis", "pdb", "timeit", "trace", "cmd", "shlex", "configparser", "platform",
]
VOCAB = 96                      # ids 0..94: chr(32)..chr(126); 95: anything else


def docstrings() -> List[str]:
    """Every docstring of the listed modules and their public members, cleaned, in a fixed order."""
    out = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [obj for key, obj in sorted(vars(module).items())
                              if not key.startswith("_") and getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc:
                text = re.sub(r"\s+", " ", doc).strip()
                if len(text) >= 32:
                    out.append(text)
    return out


def encode(text: str) -> torch.Tensor:
    ids = [ord(c) - 32 if 32 <= ord(c) < 127 else VOCAB - 1 for c in text]
    return torch.tensor(ids, dtype=torch.long)


def make_corpus(n_train: int, n_targets: int, seq_len: int, seed: int = 0):
    """``(train [n_train, T], targets [n_targets, T], sha1)`` of character ids."""
    docs = docstrings()
    digest = hashlib.sha1("\x00".join(docs).encode()).hexdigest()
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for index in torch.randperm(len(docs), generator=g).tolist():
        text = docs[index]
        for start in range(0, len(text) - seq_len + 1, seq_len):
            chunks.append(encode(text[start:start + seq_len]))
        if len(chunks) >= n_train + n_targets:
            break
    chunks = torch.stack(chunks[:n_train + n_targets])
    order = torch.randperm(len(chunks), generator=g)
    return chunks[order[:n_train]], chunks[order[n_train:]], digest


# ----------------------------------------------------------------------------------------------
# Models and training.
# ----------------------------------------------------------------------------------------------
SIZES = {"small": dict(n_layer=2, n_embd=64, n_head=4), "medium": dict(n_layer=4, n_embd=96, n_head=4)}


def make_model(size: str, seq_len: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=seq_len, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **SIZES[size])
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


def labels_of(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """HF labels: the ids, with the first ``prompt_len`` positions -100 (not predicted)."""
    labels = ids.clone()
    if prompt_len:
        labels[:, :prompt_len] = -100
    return labels


def batches(ids: torch.Tensor, prompt_len: int, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Dict batches for ``task="language_modeling"`` (no padding: every sequence has length T)."""
    labels = labels_of(ids, prompt_len)
    out = []
    for s in range(0, len(ids), batch_size):
        batch = {"input_ids": ids[s:s + batch_size]}
        if prompt_len:
            batch["labels"] = labels[s:s + batch_size]
        out.append(batch)
    return out


def train(size: str, ids: torch.Tensor, args, seed: int):
    """AdamW on the token-mean cross-entropy; returns ``(state_dict, adam exp_avg_sq by name, loss)``."""
    model = make_model(size, ids.shape[1], seed)
    labels = labels_of(ids, args.prompt_len)[:, 1:]
    g = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * ((len(ids) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss_sum = count = 0.0
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(ids), generator=g).split(args.batch_size):
            logits = model(input_ids=ids[idx]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[idx].reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if epoch == args.epochs - 1:
                loss_sum += loss.item() * len(idx)
                count += len(idx)
    model.eval()
    names = {p: n for n, p in model.named_parameters()}
    second = {names[p]: s["exp_avg_sq"].clone() for p, s in opt.state.items()}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, second, loss_sum / count


@torch.no_grad()
def target_outputs(size: str, sd: dict, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``f(z) = sum_t m_t`` per target under one checkpoint (float64 ``[t]``)."""
    model = make_model(size, ids.shape[1], 0)
    model.load_state_dict(sd)
    logits = model(input_ids=ids).logits[:, :-1].double()
    labels = labels_of(ids, prompt_len)[:, 1:]
    keep = labels != -100
    y = labels.clamp_min(0)[..., None]
    correct = logits.gather(-1, y)[..., 0]
    others = torch.logsumexp(logits.scatter(-1, y, float("-inf")), dim=-1)
    return torch.where(keep, correct - others, 0.0).sum(-1)


def draw_subsets(n: int, m: int, seed: int = 0) -> torch.Tensor:
    masks = torch.zeros(m, n, dtype=torch.bool)
    for j in range(m):
        g = torch.Generator().manual_seed(1_000_003 * seed + j)
        masks[j, torch.randperm(n, generator=g)[:n // 2]] = True
    return masks


class Models:
    """Full-data checkpoints and the subset models' target outputs, cached on disk."""

    def __init__(self, args, train_ids, target_ids, digest):
        self.args, self.train_ids, self.target_ids = args, train_ids, target_ids
        key = json.dumps([digest, args.size, args.n_train, args.n_targets, args.seq_len, args.prompt_len,
                          args.epochs, args.lr, args.batch_size, args.weight_decay], sort_keys=True)
        self.root = CACHE / f"{args.size}{'_completion' if args.prompt_len else ''}-" \
                            f"{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.train_seconds: List[float] = []

    def full(self, m: int):
        path = self.root / f"full_{m}.pt"
        if not path.exists():
            t0 = time.perf_counter()
            sd, second, loss = train(self.args.size, self.train_ids, self.args, seed=m)
            self.train_seconds.append(time.perf_counter() - t0)
            torch.save({"sd": sd, "exp_avg_sq": second, "loss": loss}, path)
        return torch.load(path)

    def subset_outputs(self, masks: torch.Tensor) -> torch.Tensor:
        """``[m, t]``: each subset model's target outputs (trained on demand, cached)."""
        rows = []
        for j in range(len(masks)):
            path = self.root / f"subset_{j}.pt"
            if not path.exists():
                t0 = time.perf_counter()
                sd, _, loss = train(self.args.size, self.train_ids[masks[j]], self.args, seed=100 + j)
                self.train_seconds.append(time.perf_counter() - t0)
                out = target_outputs(self.args.size, sd, self.target_ids, self.args.prompt_len)
                torch.save({"outputs": out, "loss": loss, "mask": masks[j]}, path)
            saved = torch.load(path)
            assert torch.equal(saved["mask"], masks[j])
            rows.append(saved["outputs"])
        return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# LDS.
# ----------------------------------------------------------------------------------------------
def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor, n_boot: int = 2000):
    from scipy.stats import spearmanr

    predicted = (masks.double() @ scores.double()).numpy()          # [m, t]
    actual = outputs.double().numpy()
    per_target = np.array([spearmanr(predicted[:, t], actual[:, t])[0] for t in range(actual.shape[1])])
    valid = per_target[~np.isnan(per_target)]
    rng = np.random.default_rng(0)
    boot = valid[rng.integers(0, len(valid), (n_boot, len(valid)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(valid.mean()), float(lo), float(hi), per_target


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000):
    """Mean of ``a - b`` over targets (per-target LDS of two methods) and its paired 95% interval."""
    d = np.asarray(a) - np.asarray(b)
    d = d[~np.isnan(d)]
    rng = np.random.default_rng(1)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# Methods: name -> (function of a lm_methods.Checkpoint, description).
# ----------------------------------------------------------------------------------------------
def adam_v_hat(ck, args) -> Dict[str, torch.Tensor]:
    """The bias-corrected second moments ``v / (1 - beta2^steps)`` of ``train``'s AdamW (default
    betas), as ``optimizer_states=`` takes a ``{name: v_hat}`` mapping."""
    steps = args.epochs * ((args.n_train + args.batch_size - 1) // args.batch_size)
    return {name: v / (1 - 0.999 ** steps) for name, v in ck.exp_avg_sq.items()}


def method_table(args) -> Dict[str, tuple]:
    import lm_methods as L

    kf_dir = str(CACHE / "kronfluence")

    def seed_of(ck) -> int:        # trak_fast's seed for checkpoint ck (--seed-offset: other draws)
        return ck.model_id + 1000 * args.seed_offset

    table = {
        "trak_fast defaults": (lambda ck: (trak_fast.attribute(
            ck.model, [ck.checkpoint], ck.train, ck.targets, task="language_modeling",
            seed=seed_of(ck), progress=False).double(), None),
            "trak_fast.attribute(task='language_modeling') with nothing else: factored 32x32 "
            "features, per-layer Fisher of sampled labels (4 rows per sequence), lambda = 0.01 x mean eigenvalue"),
        **{f"trak_fast defaults, normalize={how}": (lambda ck, how=how: (trak_fast.attribute(
            ck.model, [ck.checkpoint], ck.train, ck.targets, task="language_modeling",
            seed=seed_of(ck), normalize=how, progress=False).double(), None),
            f"the defaults with ScoreSettings(normalize={how!r}): unit-norm train rows, targets or both")
           for how in ("train", "targets", "both")},
        "trak_fast defaults, Adam-normalized": (lambda ck: (trak_fast.attribute(
            ck.model, [ck.checkpoint], ck.train, ck.targets, task="language_modeling",
            seed=seed_of(ck), optimizer_states=[adam_v_hat(ck, args)], progress=False).double(), None),
            "the defaults with optimizer_states=: every gradient divided by Adam's sqrt(v_hat) + 1e-8 "
            "(factored: its rank-one form), TrackStar's normalization"),
        "trak_fast defaults, Adam-normalized, normalize=both": (lambda ck: (trak_fast.attribute(
            ck.model, [ck.checkpoint], ck.train, ck.targets, task="language_modeling",
            seed=seed_of(ck), optimizer_states=[adam_v_hat(ck, args)], normalize="both",
            progress=False).double(), None),
            "TrackStar's full recipe on top of the defaults: Adam-normalized, then unit norm both sides"),
        "trak_fast defaults (dense k=2048)": (lambda ck: L.trak_scores(ck, "dense"),
            "trak_fast 0.1's defaults (before the Fisher): dense k=2048, kernel Phi^T diag(Q) Phi, lambda=3 tr/n"),
        "trak_fast projection=factored": (lambda ck: L.trak_scores(ck, "factored"),
            "same estimator, projection='factored' 16x16 (embeddings and LayerNorms not featurized)"),
        "trak_fast per_layer proj + kernel": (lambda ck: L.trak_scores(ck, "per_layer", per_layer=True),
            "projection='per_layer' k=2048, kernel='per_layer'"),
        "grad dot (raw)": (lambda ck: L.grad_dot_scores(ck, "raw"),
            "<g_i, phi_z>: raw train loss gradient . raw target margin-sum gradient"),
        "cosine (raw)": (lambda ck: L.grad_dot_scores(ck, "raw", "cosine"), "both unit-normalized"),
        "TrackStar-style (raw)": (lambda ck: L.grad_dot_scores(ck, "raw", "trackstar"),
            "g / (sqrt(Adam v) + 1e-8), then unit norm, both sides"),
    }
    if not args.no_kronfluence:
        table["kronfluence 1.0.1 EK-FAC"] = (lambda ck: L.kronfluence_scores(ck, kf_dir),
            "strategy='ekfac', sampled-label Fisher factors, damping_factor=None (0.1 x mean eigenvalue)")
    table["trak_fast curvature=fisher (library, per_layer)"] = (
        lambda ck: (trak_fast.attribute(
            ck.model, [ck.checkpoint], ck.train, ck.targets, task="language_modeling",
            seed=seed_of(ck), proj_dim=2048, projection="per_layer", kernel="per_layer",
            curvature="fisher", progress=False).double(), None),
        "trak_fast.attribute(curvature='fisher', projection='per_layer', kernel='per_layer'): the "
        "library's form of the per-layer sampled-label Fisher (default damping 0.01)")
    if args.library:        # the library's curvature="fisher" in each feature space, by damping
        for space in args.library_spaces.split(","):
            for c, kernel, chunks in itertools.product(args.dampings, args.library_kernels.split(","),
                                                       args.library_chunks):
                tag = ("" if kernel == "per_layer" else f" kernel={kernel}") + \
                    ("" if chunks == 4 else f" {chunks} chunk(s)")
                table[f"trak_fast fisher[{space}] c={c:g}{tag}"] = (
                    lambda ck, space=space, c=c, kernel=kernel, chunks=chunks: (trak_fast.attribute(
                        ck.model, [ck.checkpoint], ck.train, ck.targets,
                        task=trak_fast.LanguageModelingTask(fisher_chunks=chunks),
                        **dict(L.SPACES[space], seed=seed_of(ck)), kernel=kernel,
                        curvature="fisher", lambda_reg=c, progress=False).double(), None),
                    f"trak_fast.attribute(curvature='fisher', kernel={kernel!r}, lambda_reg={c:g}), "
                    f"{space} features (each row featurizes anew: its seconds are the whole call)")
    fisher = lambda space, c, **kw: (lambda ck: L.preconditioned_scores(ck, space, "fisher", c, **kw))
    # The headline rows (c = 0.1: kronfluence's heuristic damping, fixed before the run; the raw
    # space's rank-n_f Fisher needs more: c = 1, chosen by the --sweep rows).
    table.update({
        "Fisher[factored] c=0.1": (fisher("factored", 0.1),
            "per-layer sampled-label Fisher, factored 16x16 features, lambda_l = 0.1 x mean eigenvalue"),
        "Fisher[per_layer] c=0.1": (fisher("per_layer", 0.1),
            "per-layer sampled-label Fisher, projection='per_layer' k=2048 features"),
        "Fisher[raw] c=1": (fisher("raw", 1.0),
            "per-layer sampled-label Fisher on raw gradients (rank n, Woodbury), lambda_l = mean eigenvalue"),
        "Fisher full kernel[dense] c=0.1": (fisher("dense", 0.1, per_layer=False),
            "sampled-label Fisher on trak_fast's default dense k=2048 features (one block)"),
        "Fisher[per_layer] c=0.1, unit-norm train": (fisher("per_layer", 0.1, unit_train="unit"),
            "train rows divided by their norm"),
        "TRAK kernel per layer[per_layer] c=0.1": (
            lambda ck: L.preconditioned_scores(ck, "per_layer", "trak", 0.1, train_kind="margin"),
            "control: per-layer Q-weighted margin kernel (TRAK's X^T R X / n), same damping rule"),
        "empirical Fisher[per_layer] c=0.1": (
            lambda ck: L.preconditioned_scores(ck, "per_layer", "empirical", 0.1),
            "control: per-layer true-label loss-gradient (empirical) Fisher"),
    })
    if args.sweep:
        for space in ("factored", "per_layer", "raw"):
            for c in args.dampings:
                table[f"Fisher[{space}] c={c:g}"] = (fisher(space, c),
                    f"per-layer sampled-label Fisher in the {space} space, lambda_l = c * mean eigenvalue")
        for space in ("factored", "per_layer"):
            for c in args.dampings:
                table[f"TRAK kernel per layer[{space}] c={c:g}"] = (
                    lambda ck, space=space, c=c: L.preconditioned_scores(ck, space, "trak", c, train_kind="margin"),
                    "per-layer Q-weighted margin kernel (TRAK's X^T R X / n), same damping rule, TRAK train rows")
                table[f"empirical Fisher[{space}] c={c:g}"] = (
                    lambda ck, space=space, c=c: L.preconditioned_scores(ck, space, "empirical", c),
                    "per-layer true-label loss-gradient Fisher")
                table[f"Fisher full kernel[{space}] c={c:g}"] = (fisher(space, c, per_layer=False),
                    "sampled-label Fisher over all columns at once (no block diagonal)")
        for space, c in (("factored32", 0.1), ("factored32", 1.0), ("per_layer4096", 0.1)):
            table[f"Fisher[{space}] c={c:g}"] = (fisher(space, c),
                f"per-layer sampled-label Fisher, larger projection ({space})")
        table["layer-scaled grad dot[raw]"] = (lambda ck: L.layer_scaled_dot(ck, "raw"),
            "ablation of Fisher[raw] c=1: only the per-layer factor 1/lambda_l = p_l / tr(F_l), no Fisher directions")
        for rows in (128, 256):
            table[f"Fisher[raw] c=1, Fisher from {rows} rows"] = (fisher("raw", 1.0, fisher_rows=rows),
                f"the Fisher from the first {rows} train sequences only (Woodbury cost n_f^2 p)")
        for space in ("factored", "factored32", "per_layer", "per_layer4096"):
            table[f"Fisher[{space}] lambda=tr/p_l"] = (fisher(space, 1.0, full_mean=True),
                "damping = mean eigenvalue of the unprojected layer Fisher (tr(F_l) / p_l), as in the raw space")
        table["Fisher[factored32] c=0.1, 4 label draws"] = (fisher("factored32", 0.1, draws=4),
            "32x32 factored features (1056 per layer) need more Fisher rows than 512 sequences")
        for space in ("factored", "per_layer", "raw"):
            table[f"Fisher[{space}] c=0.1, 4 label draws"] = (fisher(space, 0.1, draws=4),
                "the Fisher from 4 independent label draws per sequence (4 backward passes)")
        for space in ("factored", "per_layer"):
            table[f"Fisher[{space}] c=0.1, TRAK train rows"] = (fisher(space, 0.1, train_kind="margin"),
                "train rows Q_i grad(sum margins) instead of the loss gradient")
            for unit in ("unit", "metric"):
                table[f"Fisher[{space}] c=0.1, {unit}-norm train"] = (fisher(space, 0.1, unit_train=unit),
                    f"train rows divided by their {'norm' if unit == 'unit' else '(F+lambda)^-1 norm'}")
    for chunks in args.fisher_chunks:
        for space in ("factored32", "per_layer"):
            for c in (0.01, 0.1):
                table[f"Fisher[{space}] c={c:g}, {chunks} position chunks"] = (
                    fisher(space, c, chunks=chunks),
                    f"Fisher rows per (sequence, chunk of {chunks}): one label draw, the gradient of "
                    "each chunk's sampled tokens its own row (cross-chunk terms dropped, as K-FAC does)")
    if args.only:
        table = {k: v for k, v in table.items() if any(s in k for s in args.only.split(","))}
    return table


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    import lm_methods as L

    t_start = time.perf_counter()
    train_ids, target_ids, digest = make_corpus(args.n_train, args.n_targets, args.seq_len)
    models = Models(args, train_ids, target_ids, digest)
    fulls = [models.full(m) for m in range(args.models)]
    masks = draw_subsets(args.n_train, args.subsets)
    outputs = models.subset_outputs(masks)
    full_outputs = torch.stack([target_outputs(args.size, f["sd"], target_ids, args.prompt_len) for f in fulls])
    print(f"corpus sha1 {digest[:12]}, {args.n_train} train / {args.n_targets} targets x {args.seq_len} chars; "
          f"train loss/token (full models) {[round(f['loss'], 3) for f in fulls]}; "
          f"{time.perf_counter() - t_start:.0f} s to train or load {args.models} + {args.subsets} models", flush=True)

    model = make_model(args.size, args.seq_len, 0)
    train_batches = batches(train_ids, args.prompt_len, args.batch_size_features)
    target_batches = batches(target_ids, args.prompt_len, args.batch_size_features)
    table = method_table(args)
    # One untimed call of every method on one batch of train and targets first: one-time costs
    # (first calls of kernels and allocators, module probing, a peer's imports) are then not
    # charged to whichever method happens to run first on model 0.
    warm = L.Checkpoint(model, fulls[0]["sd"], 0, train_batches[:1], target_batches[:1],
                        fulls[0]["exp_avg_sq"], fisher_draws=args.fisher_draws)
    for fn, _ in table.values():
        fn(warm)
    del warm
    per_model: Dict[str, list] = {name: [] for name in table}
    seconds: Dict[str, list] = {name: [] for name in table}
    feature_seconds = []
    for m, full in enumerate(fulls):
        ck = L.Checkpoint(model, full["sd"], m, train_batches, target_batches, full["exp_avg_sq"],
                          fisher_draws=args.fisher_draws)
        for name, (fn, _) in table.items():
            before = dict(ck.seconds)
            used = set()
            get = ck.get

            def tracking_get(space, kind, get=get, used=used):
                used.add((space, kind))
                return get(space, kind)
            ck.get = tracking_get
            t0 = time.perf_counter()
            s, q = fn(ck)
            wall = time.perf_counter() - t0
            ck.get = get
            new = sum(v for k, v in ck.seconds.items() if k not in before)
            seconds[name].append(wall - new + sum(ck.seconds[k] for k in used))
            per_model[name].append((s.double(), None if q is None else q.double()))
        feature_seconds.append({f"{a}/{b}": round(v, 2) for (a, b), v in ck.seconds.items()})
        print(f"model {m}: features {feature_seconds[-1]}", flush=True)
        del ck

    rows = []
    for name, (fn, description) in table.items():
        row = {"method": name, "description": description,
               "seconds_per_model": float(np.mean(seconds[name])),
               "run": {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "load_average_1min": round(os.getloadavg()[0], 1)}}
        for M in (1, args.models):
            parts = per_model[name][:M]
            s = torch.stack([p[0] for p in parts]).mean(0)
            if parts[0][1] is not None:
                s = s * torch.stack([p[1] for p in parts]).mean(0)[:, None]
            mean, lo, hi, per_target = lds(s, masks, outputs)
            row[f"lds_M{M}"] = {"lds": mean, "ci_low": lo, "ci_high": hi,
                                "per_target": [None if np.isnan(v) else round(float(v), 5) for v in per_target]}
        rows.append(row)
        print(f"{name:48s} M=1 {row['lds_M1']['lds']:.3f}  M={args.models} "
              f"{row[f'lds_M{args.models}']['lds']:.3f} [{row[f'lds_M{args.models}']['ci_low']:.3f}, "
              f"{row[f'lds_M{args.models}']['ci_high']:.3f}]  {row['seconds_per_model']:.2f} s", flush=True)

    # How predictable the outputs are at all: subset outputs vs the full models' outputs.
    noise = {"subset_output_std_mean": float(outputs.std(0).mean()),
             "full_model_output_std_mean": float(full_outputs.std(0).mean())}
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "corpus": {"source": f"Python {platform.python_version()} stdlib docstrings ({len(STDLIB_MODULES)} modules), characters",
                   "sha1": digest},
        "model_params": sum(p.numel() for p in model.parameters()),
        "train_loss_per_token_full": [f["loss"] for f in fulls],
        "train_seconds_per_model_trained_now": models.train_seconds,
        "feature_seconds": feature_seconds,
        "noise": noise,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
                   f"load average {os.getloadavg()[0]:.1f} at the end (shared, loaded machine)",
        "total_seconds": time.perf_counter() - t_start,
        "rows": rows,
    }


REFERENCES = ("grad dot (raw)", "kronfluence 1.0.1 EK-FAC")


def print_table(report: dict) -> None:
    M = report["settings"]["models"]
    refs = {r["method"]: np.array([np.nan if v is None else v for v in r[f"lds_M{M}"]["per_target"]])
            for r in report["rows"] if r["method"] in REFERENCES and "per_target" in r[f"lds_M{M}"]}
    print(f"\nLM LDS, GPT-2 {report['settings']['size']} ({report['model_params']:,} params), "
          f"{report['settings']['subsets']} half subsets, {report['settings']['n_targets']} targets"
          + (", completion-only loss" if report["settings"]["prompt_len"] else ""))
    print(f"{'method':50s} {'LDS M=1':>8s} {'LDS M=' + str(M):>22s} {'s/model':>8s}"
          + "".join(f"  {'- ' + name[:14]:>24s}" for name in refs))
    for row in sorted(report["rows"], key=lambda r: -r[f"lds_M{M}"]["lds"]):
        a, b = row["lds_M1"], row[f"lds_M{M}"]
        diffs = ""
        if "per_target" in b:
            mine = np.array([np.nan if v is None else v for v in b["per_target"]])
            for name, ref in refs.items():
                d, lo, hi = paired_difference(mine, ref)
                row.setdefault("paired_difference_M%d" % M, {})[name] = {"mean": d, "ci_low": lo, "ci_high": hi}
                diffs += f"  {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(f"{row['method']:50s} {a['lds']:8.3f} {b['lds']:7.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] "
              f"{row['seconds_per_model']:8.2f}{diffs}")


def write_markdown(report: dict, path: Path) -> None:
    """The table of ``report`` (rows sorted by LDS at M = 3) as Markdown."""
    M = report["settings"]["models"]
    s = report["settings"]
    lines = [f"# LM LDS: GPT-2 {s['size']} ({report['model_params']:,} params)"
             + (", completion-only loss" if s["prompt_len"] else ""),
             "",
             f"Written by `benchmarks/bench_lm_lds.py`. {s['n_train']} train / {s['n_targets']} target sequences of "
             f"{s['seq_len']} characters ({report['corpus']['source']}), {s['subsets']} random halves retrained once "
             f"each, M = {M} full-data models. LDS: mean Spearman over targets, 95% bootstrap interval; "
             "the last two columns: paired difference of per-target LDS at M = 3 with its 95% bootstrap interval. "
             "Seconds per model: wall time on a shared 2-core machine under load; compare only rows of one run "
             "(same 'run' time in the JSON).",
             "",
             f"| method | LDS M=1 | LDS M={M} [95% CI] | s/model | - grad dot | - EK-FAC | run |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(report["rows"], key=lambda r: -r[f"lds_M{M}"]["lds"]):
        a, b = row["lds_M1"], row[f"lds_M{M}"]
        diffs = row.get(f"paired_difference_M{M}", {})
        cells = []
        for name in REFERENCES:
            d = diffs.get(name)
            cells.append(f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d else "")
        run = row.get("run", {}).get("finished", "")
        lines.append(f"| {row['method']} | {a['lds']:.3f} | {b['lds']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] | "
                     f"{row['seconds_per_model']:.1f} | {cells[0]} | {cells[1]} | {run} |")
    lines += ["", f"Noise: mean over targets of the std of f(z) across the subset models "
              f"{report['noise']['subset_output_std_mean']:.2f}, across the {M} full-data models (seeds only) "
              f"{report['noise']['full_model_output_std_mean']:.2f}.", ""]
    path.write_text("\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--completion", action="store_true",
                   help="prompt/completion: labels -100 on the first half of every sequence")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-targets", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size-features", type=int, default=64)
    p.add_argument("--fisher-draws", type=int, default=1)
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--sweep", action="store_true",
                   help="also the damping sweep and the variants (3x the time of the headline rows)")
    p.add_argument("--library", action="store_true",
                   help="rows for the library's curvature='fisher' in every feature space and damping")
    p.add_argument("--library-spaces", default="raw,per_layer,factored,factored32",
                   help="feature spaces of the --library rows")
    p.add_argument("--library-kernels", default="per_layer",
                   help="kernels (per_layer, full) of the --library rows")
    p.add_argument("--library-chunks", type=int, nargs="+", default=[4],
                   help="Fisher rows per sequence (LanguageModelingTask(fisher_chunks=...)) of "
                   "the --library rows (4, the default, is left out of the row names)")
    p.add_argument("--fisher-chunks", type=int, nargs="*", default=[],
                   help="prototype rows: a Fisher row per (sequence, chunk of positions)")
    p.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    p.add_argument("--no-kronfluence", action="store_true")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="trak_fast rows use seed model_id + 1000 x this (another draw of the "
                   "projections and of the sampled labels; 0 reproduces the committed rows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.prompt_len = args.seq_len // 2 if args.completion else 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import lm_methods
    lm_methods.SEED_OFFSET = args.seed_offset
    report = run(args)
    out = args.out or RESULTS / ("bench_lm_lds" + ("" if args.size == "small" else f"_{args.size}")
                                 + ("_completion" if args.completion else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():      # rows of a run replace the same rows of an earlier run with the same settings
        old = json.loads(out.read_text())
        rows_only = ("only", "no_kronfluence", "dampings", "threads", "sweep", "library",
                     "library_spaces", "library_kernels", "library_chunks", "fisher_chunks")     # which rows, not how they are made
        old_settings = {"seed_offset": 0, **old["settings"]}       # runs before the option
        same = {k: v for k, v in old_settings.items() if k not in rows_only} == \
               {k: v for k, v in report["settings"].items() if k not in rows_only}
        if same:
            names = {row["method"] for row in report["rows"]}
            report["rows"] = [r for r in old["rows"] if r["method"] not in names] + report["rows"]
            report["earlier_runs"] = old.get("earlier_runs", []) + [
                {k: old[k] for k in ("machine", "feature_seconds", "total_seconds")}
                | {"methods": [r["method"] for r in old["rows"] if r["method"] not in names]}]
    print_table(report)
    out.write_text(json.dumps(report, indent=1))
    write_markdown(report, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return report


if __name__ == "__main__":
    main()
