"""Prototype (issue 24, not kept): the Fisher rows from Gaussian cotangents instead of sampled labels.

The library's sampled-label rows backpropagate ``e_y - p_t`` (``y ~ p_t``) from each position's
logits; here ``r_t = (diag(sqrt p_t) - p_t sqrt(p_t)^T) xi_t``, ``xi_t ~ N(0, I_V)`` (from the
same keyed uniforms, inverse normal CDF), which has the same covariance ``diag(p_t) - p_t p_t^T``
(so the same expected Fisher) and a lighter tail when ``p_t`` is peaked. Runs bench_lm_lds with
the library's ``LanguageModelingTask.log_likelihoods`` patched for the drawn rows, e.g.::

    python benchmarks/variants/gaussian_cotangents.py --size medium --library \
        --library-spaces factored32 --dampings 0.01 --only "fisher[factored" --no-kronfluence \
        --seed-offset 0 --out benchmarks/results/lm_lds_explore/medium_gaussian_cotangents_seed0.json

Medium model, seeds 0/1/2: 0.078 / 0.074 / 0.082 (sampled labels: 0.081 / 0.077 / 0.076).
"""
import math, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from trak_fast.features.tasks import likelihood as LK
from trak_fast.features import featurizer as FZ
from trak_fast.features.tasks.language_modeling import LanguageModelingTask as LM

class GaussDraw:
    def __init__(self, keys): self.keys = keys

orig = LM.log_likelihoods
def log_likelihoods(self, model, batch, draw=None):
    if not isinstance(draw, GaussDraw):
        return orig(self, model, batch, draw)
    logits = self._logits(model, batch)
    labels, predicted = self._next_tokens(batch)
    logits = logits[:, :-1]
    B, T, V = logits.shape
    u = LK.keyed_uniforms(draw.keys, T * V).reshape(B, T, V)
    xi = math.sqrt(2) * torch.erfinv(2 * u - 1)
    p = torch.softmax(logits.detach().double(), -1)
    sp = p.sqrt()
    r = sp * xi - p * (sp * xi).sum(-1, keepdim=True)
    val = (r.to(logits.dtype) * logits).sum(-1)
    return torch.where(predicted, val, 0.0).sum(-1)
LM.log_likelihoods = log_likelihoods
FZ.drawing = GaussDraw
LK.drawing = GaussDraw
import bench_lm_lds as B
B.main(sys.argv[1:])
