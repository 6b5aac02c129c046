"""Hugging Face families by hooks alone: every parameter, exact, dense and factored.

Tiny models built from transformers configs (hidden 32, 2 layers, GQA with 2 KV heads where
the family has it, default SDPA attention, float64), right- and left-padded dict batches with
``attention_mask`` and ``labels`` holding -100. The reference throughout is a loop of
one-example autograd passes of the task's own output over **all** parameters: for the
language-modeling task the example *unpadded* (so features that depend on the batch's
padding fail), for classification the example's own row of the batch.

Two levels:

- adapter level (:func:`hooked`): drives :func:`~trak_fast.gradients.hooks.tapped` and the
  adapters directly, as a strategy would (``weight_grad`` / ``bias_grad`` /
  ``project_weight`` dense, ``factored_input`` / ``factored_features`` factored), with no
  vmap pass and no parameter left out;
- end to end through :func:`trak_fast.featurize` (``proj_dim=None`` and
  ``projection="factored"``), through the strategies (dense hooks, factored).
"""
import numpy as np
import pytest
import torch
from torch import nn

import trak_fast
from trak_fast import LanguageModelingTask, Task, model_seed, projection_matrix
from trak_fast.features.gradients.factored import name_seed
from trak_fast.features.gradients.hooks import LayerTap, backward_through_taps, hookable_parameters, tapped
from trak_fast.features.gradients.layers import (EmbeddingAdapter, LayerNormAdapter, NormAdapter,
                                        adapter_for)
from trak_fast.features.tasks import ClassificationTask

transformers = pytest.importorskip("transformers")

VOCAB, PAD = 64, 3
LENGTHS = [9, 5, 7, 3]


def _config(family):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
            eos_token_id=0)
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
               "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
               "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[family]
        return cls[0], cls[1](num_key_value_heads=2, **common)
    if family == "gptneox":
        return transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**common)
    if family == "bert":
        return transformers.BertForSequenceClassification, transformers.BertConfig(
            num_labels=3, **common)
    raise KeyError(family)


_MODELS = {}


def make_model(family):
    if family not in _MODELS:
        cls, config = _config(family)
        torch.manual_seed(0)
        model = cls(config).double().eval()
        with torch.no_grad():          # norms away from their ones/zeros initialisation
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        _MODELS[family] = model
    return _MODELS[family]


FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gptneox", "bert"]
LM_FAMILIES = FAMILIES[:-1]


def _sequences(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g) for n in LENGTHS]


def lm_batch(side):
    """Padded ``{"input_ids", "attention_mask", "labels"}``; labels -100 at padding and at
    some real positions; ``examples``: each sequence alone, unpadded, with its labels."""
    seqs = _sequences()
    length = max(LENGTHS)
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100)
    examples = []
    for row, s in enumerate(seqs):
        own = s.clone()
        if row == 0:
            own[[3, 6]] = -100
        if row == 2:
            own[2:4] = -100
        where = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[row, where], mask[row, where], labels[row, where] = s, 1, own
        examples.append({"input_ids": s[None], "labels": own[None]})
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, examples


def cls_batch(side, token_types=True):
    """A padded BERT batch; ``examples``: each row of the batch alone (its padding kept)."""
    batch, _ = lm_batch(side)
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "labels": torch.tensor([0, 2, 1, 2])}
    if token_types:
        types = torch.zeros_like(out["input_ids"])
        types[:, 4:] = 1
        out["token_type_ids"] = types
    examples = [{k: v[b:b + 1] for k, v in out.items()} for b in range(4)]
    return out, examples


def case(family, side):
    if family == "bert":
        return make_model(family), ClassificationTask(), *cls_batch(side, token_types=side == "right")
    return make_model(family), LanguageModelingTask(), *lm_batch(side)


# ---- references --------------------------------------------------------------------------------

def reference_grads(model, task, examples):
    """``{name: [B, *shape]}``: one autograd pass of ``task.outputs`` per example (float64)."""
    names, params = zip(*model.named_parameters())
    rows = []
    for example in examples:
        f = task.outputs(model, example)
        assert f.shape == (1,)
        grads = torch.autograd.grad(f[0], params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return {n: torch.stack([r[i] for r in rows]).detach() for i, n in enumerate(names)}


def flat(grads, names):
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1)


def gram_error(got, expected):
    g, e = got @ got.T, expected @ expected.T
    return ((g - e).norm() / e.norm()).item()


