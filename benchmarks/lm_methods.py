"""Attribution methods for the language-model LDS benchmark (``bench_lm_lds.py``), issue 24.

Everything here is benchmark-side: trak_fast is used only through its public API
(``featurize``, ``target_features``, ``compute_kernel``, ``model_scores``, ``Task``,
``DEFAULT_LAMBDA_REL``). One checkpoint at a time, a :class:`Checkpoint` computes (and times)
feature sets on demand, keyed by ``(space, kind)``:

spaces
    ``dense``      trak_fast's default projection, ``proj_dim=2048``, ``projection="dense"``
    ``factored``   ``projection="factored"`` (per layer ``vec(P_out^T G P_in)``, 16 x 16)
    ``per_layer``  ``proj_dim=2048``, ``projection="per_layer"`` (one dense matrix per layer)
    ``raw``        ``proj_dim=None``: the exact per-example gradients (110k columns)
kinds
    ``margin``     train rows, ``task="language_modeling"``: ``grad sum_t m_t`` and ``Q``
    ``loss``       train rows, :class:`LogProbTask` with the true labels: ``g_i = grad sum_t log p_t``
                   (= minus the gradient of the summed training loss of sequence i)
    ``fisher``     train rows, :class:`LogProbTask` with labels **sampled once from the model's
                   own softmax** at every predicted position: ``s_i = grad sum_t log p(yhat_t)``
    ``target``     target rows, ``task="language_modeling"``: ``phi_z = grad f(z)``, f the
                   measured output (summed margins)

Because ``yhat_t`` are drawn independently given the logits (the inputs are the real tokens),
``E[s_i s_i^T] = sum_t J_t^T (diag(p_t) - p_t p_t^T) J_t``: the exact Gauss-Newton (= true
Fisher) matrix of sequence i's loss, every token with its full rank-(V-1) softmax curvature, from
one backward pass per sequence. TRAK's ``sum_i Q_i phi_i phi_i^T`` with ``phi_i = sum_t grad m_t``
puts one direction per *sequence* (tokens summed before the outer product).

Curvature prototypes (:func:`preconditioned_scores`): per layer ``l`` (columns grouped by the
layout's ``.layer``), with ``X`` the fisher features ``[n_f, k_l]``::

    F_l = X_l^T X_l / n_f,    lambda_l = c * tr(F_l) / k_l   (c times the mean eigenvalue)
    S[i, z] = sum_l g_{i,l}^T (F_l + lambda_l I)^-1 phi_{z,l}

solved directly when ``k_l <= n_f`` and by Woodbury (``n_f x n_f``) otherwise.

Findings (``benchmarks/results/bench_lm_lds*.md``): replacing TRAK's kernel by the per-layer
sampled-label Fisher is what closes the gap to kronfluence's EK-FAC; the empirical Fisher (true
labels) and TRAK's own kernel at the same damping stay at the gradient dot product. The most
robust form over the three settings is the raw-space one (``Fisher[raw] c=1``: rank-n_f Fisher
per layer, ``lambda_l = tr(F_l) / p_l``); its gain comes from removing the top Fisher
directions (``layer_scaled_dot``, its per-layer scale alone, is worse than the dot product).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import trak_fast

DENSE_K = 2048


class LogProbTask(trak_fast.Task):
    """``f(z) = sum_{t in S} log softmax(logits_t)[y_{t+1}]`` (minus the summed loss), ``Q = 1``.

    Batches as ``task="language_modeling"``: ``{"input_ids", "labels" (optional)}``, HF labels
    (``labels[t + 1]`` is what position t predicts, -100 not predicted), no padding.
    """

    name = "log_prob"
    fixed_shapes = False

    @staticmethod
    def _sum_log_probs(logits: torch.Tensor, batch) -> torch.Tensor:
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return torch.where(keep, picked, 0.0).sum(-1)

    @staticmethod
    def _logits(model, batch):
        out = model(batch["input_ids"])
        return out if isinstance(out, torch.Tensor) else out.logits

    def output(self, model, example):
        batch = {key: value[None] for key, value in example.items()}
        return self._sum_log_probs(self._logits(model, batch), batch)[0]

    def outputs(self, model, batch):
        return self._sum_log_probs(self._logits(model, batch), batch)

    def out_to_loss(self, model, batch):
        return torch.ones(batch["input_ids"].shape[0])


@torch.no_grad()
def sampled_label_batches(model: torch.nn.Module, checkpoint: dict, batches: Sequence[dict],
                          seed: int) -> List[dict]:
    """The batches with ``labels`` drawn from the checkpoint's softmax at every predicted position."""
    import copy

    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    model.load_state_dict(checkpoint)
    model.eval()
    out = []
    for batch in batches:
        logits = model(batch["input_ids"]).logits[:, :-1]
        probs = torch.softmax(logits.double(), -1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).reshape(probs.shape[:2])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 1:] = drawn
        if "labels" in batch:
            labels[batch["labels"] == -100] = -100
        out.append({"input_ids": batch["input_ids"], "labels": labels})
    return out


