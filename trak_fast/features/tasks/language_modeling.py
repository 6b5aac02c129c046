"""The built-in language-modeling task: a margin per predicted token, summed over a sequence."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch

ModelFn = Callable[..., torch.Tensor]

from .base import _INTEGER_DTYPES, Task, batch_size_of


IGNORE_INDEX = -100
#: ``factored_dims`` the task prefers (see :meth:`LanguageModelingTask.preferred_features`).
LM_FACTORED_DIMS = "auto"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` (int64) from an attention mask: ``max(cumsum(mask) - 1, 0)``.

    Real tokens are numbered 0, 1, ... in order whichever side the padding is on (as Hugging
    Face's ``generate`` does); padding gets the neighbouring real token's position or 0 (its
    value matters to nothing: padding is masked out)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class LanguageModelingTask(Task):
    r"""Next-token prediction with a causal language model (GPT-2 and the like).

    **Batches** are dicts ``{"input_ids": [B, T], "attention_mask": [B, T] (optional),
    "labels": [B, T] (optional), "position_ids": [B, T] (optional)}`` of integer tensors (the
    mask may be bool), padded on the right or on the left. Labels follow Hugging Face's
    convention: they are aligned with ``input_ids``, the model's logits at position ``t``
    predict ``labels[t + 1]``, and ``-100`` marks a position not to attribute; without
    ``labels`` they are ``input_ids``.

    **The model call.** Without a mask: ``model(input_ids)``. With a mask:
    ``model(input_ids, attention_mask=mask, position_ids=positions)`` where ``positions =
    max(cumsum(mask) - 1, 0)`` counts each sequence's real tokens from 0 (or the batch's own
    ``position_ids``), so that a sequence's real tokens get the positions they have unpadded,
    whichever side the padding is on and however much of it the batch needs. A model whose
    forward takes no ``position_ids`` (``TypeError`` naming it) is called without them: its
    positions, if any, are its own. The model returns logits ``[B, T, V]`` or an object with
    ``.logits`` (Hugging Face models).

    **Predicted tokens.** For a sequence ``z`` with labels ``y`` and mask ``a``, position ``t``
    predicts ``y_{t+1}`` when ``y_{t+1} != -100`` and ``a_t = a_{t+1} = 1``; call that set
    ``S(z)``. Padding and ``-100`` positions are outside it and contribute nothing. Every
    sequence needs ``|S(z)| >= 1``. With
    ``p_t = softmax(logits_t)[y_{t+1}]`` the per-token margin is

        m_t = logits_t[y_{t+1}] - logsumexp_{c != y_{t+1}} logits_t[c] = log(p_t / (1 - p_t)),

    and the training loss, summed cross-entropy, is
    ``L(z) = sum_{t in S} -log p_t = sum_{t in S} log(1 + exp(-m_t))``.

    **f and Q**::

        f(z) = sum_{t in S(z)} m_t                     # the sequence's summed log-odds
        Q(z) = (1 / |S(z)|) sum_{t in S(z)} (1 - p_t)  # the mean per-token weight

    Why these. TRAK's score of a train example stands in for its loss gradient, written
    ``Q(z) grad f(z)`` (the one-step Newton estimate of leaving ``z`` out, with the logistic
    Hessian weights dropped). Here the exact negative loss gradient is
    ``-grad L(z) = sum_t (1 - p_t) grad m_t``, while TRAK uses
    ``Q(z) grad f(z) = mean_t(1 - p_t) * sum_t grad m_t``.

    - *Exact* with one predicted token: ``f`` is then the classification task's margin and
      ``Q = 1 - p``. Also exact when every predicted token has the same ``p_t``.
    - *An approximation* otherwise: the per-token weights ``1 - p_t`` are replaced by their
      mean. The exact form needs one gradient per token, ``|S|`` times the work. Folding the
      weights into ``f`` (``f = sum_t stopgrad(1 - p_t) m_t``, ``Q = 1``) would make target
      features loss gradients rather than margins, and lose the one-token reduction above.
    - *Sum, not mean*, for ``f``. The loss sums over tokens: Hugging Face's token-mean over a
      batch weights every token equally, so each sequence counts by its sum. A sequence's
      feature then grows with its number of predicted tokens, as its share of the loss does.
      ``f = mean_t m_t`` with ``Q = sum_t (1 - p_t)`` gives the same train rows' ``Q grad f``
      but would shrink long sequences in the kernel and in the targets' features.

    **The exact per-token weights**, for reference: ``-grad L(z) = sum_{t in S(z)} (1 - p_t)
    grad m_t``, each token's margin gradient weighted by its own ``1 - p_t``; TRAK's
    ``Q(z) grad f(z)`` above replaces those weights by their mean over ``S(z)``.

    ``f`` is a function of the example alone (no batch statistics), so example ``b``'s
    outputs depend on example ``b`` only. Padding changes nothing as long as the model gives
    real tokens the same logits with and without the padding: true with an attention mask
    and the position ids above, on either side (for a model that takes position ids; one that
    does not must derive its positions from the mask itself for left padding).

    Parameters differentiated through ``torch.func.vmap`` (``gradients="vmap"``, or layers
    the hooks do not support) need a Hugging Face model given an attention mask to use eager
    attention (``GPT2Config(attn_implementation="eager")``): its SDPA mask builder branches on
    the mask's values, which ``vmap`` cannot trace. The hook path calls :meth:`outputs` on the
    whole batch and does not care.
    """

    name = "language_modeling"
    fixed_shapes = False
    #: Fisher rows per sequence for ``curvature="fisher"``: one per chunk of positions (see
    #: :class:`~trak_fast.features.featurizer.FisherFeaturizer`). 4 rows estimated the
    #: Fisher better than 1 on the LM benchmark at no extra backward pass.
    fisher_chunks: int = 4

    def __init__(self, fisher_chunks: int = fisher_chunks):
        self.fisher_chunks = fisher_chunks

    def preferred_features(self) -> Dict[str, Any]:
        """Factored features per layer (``vec(P_out^T G P_in)``), ``k x k`` with ``k`` half the
        model's width between 32 and 48 (``factored_dims="auto"``,
        :func:`~trak_fast.settings.auto_factored_dims`): on the language-model LDS benchmark
        (``benchmarks/bench_lm_lds.py``) they scored level with per-layer dense projections on
        the small model and above them on the medium one, at a fraction of their cost; 48 x 48
        beat 32 x 32 on the wider model (see the README)."""
        return {"projection": "factored", "factored_dims": LM_FACTORED_DIMS}

    def preferred_scoring(self, features: Any) -> Dict[str, Any]:
        """The per-layer Fisher of labels drawn from the model (``curvature="fisher"``, see
        :mod:`trak_fast.scoring.fisher`): a softmax over ``V`` tokens has a rank ``V - 1``
        Fisher per token, which TRAK's one-direction-per-example kernel ``Phi^T Q Phi``
        misses; on the LM benchmark it beat that kernel and the gradient dot product, level
        with kronfluence's EK-FAC. One kernel over all columns for a dense projection (whose
        columns mix the layers)."""
        dense = features.projection == "dense" and features.proj_dim is not None
        return {"curvature": "fisher", "kernel": "full" if dense else "per_layer"}

    def output(self, model: ModelFn, example: Any) -> torch.Tensor:
        batch = {key: value[None] for key, value in example.items()}
        logits = self._logits(model, batch)
        margins, _, predicted = self._token_terms(logits, batch, check_labels=False)
        return torch.where(predicted, margins, 0.0).sum(-1)[0]

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        margins, _, predicted = self._token_terms(self._logits(model, batch), batch, fused=True)
        return torch.where(predicted, margins, 0.0).sum(-1)

    def out_to_loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        _, p, predicted = self._token_terms(self._logits(model, batch), batch, fused=True)
        return self._q(p.detach(), predicted)

    def outputs_and_out_to_loss(self, model: ModelFn, batch: Any):
        logits = self._logits(model, batch)
        margins, p, predicted = self._token_terms(logits, batch, fused=True)
        return torch.where(predicted, margins, 0.0).sum(-1), self._q(p.detach(), predicted)

    def log_likelihoods(self, model: ModelFn, batch: Any, draw=None) -> torch.Tensor:
        """``sum_{t in S} log softmax(logits_t)[y_{t+1}]`` per sequence; with ``draw``,
        ``y_{t+1} = draw(logits)[:, t]``, drawn from ``softmax(logits_t)`` (see
        :mod:`.likelihood`)."""
        logits = self._logits(model, batch)
        labels, predicted = self._next_tokens(batch)
        logits = logits[:, :-1]
        target = torch.where(predicted, labels, 0) if draw is None else draw(logits)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
        return torch.where(predicted, picked, 0.0).sum(-1)

    @staticmethod
    def _q(p: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        weight = predicted.to(torch.float32)
        return ((1.0 - p.float()) * weight).sum(-1) / weight.sum(-1)

    @staticmethod
    def _logits(model: ModelFn, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        kwargs = {} if mask is None else {"attention_mask": mask}
        if "position_ids" in batch:
            out = model(input_ids, position_ids=batch["position_ids"], **kwargs)
        elif mask is None:
            out = model(input_ids)
        else:
            try:
                out = model(input_ids, position_ids=positions_from_mask(mask), **kwargs)
            except TypeError as exc:       # a forward without position_ids: its own positions
                if "unexpected keyword argument 'position_ids'" not in str(exc):
                    raise
                out = model(input_ids, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the language-modeling task needs the model to return logits "
                            f"[B, T, V] or an object with .logits, got {type(out).__name__}")
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise ValueError(f"the language-modeling task needs logits [B, T, V] = "
                             f"[{input_ids.shape[0]}, {input_ids.shape[1]}, V], got shape "
                             f"{tuple(logits.shape)}")
        return logits

    @staticmethod
    def _next_tokens(batch: Dict[str, torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(labels[:, 1:], t in S)``, each ``[B, T - 1]``: what position ``t`` predicts, and whether."""
        labels = batch.get("labels", batch["input_ids"])[:, 1:].long()
        predicted = labels != IGNORE_INDEX
        mask = batch.get("attention_mask")
        if mask is not None:
            predicted = predicted & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        return labels, predicted

    @staticmethod
    def _token_terms(logits: torch.Tensor, batch: Dict[str, torch.Tensor],
                     check_labels: bool = True, fused: bool = False
                     ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Per-position ``(m_t, p_t, t in S)``, each ``[B, T - 1]``; logits at ``t`` predict ``t + 1``.

        ``fused=True`` (the batched paths): :class:`FusedMargin`, one pass over the logits in
        row blocks. Otherwise (one example under ``torch.func.vmap``) the same math written
        with whole-vocabulary temporaries, which vmap can trace."""
        labels, predicted = LanguageModelingTask._next_tokens(batch)
        vocab = logits.shape[-1]
        if check_labels:   # not under vmap: int() reads values
            used = torch.where(predicted, labels, 0)
            if bool(((used < 0) | (used >= vocab)).any()):
                raise ValueError(f"labels must be -100 or lie in [0, {vocab}) for a model with "
                                 f"{vocab} logits, got values in [{int(used.min())}, {int(used.max())}]")
        target = torch.where(predicted, labels, 0)
        if fused:
            # Every position of the contiguous [B * T, V] logits (no copy of logits[:, :-1]);
            # the last position of each row predicts nothing and is dropped.
            full = torch.cat([target, target.new_zeros(target.shape[0], 1)], 1)
            margins, p = FusedMargin.apply(logits.reshape(-1, vocab), full.reshape(-1))
            shape = logits.shape[:2]
            return (margins.reshape(shape)[:, :-1], p.reshape(shape)[:, :-1], predicted)
        target = target[..., None]
        logits = logits[:, :-1]
        correct = logits.gather(-1, target)[..., 0]
        is_label = torch.arange(vocab, device=logits.device) == target
        others = torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=-1)
        p = torch.exp(correct.float() - torch.logsumexp(logits.float(), dim=-1))
        return correct - others, p, predicted

    def check_batch(self, batch: Any, where: str) -> int:
        if not isinstance(batch, Mapping):
            raise TypeError(f"{where}: the language-modeling task expects dict batches "
                            f"{{'input_ids': [B, T], 'attention_mask': ..., 'labels': ...}}, "
                            f"got {type(batch).__name__}")
        if "input_ids" not in batch:
            raise ValueError(f"{where}: the language-modeling task needs 'input_ids' in the "
                             f"batch, got keys {sorted(batch)}")
        unknown = sorted(set(batch) - {"input_ids", "attention_mask", "labels", "position_ids"})
        if unknown:
            raise ValueError(f"{where}: unexpected keys {unknown}; the language-modeling task "
                             "reads only 'input_ids', 'attention_mask', 'labels' and "
                             "'position_ids'")
        input_ids = batch["input_ids"]
        for key in [key for key in ("input_ids", "attention_mask", "labels", "position_ids")
                    if key in batch]:
            value = batch[key]
            allowed = _INTEGER_DTYPES + ((torch.bool,) if key == "attention_mask" else ())
            if not isinstance(value, torch.Tensor) or value.dtype not in allowed:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{where}: {key!r} must be an integer tensor"
                                f"{' (or bool)' if key == 'attention_mask' else ''}, got {got}")
            if key == "input_ids" and (value.dim() != 2 or value.shape[1] < 2):
                raise ValueError(f"{where}: 'input_ids' must be [B, T] with T >= 2 (a token "
                                 f"and one to predict), got shape {tuple(value.shape)}")
            if value.shape != input_ids.shape:
                raise ValueError(f"{where}: {key!r} must have the shape of 'input_ids' "
                                 f"{tuple(input_ids.shape)}, got {tuple(value.shape)}")
        mask = batch.get("attention_mask")
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{where}: 'attention_mask' must hold only 0 and 1")
        labels = batch.get("labels")
        if labels is not None:
            bad = labels[(labels < 0) & (labels != IGNORE_INDEX)]
            if bad.numel():
                raise ValueError(f"{where}: 'labels' must be -100 (ignored) or a token id >= 0, "
                                 f"got {int(bad[0])}")
        empty = (~self._next_tokens(batch)[1].any(1)).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(
                f"{where}: sequences {empty[:8]}{' ...' if len(empty) > 8 else ''} predict no "
                "token: every position t + 1 has label -100 or is padding (attention_mask 0 at "
                "t or t + 1); each sequence needs at least one predicted token")
        return batch_size_of(batch, where)


class FusedMargin(torch.autograd.Function):
    """Per-row margin and probability of the label, in one pass over ``logits [N, V]``.

    For row ``i`` with label ``y = target[i]``::

        others_i = logsumexp_{v != y} l_iv                  # the label masked out
        m_i      = l_iy - others_i                          # the margin
        p_i      = exp(l_iy - logaddexp(l_iy, others_i))    # softmax(l_i)_y (not differentiated)
        dm_i / dl_iv = 1 if v = y, else -exp(l_iv - others_i)

    Exactly the arithmetic of the whole-vocabulary form, but computed in blocks of rows, so
    the only ``[N, V]`` tensors are the logits (saved for the backward pass, which autograd
    keeps for the output layer anyway) and the gradient; a block's temporary is at most
    ``2^24`` elements. Accumulates in float32 for half-precision logits.
    """

    BLOCK_ELEMENTS = 1 << 24

    @staticmethod
    def _accumulation(dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):
        n, vocab = logits.shape
        acc = FusedMargin._accumulation(logits.dtype)
        rows = max(1, FusedMargin.BLOCK_ELEMENTS // max(1, vocab))
        index = target[:, None]
        correct = logits.gather(1, index)[:, 0].to(acc)
        others = torch.empty(n, dtype=acc, device=logits.device)
        for r in range(0, n, rows):
            block = logits[r:r + rows].to(acc, copy=True)
            block.scatter_(1, index[r:r + rows], float("-inf"))
            others[r:r + rows] = torch.logsumexp(block, dim=1)
            del block
        ctx.save_for_backward(logits, target, others)
        p = torch.exp(correct - torch.logaddexp(correct, others)).float()
        ctx.mark_non_differentiable(p)
        return (correct - others).to(logits.dtype), p

    @staticmethod
    def backward(ctx, grad_margin: torch.Tensor, grad_p: torch.Tensor):
        logits, target, others = ctx.saved_tensors
        n, vocab = logits.shape
        acc = others.dtype
        rows = max(1, FusedMargin.BLOCK_ELEMENTS // max(1, vocab))
        grad = torch.empty_like(logits)
        g = grad_margin.to(acc)
        for r in range(0, n, rows):
            block = logits[r:r + rows].to(acc)
            block = torch.exp(block - others[r:r + rows, None]).mul_(-g[r:r + rows, None])
            block.scatter_(1, target[r:r + rows, None], g[r:r + rows, None])
            grad[r:r + rows] = block
            del block
        return grad, None