def rel(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def worst_parameter(got, expected, names):
    """``(name, error)`` of the parameter with the largest error relative to its own gradient's
    norm, floored at 1e-6 of the whole gradient's (some gradients are zero up to rounding:
    attention key biases, by softmax's shift invariance)."""
    floor = 1e-6 * flat(expected, names).norm()
    errors = {n: ((got[n] - expected[n]).norm() / max(expected[n].norm(), floor)).item()
              for n in names}
    name = max(errors, key=errors.get)
    return name, errors[name]


# ---- the hook machinery, driven directly (what a strategy does) ----------------------------------

def _tracked(model):
    """``[(module, adapter, [(role, name)])]`` for every registration of every parameter."""
    uses = hookable_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in uses]
    assert missing == [], f"parameters without a hook adapter: {missing}"
    modules = {}
    for name in names:
        for use in uses[name]:
            entry = modules.setdefault(id(use.module), (use.module, adapter_for(use.module), []))
            entry[2].append((use.role, name))
    return list(modules.values())


def hooked(model, task, batch, make_tap):
    """One batched forward and backward pass with a tap per tracked module; returns ``f``."""
    size = task.check_batch(batch, "batch")
    taps = [make_tap(module, adapter, params) for module, adapter, params in _tracked(model)]
    with tapped(taps, torch.device("cpu"), size) as (anchor, skipped), torch.enable_grad():
        f, q = task.batched_outputs_and_out_to_loss(model, batch)
        backward_through_taps(f.sum(), anchor)
    assert skipped == [], f"modules that did not see the batch: {skipped}"
    assert f.shape == (size,) and q.shape == (size,)
    return f