#: Another draw of the prototypes' projections and sampled labels (bench_lm_lds --seed-offset).
SEED_OFFSET = 0

SPACES = {
    "dense": dict(proj_dim=DENSE_K, projection="dense"),
    "factored": dict(projection="factored"),
    "per_layer": dict(proj_dim=DENSE_K, projection="per_layer"),
    "raw": dict(proj_dim=None),
    "factored32": dict(projection="factored", factored_dims=(32, 32)),
    "factored48": dict(projection="factored", factored_dims=(48, 48)),
    "factored64": dict(projection="factored", factored_dims=(64, 64)),
    "per_layer4096": dict(proj_dim=2 * DENSE_K, projection="per_layer"),
}


class Checkpoint:
    """One checkpoint's feature sets, computed on first use; ``seconds[(space, kind)]`` their cost."""

    def __init__(self, model, checkpoint: dict, model_id: int, train: Sequence[dict],
                 targets: Sequence[dict], exp_avg_sq: Optional[dict] = None, fisher_draws: int = 1):
        self.model, self.checkpoint, self.model_id = model, checkpoint, model_id
        self.train, self.targets, self.exp_avg_sq = train, targets, exp_avg_sq
        self.fisher_draws = fisher_draws
        self.cache: Dict[Tuple[str, str], trak_fast.Features] = {}
        self.seconds: Dict[Tuple[str, str], float] = {}

    def get(self, space: str, kind: str) -> trak_fast.Features:
        key = (space, kind)
        if key not in self.cache:
            t0 = time.perf_counter()
            kwargs = dict(SPACES[space], seed=1000 * SEED_OFFSET, model_id=self.model_id, progress=False)
            if kind == "margin":
                feats = trak_fast.featurize(self.model, self.checkpoint, self.train,
                                            task="language_modeling", **kwargs)
            elif kind == "loss":
                feats = trak_fast.featurize(self.model, self.checkpoint, self.train,
                                            task=LogProbTask(), out_to_loss=False, **kwargs)
            elif kind.startswith("fisher_chunks"):   # one draw; a row per (sequence, chunk of positions)
                chunks = int(kind[13:])
                sampled = sampled_label_batches(self.model, self.checkpoint, self.train,
                                                seed=1_000 * self.model_id + 10**6 * SEED_OFFSET)
                parts = []
                for c in range(chunks):
                    masked = []
                    for batch in sampled:
                        labels = batch["labels"].clone()
                        positions = torch.arange(labels.shape[1])
                        width = -(-labels.shape[1] // chunks)
                        labels[:, (positions // width) != c] = -100
                        masked.append({"input_ids": batch["input_ids"], "labels": labels})
                    parts.append(trak_fast.featurize(self.model, self.checkpoint, masked,
                                                     task=LogProbTask(), out_to_loss=False, **kwargs))
                feats = trak_fast.Features(torch.cat([p.phi for p in parts]), None, parts[0].layout)
            elif kind.startswith("fisher"):      # "fisher" (fisher_draws draws), "fisher<d>", "fisher_rows<r>"
                rows = int(kind[11:]) if kind.startswith("fisher_rows") else None
                draws = 1 if rows else (int(kind[6:]) if kind[6:] else self.fisher_draws)
                train = self.train
                if rows:         # the Fisher from the first batches only (>= rows sequences)
                    count, train = 0, []
                    for batch in self.train:
                        if count >= rows:
                            break
                        train.append(batch)
                        count += batch["input_ids"].shape[0]
                parts = []
                for draw in range(draws):
                    sampled = sampled_label_batches(self.model, self.checkpoint, train,
                                                    seed=1_000 * self.model_id + draw + 10**6 * SEED_OFFSET)
                    parts.append(trak_fast.featurize(self.model, self.checkpoint, sampled,
                                                     task=LogProbTask(), out_to_loss=False, **kwargs))
                feats = trak_fast.Features(torch.cat([p.phi for p in parts]), None, parts[0].layout)
            elif kind == "target":
                feats = trak_fast.featurize(self.model, self.checkpoint, self.targets,
                                            task="language_modeling", out_to_loss=False,
                                            what="targets", **kwargs)
            else:
                raise ValueError(kind)
            self.cache[key] = feats
            self.seconds[key] = time.perf_counter() - t0
        return self.cache[key]


def layer_sizes(model: torch.nn.Module) -> Dict[str, int]:
    """Parameters per layer (module path), as the layouts name layers."""
    sizes: Dict[str, int] = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        sizes[layer] = sizes.get(layer, 0) + p.numel()
    return sizes


def layer_groups(layout) -> List[Tuple[str, int, int]]:
    """``[(layer, start, stop)]``: consecutive layout blocks of one layer merged."""
    groups: List[list] = []
    for block in layout:
        if groups and groups[-1][0] == block.layer and groups[-1][2] == block.start:
            groups[-1][2] = block.stop
        else:
            groups.append([block.layer, block.start, block.stop])
    return [tuple(g) for g in groups]


# ----------------------------------------------------------------------------------------------
# Scores of one checkpoint.  Each returns (S [n, t] float64, Q [n] or None).
# ----------------------------------------------------------------------------------------------
def trak_scores(ck: Checkpoint, space: str, per_layer: bool = False, weights: str = "out_to_loss",
                lambda_rel: float = None):
    """trak_fast's own estimator through its public pieces: ``S = Phi (Phi^T W Phi + lambda I)^-1 T^T``,
    ``lambda = lambda_rel tr(Phi^T W Phi) / n`` per block, ``W = diag(Q)`` (trak_fast's default)."""
    lambda_rel = trak_fast.DEFAULT_LAMBDA_REL if lambda_rel is None else lambda_rel
    feats, targets = ck.get(space, "margin"), ck.get(space, "target").phi
    phi, q = feats.phi, feats.out_to_loss
    groups = layer_groups(feats.layout) if per_layer else [("all", 0, phi.shape[1])]
    out = torch.zeros(phi.shape[0], targets.shape[0], dtype=torch.float32)
    for _, a, b in groups:
        kernel = trak_fast.compute_kernel(phi[:, a:b], weights=q if weights == "out_to_loss" else None)
        if kernel.trace == 0:
            continue
        trak_fast.model_scores(phi[:, a:b], targets[:, a:b], kernel, lambda_reg=lambda_rel,
                               relative_lambda=True, out=out)
    return out.double(), q.double()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def grad_dot_scores(ck: Checkpoint, space: str = "raw", normalize: str = "none"):
    """``<g_i, phi_z>`` (loss gradient of train i, measurement gradient of target z); ``"cosine"``
    normalizes both; ``"trackstar"`` divides both by ``sqrt(v) + 1e-8`` elementwise (v: the
    checkpoint's final Adam second moment, raw space only) and then normalizes both."""
    g = ck.get(space, "loss").phi.double()
    t = ck.get(space, "target").phi.double()
    if normalize == "trackstar":
        names = [b.name for b in ck.get(space, "loss").layout]
        v = torch.cat([ck.exp_avg_sq[name].reshape(-1).double() for name in names])
        scale = 1.0 / (v.sqrt() + 1e-8)
        g, t = g * scale, t * scale
    if normalize in ("cosine", "trackstar"):
        g, t = _unit(g), _unit(t)
    return g @ t.T, None


class LayerSolver:
    """``(F + lambda I)^-1`` of ``F = X^T X / n_f`` with ``lambda = c tr(F) / k``."""

    def __init__(self, x: torch.Tensor, c: float):
        self.x = x.double()
        n_f, k = self.x.shape
        self.n_f, self.k = n_f, k
        trace = float((self.x * self.x).sum()) / n_f
        self.lam = c * trace / k
        if k <= n_f:
            f = self.x.T @ self.x / n_f
            self.chol = torch.linalg.cholesky(f + self.lam * torch.eye(k, dtype=torch.float64))
        else:   # Woodbury: (X^T X / n + lam I)^-1 = (I - X^T (n lam I + X X^T)^-1 X) / lam
            gram = self.x @ self.x.T
            self.chol = torch.linalg.cholesky(gram + n_f * self.lam * torch.eye(n_f, dtype=torch.float64))

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``(F + lambda I)^-1 v`` for ``v [k, r]``."""
        v = v.double()
        if self.k <= self.n_f:
            return torch.cholesky_solve(v, self.chol)
        return (v - self.x.T @ torch.cholesky_solve(self.x @ v, self.chol)) / self.lam


def preconditioned_scores(ck: Checkpoint, space: str, curvature: str = "fisher", c: float = 0.1,
                          per_layer: bool = True, train_kind: str = "loss", unit_train: str = "none",
                          draws: Optional[int] = None, full_mean: bool = False,
                          fisher_rows: Optional[int] = None, chunks: Optional[int] = None):
    """``S = sum_l g_l (F_l + lambda_l I)^-1 phi_{z,l}^T`` with ``F`` from ``curvature``:

    ``"fisher"`` (sampled labels; ``draws`` label draws per sequence), ``"empirical"`` (true-label loss gradients, the empirical
    Fisher) or ``"trak"`` (``Q``-weighted margin features: ``sqrt(Q_i) phi_i``, TRAK's kernel / n).
    ``unit_train``: ``"unit"`` divides each train row by ``||g_i||``, ``"metric"`` by
    ``sqrt(g_i^T (F + lambda)^-1 g_i)``.
    ``full_mean``: ``lambda_l = c tr(F_l) / p_l`` with ``p_l`` the layer's number of parameters
    (the mean eigenvalue of the unprojected layer Fisher, whose trace the projection preserves
    in expectation) instead of ``c tr(F_l) / k_l``; in the raw space the two are the same.
    """
    layout = ck.get(space, "target").layout
    t = ck.get(space, "target").phi
    if train_kind == "loss":
        g, q = ck.get(space, "loss").phi, None
    else:                                  # TRAK's train rows: Q grad(sum margins), Q outside
        feats = ck.get(space, "margin")
        g, q = feats.phi, feats.out_to_loss.double()
    if curvature == "fisher":
        kind = "fisher" if draws is None else f"fisher{draws}"
        kind = kind if chunks is None else f"fisher_chunks{chunks}"
        x = ck.get(space, kind if fisher_rows is None else f"fisher_rows{fisher_rows}").phi
    elif curvature == "empirical":
        x = ck.get(space, "loss").phi
    elif curvature == "trak":
        feats = ck.get(space, "margin")
        x = feats.phi * feats.out_to_loss.sqrt()[:, None]
    else:
        raise ValueError(curvature)
    groups = layer_groups(layout) if per_layer else [("all", 0, t.shape[1])]
    scores = torch.zeros(g.shape[0], t.shape[0], dtype=torch.float64)
    norms = torch.zeros(g.shape[0], dtype=torch.float64)
    for name, a, b in groups:
        xs = x[:, a:b].double()
        if float((xs * xs).sum()) == 0:
            continue
        scale = 1.0
        if full_mean and per_layer:
            sizes = layer_sizes(ck.model)
            scale = (b - a) / sizes[name]
        solver = LayerSolver(xs, c * scale)
        u = solver.solve(t[:, a:b].double().T)                       # [k_l, t]
        gl = g[:, a:b].double()
        scores += gl @ u
        if unit_train == "metric":
            norms += (gl * solver.solve(gl.T).T).sum(1)
    if unit_train == "unit":
        scores /= g.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    elif unit_train == "metric":
        scores /= norms.clamp_min(1e-30).sqrt()[:, None]
    return scores, q


# ----------------------------------------------------------------------------------------------
# kronfluence 1.0.1 EK-FAC (GPT-2's Conv1D converted exactly to nn.Linear).
# ----------------------------------------------------------------------------------------------
def linearized_gpt2(model: torch.nn.Module, checkpoint: dict) -> torch.nn.Module:
    """A copy of ``model`` with ``checkpoint`` loaded and every transformers ``Conv1D``
    (``y = x W + b``, ``W [in, out]``) replaced by ``nn.Linear`` with weight ``W^T``: same function."""
    import copy

    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    out.load_state_dict(checkpoint)
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = torch.nn.Linear(d_in, d_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    out.eval()
    return out


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: List[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rows(batches: Sequence[dict]) -> List[dict]:
    rows = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            row = {"input_ids": batch["input_ids"][i]}
            row["labels"] = batch["labels"][i] if "labels" in batch else batch["input_ids"][i]
            rows.append(row)
    return rows


def kronfluence_scores(ck: Checkpoint, workdir: str, strategy: str = "ekfac",
                       damping_factor: Optional[float] = None, batch_size: int = 64):
    """Minus kronfluence's pairwise scores ``[n, t]`` for ``ck`` (see the sign note below): factors fitted on the train set with
    labels sampled from the model (the true Fisher, kronfluence's default), query = the summed
    margins of each target, train = the summed loss. ``damping_factor=None``: kronfluence's
    heuristic, 0.1 x the mean eigenvalue (per module)."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
                    labels = torch.where(labels == -100, labels, drawn)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100,
                                                     reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            y = labels.clamp_min(0)[..., None]
            correct = logits.gather(-1, y)[..., 0]
            others = torch.logsumexp(logits.scatter(-1, y, float("-inf")), dim=-1)
            return torch.where(keep, correct - others, 0.0).sum()

    torch.manual_seed(ck.model_id)
    task = MarginTask()
    model = prepare_model(linearized_gpt2(ck.model, ck.checkpoint), task)
    analyzer = Analyzer(analysis_name=f"lm_lds_{ck.model_id}", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=workdir, log_level=logging.WARNING)
    train = _ListDataset(_rows(ck.train))
    query = _ListDataset(_rows(ck.targets))
    analyzer.fit_all_factors("factors", train, per_device_batch_size=batch_size,
                             factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("scores", "factors", query, train,
                                     per_device_query_batch_size=batch_size,
                                     per_device_train_batch_size=batch_size,
                                     score_args=ScoreArguments(damping_factor=damping_factor),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]      # [t, n]
    # kronfluence's score is grad f^T H^-1 grad L_i (L: the train loss); upweighting i moves the
    # parameters by -H^-1 grad L_i, so the predicted change of f is minus the score. (For a loss
    # measurement that sign makes "positive = helpful"; for our margin it must be flipped.)
    return -scores.T.double(), None


def layer_scaled_dot(ck: Checkpoint, space: str = "raw"):
    """Ablation of the raw-space Fisher: only its per-layer scale, ``sum_l g_l . phi_l / lambda_l``
    with ``lambda_l = tr(F_l) / p_l`` (the sampled-label Fisher's mean eigenvalue), no directions removed."""
    layout = ck.get(space, "target").layout
    t, g, x = ck.get(space, "target").phi, ck.get(space, "loss").phi, ck.get(space, "fisher").phi
    sizes = layer_sizes(ck.model)
    scores = torch.zeros(g.shape[0], t.shape[0], dtype=torch.float64)
    for name, a, b in layer_groups(layout):
        trace = float((x[:, a:b].double() ** 2).sum()) / x.shape[0]
        if trace > 0:
            scores += (g[:, a:b].double() @ t[:, a:b].double().T) * (sizes[name] / trace)
    return scores, None