def hooked_grads(model, task, batch):
    """``{name: [B, *shape]}`` from ``weight_grad`` / ``bias_grad``, uses of a tied parameter
    summed."""
    size = task.check_batch(batch, "batch")
    grads = {n: torch.zeros(size, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}

    def make_tap(module, adapter, params):
        def on_grad(inputs, grad):
            for role, name in params:
                for start in range(0, size, 3):           # slices of the batch, as a strategy
                    part = slice(start, min(size, start + 3))
                    grads[name][part] += (adapter.weight_grad(inputs[part], grad[part])
                                          if role == "weight" else adapter.bias_grad(grad[part]))
        return LayerTap(module, adapter, lambda inputs: inputs, on_grad)

    hooked(model, task, batch, make_tap)
    return grads


def _matrices(model, k_out, k_in):
    """Random ``(P_out, P_in)`` per module key (its weight's canonical name), float64."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    out = {}
    for module, adapter, _ in _tracked(model):
        key = canonical[id(module.weight)]
        d_out, d_in = adapter.factored_dims
        if key in out:                                    # a tied weight: one pair of matrices
            assert (out[key][0].shape[0], None if out[key][1] is None else out[key][1].shape[0]) \
                == (d_out, d_in)
            continue
        out[key] = (torch.randn(d_out, k_out, generator=g, dtype=torch.float64),
                    None if d_in is None else torch.randn(d_in, k_in, generator=g, dtype=torch.float64))
    return out


def hooked_factored(model, task, batch, matrices):
    """``{name: [B, width]}`` from ``factored_input`` / ``factored_features``."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    feats = {}

    def make_tap(module, adapter, params):
        p_out, p_in = matrices[canonical[id(module.weight)]]
        roles = [role for role, _ in params]

        def on_grad(state, grad):
            for (_, name), block in zip(params, adapter.factored_features(state, grad, p_out, p_in, roles)):
                feats[name] = feats.get(name, 0) + block
        return LayerTap(module, adapter, lambda inputs: adapter.factored_input(inputs, p_in), on_grad)

    hooked(model, task, batch, make_tap)
    return feats


def factored_reference(model, grads, matrices):
    """The factored blocks of the reference gradients, by module type (independent of the
    adapters): ``P_out^T G P_in`` with ``G`` the weight as ``[d_out, d_in]`` (Linear and the
    embedding table as stored, GPT-2's Conv1D transposed), ``P_out^T g`` for vectors."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    expected = {}
    for module, _, params in _tracked(model):
        p_out, p_in = matrices[canonical[id(module.weight)]]
        for role, name in params:
            g = grads[name]
            if g.dim() == 2:                              # bias or norm weight: [B, d]
                expected[name] = g @ p_out
                continue
            if type(module).__name__ == "Conv1D":
                g = g.transpose(1, 2)
            assert isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"
            expected[name] = (p_out.T @ g @ p_in).reshape(g.shape[0], -1)
    return expected


# ---- adapter-level tests -------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_by_hooks_is_exact(family, side):
    model, task, batch, examples = case(family, side)
    expected = reference_grads(model, task, examples)
    got = hooked_grads(model, task, batch)
    names = [n for n, _ in model.named_parameters()]
    name, error = worst_parameter(got, expected, names)
    assert error < 1e-5, name
    assert gram_error(flat(got, names), flat(expected, names)) < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_factored_is_exact(family, side):
    model, task, batch, examples = case(family, side)
    matrices = _matrices(model, 3, 4)
    expected = factored_reference(model, reference_grads(model, task, examples), matrices)
    got = hooked_factored(model, task, batch, matrices)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(got) == sorted(names)                   # 100% covered
    for name in names:
        assert got[name].shape == expected[name].shape, name
    name, error = worst_parameter(got, expected, names)
    assert error < 1e-5, name
    assert gram_error(flat(got, names), flat(expected, names)) < 1e-4


def test_tied_embedding_is_one_parameter_with_both_uses_summed():
    model, task, batch, examples = case("gpt2", "right")
    uses = hookable_parameters(model)["transformer.wte.weight"]
    kinds = sorted(type(u.module).__name__ for u in uses)
    assert kinds == ["Embedding", "Linear"] and model.lm_head.weight is model.transformer.wte.weight
    assert {adapter_for(u.module).factored_dims for u in uses} == {(VOCAB, 32)}
    expected = reference_grads(model, task, examples)["transformer.wte.weight"]
    assert rel(hooked_grads(model, task, batch)["transformer.wte.weight"], expected) < 1e-6
    # Each use alone is not the gradient: both are needed.
    size = len(examples)
    for alone in uses:
        part = torch.zeros_like(expected)

        def make_tap(module, adapter, params, alone=alone):
            def on_grad(inputs, grad):
                if module is alone.module:
                    part.add_(adapter.weight_grad(inputs, grad))
            return LayerTap(module, adapter, lambda inputs: inputs, on_grad)
        hooked(model, task, batch, make_tap)
        assert rel(part, expected) > 1e-2 and part.shape[0] == size


class OnlyOutputs(Task):
    """Defines only the batched ``outputs``; calls GPT-2 with no position ids, so ``wpe`` looks
    up ``[1, T]`` positions shared by the batch; ``out_to_loss`` calls the model otherwise
    (one example at a time), which the hooks must not measure."""

    name = "test-only-outputs"
    fixed_shapes = False

    def outputs(self, model, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * mask[:, 1:]).sum(-1)

    def out_to_loss(self, model, batch):
        return torch.cat([model(input_ids=batch["input_ids"][b:b + 1, :2]).logits[:, 0, 0]
                          for b in range(batch["input_ids"].shape[0])]).float()


def test_shared_position_index_and_an_outputs_only_task():
    model = make_model("gpt2")
    batch, _ = lm_batch("right")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    task = OnlyOutputs()
    assert task.has_batched_outputs and task.batched_outputs_problem() is None
    examples = [{k: v[b:b + 1] for k, v in batch.items()} for b in range(4)]
    expected = reference_grads(model, task, examples)
    got = hooked_grads(model, task, batch)              # asserts no module was skipped
    for name in ("transformer.wpe.weight", "transformer.wte.weight", "transformer.ln_f.weight"):
        assert rel(got[name], expected[name]) < 1e-6, name
    # The default one-example output() is outputs() of a batch of one (vmap: see below; this
    # SDPA model's mask code cannot run under vmap, which the hooks never need).
    f = task.outputs(model, batch)
    for b in range(4):
        torch.testing.assert_close(task.output(model, {k: v[b] for k, v in batch.items()}), f[b])


def test_embedding_project_weight_equals_projecting_its_gradient():
    torch.manual_seed(2)
    emb = nn.Embedding(20, 5, padding_idx=0).double()
    adapter = adapter_for(emb)
    assert isinstance(adapter, EmbeddingAdapter)
    ids = torch.tensor([[3, 4, 4, 0, 9], [19, 3, 0, 0, 5]])
    grad = torch.randn(2, 5, 5, dtype=torch.float64)
    p = torch.randn(100, 7, dtype=torch.float64)
    got = torch.zeros(2, 7, dtype=torch.float64)
    calls = []

    def project(values, offset):
        calls.append((offset, values.shape[1]))
        got.add_(values @ p[offset:offset + values.shape[1]])

    adapter.project_weight(ids, grad, project)
    # independent: the per-example table gradients by a loop, then a dense product
    table = torch.zeros(2, 20, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(5):
            if ids[b, t] != 0:
                table[b, ids[b, t]] += grad[b, t]
    torch.testing.assert_close(got, table.reshape(2, -1) @ p)
    torch.testing.assert_close(adapter.weight_grad(ids, grad), table)
    assert calls == [(0, 5), (15, 15), (45, 5), (95, 5)]   # runs {0}, {3, 4, 5}, {9}, {19} x d=5


class GemmaLike(nn.Module):
    """RMSNorm scaled by ``1 + w`` (Gemma's): not ``w * h(x)``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class ScaleThenNormalize(nn.Module):
    """Looks like an RMSNorm (weight [d], eps) but normalizes after scaling."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class BiasAsScale(nn.Module):
    """weight and bias [d], but y = w * x * b."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight * self.bias


def test_norms_are_recognised_by_what_they_compute():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    for cls in (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm):
        assert not issubclass(cls, nn.LayerNorm)
        module = cls(8).double()
        with torch.no_grad():
            module.weight.normal_()
        adapter = adapter_for(module)
        assert isinstance(adapter, NormAdapter), cls.__name__
        # its weight gradient against autograd, per example
        x = torch.randn(3, 4, 8, dtype=torch.float64)
        delta = torch.randn(3, 4, 8, dtype=torch.float64)
        expected = torch.stack([torch.autograd.grad((module(x[b:b + 1]) * delta[b:b + 1]).sum(),
                                                    module.weight)[0] for b in range(3)])
        torch.testing.assert_close(adapter.weight_grad(x, delta), expected, rtol=1e-6, atol=1e-6)
    neox = make_model("gptneox").gpt_neox.layers[0].input_layernorm
    assert type(neox) is nn.LayerNorm and isinstance(adapter_for(neox), LayerNormAdapter)
    for look_alike in (GemmaRMSNorm(8), GemmaLike(8), ScaleThenNormalize(8), BiasAsScale(8)):
        assert adapter_for(look_alike) is None, type(look_alike).__name__
    model = nn.Sequential(nn.Linear(8, 8), GemmaLike(8))
    assert "1.weight" not in hookable_parameters(model)           # keeps the vmap path


# ---- tasks -------------------------------------------------------------------------------------

def test_task_definitions_and_their_errors():
    class Neither(Task):
        def out_to_loss(self, model, batch):
            return torch.ones(1)

    with pytest.raises(TypeError, match="must define outputs.*or output"):
        Neither()

    class OutputOnly(Task):
        def output(self, model, example):
            return model(example[0][None])[0, 0]

        def out_to_loss(self, model, batch):
            return torch.ones(batch[0].shape[0])

    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    task = OutputOnly()
    assert not task.has_batched_outputs and "defines only output" in task.batched_outputs_problem()
    torch.testing.assert_close(task.outputs(lin, (x, x)), lin(x)[:, 0])     # vmap of output()

    class Below(OnlyOutputs):
        def output(self, model, example):
            return 2 * super().output(model, example)

    class Sum(Task):
        def outputs(self, model, batch):
            return model(batch[0]).sum(-1) * batch[1]

        def out_to_loss(self, model, batch):
            return torch.ones(batch[0].shape[0])

    scale = torch.randn(5)
    per_example = torch.func.vmap(lambda ex: Sum().output(lin, ex))((x, scale))
    torch.testing.assert_close(per_example, lin(x).sum(-1) * scale)
    assert Sum().has_batched_outputs

    problem = Below().batched_outputs_problem()
    assert not Below().has_batched_outputs
    assert "overrides output() in Below but inherits outputs() from OnlyOutputs" in problem


def test_classification_dict_batches_and_model_outputs_with_logits():
    model, task = make_model("bert"), ClassificationTask()
    batch, examples = cls_batch("right")
    f, q = task.outputs_and_out_to_loss(model, batch)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for b in range(4):
        y = int(batch["labels"][b])
        others = torch.cat([logits[b, :y], logits[b, y + 1:]])
        torch.testing.assert_close(f[b], logits[b, y] - others.logsumexp(0))
        torch.testing.assert_close(q[b].double(), 1 - logits[b].softmax(0)[y], rtol=1e-6, atol=1e-7)
    one = {k: v[2] for k, v in batch.items()}
    torch.testing.assert_close(task.output(model, one), f[2])
    assert task.check_batch(batch, "b") == 4
    with pytest.raises(ValueError, match="needs 'labels' in a dict batch"):
        task.check_batch({"input_ids": batch["input_ids"]}, "b")
    with pytest.raises(TypeError, match="must be a tensor, got list for 'input_ids'"):
        task.check_batch({"input_ids": [1, 2], "labels": batch["labels"]}, "b")
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        task.check_batch({"input_ids": batch["input_ids"], "labels": batch["labels"].float()}, "b")

    class TupleOut(nn.Module):
        def forward(self, x):
            return (x,)
    with pytest.raises(TypeError, match=r"logits tensor or an object with \.logits \(Hugging Face models\), got tuple"):
        task.outputs(TupleOut(), (torch.randn(2, 3), torch.tensor([0, 1])))


def test_language_modeling_features_do_not_depend_on_padding():
    """Left, right and no padding give a sequence the same f and gradients (position ids
    come from the mask)."""
    model, task = make_model("llama"), LanguageModelingTask()
    right, examples = lm_batch("right")
    left, _ = lm_batch("left")
    alone = torch.cat([task.outputs(model, e) for e in examples])
    torch.testing.assert_close(task.outputs(model, right), alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(task.outputs(model, left), alone, rtol=1e-9, atol=1e-9)


# ---- end to end through trak_fast.featurize ------------------------------------------------------

def _e2e_cases():
    return [pytest.param(f, s, id=f"{f}-{s}") for f in FAMILIES for s in ("right", "left")]


@pytest.mark.parametrize("family, side", _e2e_cases())
def test_featurize_raw_gradients_of_every_family(family, side):
    model, task, batch, examples = case(family, side)
    feats = trak_fast.featurize(model, model.state_dict(), [batch], task=task, proj_dim=None)
    names = [n for n, _ in model.named_parameters()]
    expected = flat(reference_grads(model, task, examples), names)
    assert feats.phi.shape == expected.shape
    assert gram_error(feats.phi, expected) < 1e-4 and rel(feats.phi, expected) < 1e-5


@pytest.mark.parametrize("family, side", _e2e_cases())
def test_featurize_factored_covers_every_parameter_exactly(family, side):
    model, task, batch, examples = case(family, side)
    k_out, k_in = 3, 4
    f = trak_fast.Featurizer(model, model.state_dict(), task=task, projection="factored",
                             factored_dims=(k_out, k_in), seed=2, model_id=1)
    names = [n for n, _ in model.named_parameters()]
    assert [b.name for b in f.layout] == names              # 100%, parameter order
    phi = trak_fast.featurize(model, model.state_dict(), [batch], task=task, projection="factored",
                              factored_dims=(k_out, k_in), seed=2, model_id=1).phi
    # The documented matrices: seeds from the weight's name, P_in only for matrix weights.
    seed = model_seed(2, 1)
    canonical = {id(p): n for n, p in model.named_parameters()}
    matrices = {}
    for module, adapter, _ in _tracked(model):
        key = canonical[id(module.weight)]
        d_out, d_in = adapter.factored_dims
        matrices[key] = (projection_matrix(d_out, k_out, seed=name_seed(seed, key + "/out"),
                                           dtype=torch.float64),
                         None if d_in is None else projection_matrix(
                             d_in, k_in, seed=name_seed(seed, key + "/in"), dtype=torch.float64))
    expected = factored_reference(model, reference_grads(model, task, examples), matrices)
    expected = torch.cat([expected[n] for n in names], 1)
    assert phi.shape == expected.shape
    assert gram_error(phi, expected) < 1e-4 and rel(phi, expected) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_featurize_needs_no_vmap_pass(family, monkeypatch):
    """At defaults (SDPA attention, which vmap cannot run with a mask) every parameter is
    hooked: the vmap path is never entered."""
    model, task, batch, _ = case(family, "right")

    def refuse(*args, **kwargs):
        raise AssertionError("the vmap path was used")
    monkeypatch.setattr(torch.func, "vmap", refuse)
    f = trak_fast.Featurizer(model, model.state_dict(), task=task, proj_dim=16)
    phi, _ = f(batch)
    assert f.plan.vmapped == [] and torch.isfinite(phi).all()


class MarginOnly(Task):
    """Only the batched outputs (a margin per example); no output(), no check_batch."""

    name = "test-margin-only"

    def outputs(self, model, batch):
        x, y = batch
        logits = model(x)
        return logits.gather(1, y[:, None])[:, 0] - logits.logsumexp(1)

    def out_to_loss(self, model, batch):
        return torch.ones(batch[0].shape[0])


@pytest.mark.parametrize("gradients", ["vmap", "hooks", "auto"])
def test_a_task_with_only_outputs_on_every_path(gradients):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4)).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 4, (7,))
    task = MarginOnly()
    names = [n for n, _ in model.named_parameters()]
    expected = flat(reference_grads(model, task, [(x[b:b + 1], y[b:b + 1]) for b in range(7)]), names)
    phi = trak_fast.featurize(model, model.state_dict(), [(x[:4], y[:4]), (x[4:], y[4:])],
                              task=task, proj_dim=None, gradients=gradients).phi
    assert rel(phi, expected) < 1e-10


def test_classification_dict_batches_of_different_lengths():
    """Dynamically padded text: each batch padded to its own longest sequence."""
    model, task = make_model("bert"), ClassificationTask()
    batch, examples = cls_batch("right")
    short = {k: (v[2:, :7] if v.dim() == 2 else v[2:]) for k, v in batch.items()}  # rows 2, 3: <= 7 tokens
    feats = trak_fast.featurize(model, model.state_dict(), [batch, short], task="classification",
                                proj_dim=None)
    names = [n for n, _ in model.named_parameters()]
    expected = flat(reference_grads(model, task, examples + examples[2:]), names)
    assert rel(feats.phi, expected) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_featurize_dense_projection(family):
    """``P^T grad`` (embedding rows projected by distinct ids, tied and shared-index tables
    included) against the explicit matrix times the reference gradients."""
    model, task, batch, examples = case(family, "left" if family == "gpt2" else "right")
    names = [n for n, _ in model.named_parameters()]
    expected = flat(reference_grads(model, task, examples), names)
    p = projection_matrix(expected.shape[1], 48, seed=model_seed(3, 2), dtype=torch.float64)
    phi = trak_fast.featurize(model, model.state_dict(), [batch], task=task, proj_dim=48,
                              seed=3, model_id=2).phi
    assert gram_error(phi, expected @ p) < 1e-4 and rel(phi, expected @ p) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_featurize_float32_models(family):
    """A float32 checkpoint's raw features against the float64 reference (Gram error)."""
    model, task, batch, examples = case(family, "right")
    names = [n for n, _ in model.named_parameters()]
    expected = flat(reference_grads(model, task, examples), names)
    single = _config(family)[0](model.config).eval()
    single.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    phi = trak_fast.featurize(single, single.state_dict(), [batch], task=task, proj_dim=None).phi
    assert phi.dtype == torch.float32
    assert gram_error(phi.double(), expected) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_attribute_and_trak_run_at_defaults_and_agree(family, tmp_path):
    """Default settings (dense k, sdpa attention, float32), padded dict batches: attribute() and
    the TRAK store loop run with every parameter by hooks and give the same scores."""
    cls, config = _config(family)
    torch.manual_seed(0)
    model = cls(config).eval()
    task = "classification" if family == "bert" else "language_modeling"
    train = [cls_batch("right")[0] if family == "bert" else lm_batch("right")[0],
             cls_batch("left")[0] if family == "bert" else lm_batch("left")[0]]
    targets = [train[0]]
    ckpt = model.state_dict()
    scores = trak_fast.attribute(model, [ckpt], train, targets, task=task, proj_dim=64,
                                 progress=False)
    assert scores.shape == (8, 4) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    trak = trak_fast.TRAK(tmp_path, model, train_size=8, task=task, proj_dim=64, progress=False)
    trak.featurize(ckpt, train, model_id=0)
    trak.finalize()
    trak.featurize_targets("q", ckpt, targets, model_id=0)
    torch.testing.assert_close(torch.from_numpy(np.array(trak.score("q"))), scores,
                               rtol=1e-4, atol=1e-6)
    paths = trak.status()["models"]["0"]["gradient_paths"]
    assert paths["vmap"] == [] and paths["left_out"] == []
    assert len(paths["hooks"]) == len(list(model.named_parameters()))
