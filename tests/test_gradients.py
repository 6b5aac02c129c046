"""The gradient paths: hooks against vmap, factored against a float64 reference, hook hygiene."""
import hashlib
import json

import pytest
import torch
from torch import nn

from trak_fast import TRAK, Featurizer, StoreMismatchError, Task, attribute, featurize
from trak_fast.eval import digits
from trak_fast import model_seed, projection_matrix
from trak_fast.features.tasks import ClassificationTask

transformers = pytest.importorskip("transformers")

N = 24


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = digits.load_digits(N, 4)
    return x, y


# ---- models ----------------------------------------------------------------------------------

class SequenceRegressor(nn.Module):
    """A Linear over [B, T, d] with a shared (called twice) layer and an in-place ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 7)
        self.shared = nn.Linear(7, 7)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):                       # x [B, T, 5]
        h = self.act(self.inp(x))
        h = self.shared(self.norm(self.shared(h)))
        return self.out(h).mean(1)              # [B, 3]


class StridedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, (2, 3), padding=(0, 1), dilation=(1, 2), bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, groups=2, padding=1)        # groups: not hooked
        self.head = nn.Linear(6 * 3 * 2, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x.reshape(-1, 1, 8, 8)))
        h = torch.relu(self.c3(torch.relu(self.c2(h))))
        return self.head(h.flatten(1))


def tiny_gpt2(attn="eager"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=24, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn       # eager: the vmap reference cannot run SDPA masks
    return transformers.GPT2LMHeadModel(config)


class NextTokenMargin(Task):
    """Summed next-token margin over the non-padded positions (test task, batched and single)."""

    name = "test-next-token"
    fixed_shapes = False

    @staticmethod
    def _f(logits, ids, mask):
        logits, target, valid = logits[:, :-1], ids[:, 1:], mask[:, 1:].to(logits.dtype)
        is_target = torch.arange(logits.shape[-1]) == target[..., None]
        correct = (logits * is_target).sum(-1)
        others = logits.masked_fill(is_target, float("-inf")).logsumexp(-1)
        return ((correct - others) * valid).sum(-1)

    def output(self, model, example):
        ids, mask = example["input_ids"][None], example["attention_mask"][None]
        return self._f(model(input_ids=ids, attention_mask=mask).logits, ids, mask)[0]

    def outputs(self, model, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return self._f(model(input_ids=ids, attention_mask=mask).logits, ids, mask)

    def out_to_loss(self, model, batch):
        return torch.ones(batch["input_ids"].shape[0])


class SequenceTask(Task):
    name = "test-sequence"

    def output(self, model, example):
        x, y = example
        return (model(x[None])[0] * y).sum()

    def outputs(self, model, batch):
        x, y = batch
        return (model(x) * y).sum(-1)

    def out_to_loss(self, model, batch):
        return torch.ones(batch[0].shape[0])


def _text_batches():
    torch.manual_seed(3)
    ids = torch.randint(0, 37, (10, 11))
    mask = torch.ones_like(ids)
    mask[6:, 7:] = 0                                       # padded tails
    ids = ids.masked_fill(mask == 0, 0)
    return [{"input_ids": ids[:6], "attention_mask": mask[:6]},
            {"input_ids": ids[6:, :9], "attention_mask": mask[6:, :9]}]


def _cases(data):
    x, y = data
    mlp = digits.make_mlp(16, seed=0)
    cnn = digits.make_cnn(8, seed=0)
    torch.manual_seed(2)
    seq_x, seq_y = torch.randn(N, 4, 5), torch.randn(N, 3)
    return {
        "mlp": (mlp, digits.batches(x, y, 10), "classification", ["2.weight", "0.bias"]),
        "cnn": (cnn, digits.batches(x, y, 10), "classification",
                ["features.2.weight", "head.1.weight"]),
        "strided-cnn": (StridedCNN(), digits.batches(x, y, 10), "classification",
                        ["c2.weight", "c3.weight", "head.bias"]),
        "sequence-linear": (SequenceRegressor(), [(seq_x[:13], seq_y[:13]), (seq_x[13:], seq_y[13:])],
                            SequenceTask(), ["shared.weight", "norm.weight"]),
        "gpt2": (tiny_gpt2(), _text_batches(), NextTokenMargin(),
                 ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight",
                  "transformer.h.1.mlp.c_proj.bias"]),
    }


CASES = ["mlp", "cnn", "strided-cnn", "sequence-linear", "gpt2"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("proj_dim", [64, None])
@pytest.mark.parametrize("with_grad_wrt", [False, True])
def test_hooks_equal_vmap(data, name, proj_dim, with_grad_wrt):
    model, batches, task, grad_wrt = _cases(data)[name]
    grad_wrt = grad_wrt if with_grad_wrt else None
    kwargs = dict(task=task, proj_dim=proj_dim, grad_wrt=grad_wrt, seed=3, model_id=1)
    sd = model.state_dict()
    reference = featurize(model, sd, batches, gradients="vmap", **kwargs)
    hooked = featurize(model, sd, batches, gradients="hooks", **kwargs)
    assert _rel(hooked.phi, reference.phi) < 1e-5
    torch.testing.assert_close(hooked.out_to_loss, reference.out_to_loss)
    plan = Featurizer(model, sd, task=task, proj_dim=proj_dim, grad_wrt=grad_wrt).plan
    assert plan.hooked, "the case must exercise the hook path"


class Doubler(nn.Module):
    """An unsupported module: uses its (tied) weight itself."""

    def forward(self, x):
        return torch.nn.functional.linear(x, 2 * self.weight)


class TiedToUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Linear(64, 64)
        self.twice = Doubler()
        self.twice.weight = self.a.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.twice(torch.tanh(self.a(x)))))


class Gate(nn.Module):
    """A layer no adapter knows (its parameter takes the vmap path and has no factored form);
    ``branch=True`` adds data-dependent control flow, which vmap cannot run."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))
        self.branch = branch

    def forward(self, x):
        if self.branch and (x > 0).any():
            return x * self.scale
        return x if self.branch else x * self.scale


def test_plan_tied_and_unsupported_parameters(data):
    model = tiny_gpt2()
    f = Featurizer(model, model.state_dict(), task=NextTokenMargin(), proj_dim=8)
    # wte is registered in an Embedding and (as lm_head.weight) in a Linear: both supported.
    assert {"transformer.wte.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight"} <= set(f.plan.hooked)
    # wpe looks up [1, T] positions broadcast over the batch: the hooks tap it with the
    # positions expanded to the batch (per-example output gradients), so it stays hooked.
    f(_text_batches()[0])
    assert f.plan.vmapped == [] and "transformer.wpe.weight" in f.plan.hooked
    cnn = StridedCNN()
    plan = Featurizer(cnn, cnn.state_dict(), proj_dim=8).plan
    assert plan.vmapped == ["c3.weight", "c3.bias"] and "c2.weight" in plan.hooked
    # A weight also registered in an unsupported module takes the vmap path.
    tied = TiedToUnsupported()
    plan = Featurizer(tied, tied.state_dict(), proj_dim=8).plan
    assert plan.vmapped == ["a.weight"] and "a.bias" in plan.hooked
    batches = digits.batches(*data, 12)
    reference = featurize(tied, tied.state_dict(), batches, proj_dim=None, gradients="vmap")
    hooked = featurize(tied, tied.state_dict(), batches, proj_dim=None, gradients="hooks")
    assert _rel(hooked.phi, reference.phi) < 1e-6


class TiedLinears(nn.Module):
    """One weight registered in two Linear modules (both hooked) and one used functionally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.c = nn.Linear(64, 10)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_weight_tied_between_two_linears(data):
    model = TiedLinears()
    batches = digits.batches(*data, 12)
    plan = Featurizer(model, model.state_dict(), proj_dim=8).plan
    assert "a.weight" in plan.hooked and not plan.vmapped
    reference = featurize(model, model.state_dict(), batches, proj_dim=None, gradients="vmap")
    hooked = featurize(model, model.state_dict(), batches, proj_dim=None, gradients="hooks")
    assert _rel(hooked.phi, reference.phi) < 1e-6


def test_subclass_overriding_output_keeps_vmap(data):
    class Scaled(ClassificationTask):
        name = "scaled"

        def output(self, model, example):
            return 2 * super().output(model, example)

    assert not Scaled().has_batched_outputs and ClassificationTask().has_batched_outputs
    model = digits.make_mlp(8)
    batches = digits.batches(*data, 12)
    plain = featurize(model, model.state_dict(), batches, proj_dim=None)
    scaled = featurize(model, model.state_dict(), batches, task=Scaled(), proj_dim=None)
    torch.testing.assert_close(scaled.phi, 2 * plain.phi)
    with pytest.raises(ValueError, match="gradients='hooks' needs a task with a batched outputs"):
        Featurizer(model, model.state_dict(), task=Scaled(), gradients="hooks")


def test_grad_memory_chunks_do_not_change_features(data):
    model = digits.make_mlp(32, seed=1)
    batches = digits.batches(*data, 12)
    full = featurize(model, model.state_dict(), batches, proj_dim=32)
    chunked = featurize(model, model.state_dict(), batches, proj_dim=32, grad_memory=3000 * 4)
    assert _rel(chunked.phi, full.phi) < 1e-6


# ---- factored --------------------------------------------------------------------------------

def _name_seed(seed, name):
    """The seed rule of trak_fast.gradients.factored, re-derived from its documentation."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return model_seed(seed, h & (2**63 - 1))


def _weight_matrix_grads(raw, model, names):
    """Per-example G [n, d_out, d_in] of every weight from raw (vmap) gradients."""
    offsets, column = {}, 0
    params = dict(model.named_parameters())
    for name in names:
        offsets[name] = column
        column += params[name].numel()
    return {name: raw[:, offsets[name]:offsets[name] + params[name].numel()].reshape(
        raw.shape[0], *params[name].shape) for name in names}


@pytest.mark.parametrize("name", ["mlp", "strided-cnn", "gpt2"])
def test_factored_equals_float64_reference(data, name):
    model, batches, task, _ = _cases(data)[name]
    model = model.double()
    if name != "gpt2":
        batches = [(b[0].double(), b[1]) for b in batches]
    sd = model.state_dict()
    k_out, k_in, seed, model_id = 3, 5, 7, 2
    # The matrix layers' reference below (embeddings and norms: tests/test_hf_families.py).
    factored = [b.name for b in Featurizer(model, sd, task=task, projection="factored").layout]
    wrt = [n for n in factored
           if type(dict(model.named_modules())[n.rsplit(".", 1)[0]]).__name__ in ("Conv1D", "Linear", "Conv2d")]
    got = Featurizer(model, sd, task=task, projection="factored", factored_dims=(k_out, k_in),
                     seed=seed, model_id=model_id, grad_wrt=wrt)
    phi = featurize(model, sd, batches, task=task, projection="factored", grad_wrt=wrt,
                    factored_dims=(k_out, k_in), seed=seed, model_id=model_id).phi
    assert phi.dtype == torch.float64 and phi.shape[1] == got.num_features
    names = [block.name for block in got.layout]
    raw = featurize(model, sd, batches, task=task, proj_dim=None, grad_wrt=names,
                    gradients="vmap").phi
    grads = _weight_matrix_grads(raw, model, names)
    modules = dict(model.named_modules())
    checkpoint_seed = model_seed(seed, model_id)
    expected = []
    for pname in names:
        module = modules[pname.rsplit(".", 1)[0]]
        key = pname.rsplit(".", 1)[0] + ".weight"
        g = grads[pname]
        if type(module).__name__ == "Conv1D":
            g = g.transpose(-1, -2) if pname.endswith("weight") else g        # G is [d_out, d_in]
            d_out, d_in = module.weight.shape[1], module.weight.shape[0]
        else:
            d_out = module.weight.shape[0]
            d_in = module.weight[0].numel()
        g = g.reshape(g.shape[0], d_out, d_in) if pname.endswith("weight") else g
        p_out = projection_matrix(d_out, k_out, seed=_name_seed(checkpoint_seed, key + "/out"),
                                  dtype=torch.float64)
        if pname.endswith("weight"):
            p_in = projection_matrix(d_in, k_in, seed=_name_seed(checkpoint_seed, key + "/in"),
                                     dtype=torch.float64)
            expected.append((p_out.T @ g @ p_in).reshape(g.shape[0], -1))
        else:
            expected.append(g @ p_out)
    expected = torch.cat(expected, 1)
    assert phi.shape == expected.shape
    assert _rel(phi, expected) < 1e-10
    # The float32 model gives the same features up to float32 rounding.
    model32, batches32, _, _ = _cases(data)[name]
    phi32 = featurize(model32, model32.state_dict(), batches32, task=task, projection="factored",
                      factored_dims=(k_out, k_in), seed=seed, model_id=model_id, grad_wrt=wrt).phi
    assert _rel(phi32, expected) < 1e-5


def test_factored_preserves_norm_on_average(data):
    """E ||P_out^T G P_in||^2 = ||G||^2: the mean over 200 matrix seeds is within 4 sigma."""
    model = digits.make_mlp(16, seed=0)
    x, y = data
    batches = [(x[:4], y[:4])]
    sd = model.state_dict()
    weights = ["0.weight", "2.weight"]
    raw = featurize(model, sd, batches, proj_dim=None, grad_wrt=weights).phi
    ratios = []
    for seed in range(200):
        phi = featurize(model, sd, batches, projection="factored", factored_dims=(4, 4),
                        grad_wrt=weights, seed=seed).phi
        ratios.append(phi.double().pow(2).sum(1) / raw.double().pow(2).sum(1))
    ratios = torch.stack(ratios)                        # [seeds, examples]
    mean, sem = ratios.mean(0), ratios.std(0) / 200 ** 0.5
    assert ((mean - 1).abs() < 4 * sem).all(), (mean, sem)


def test_factored_matrices_depend_on_the_layer_name_only(data):
    """Adding a layer changes no other layer's block."""
    x, y = data
    small = digits.make_mlp(16, seed=0)
    bigger = nn.Sequential(*small, nn.ReLU(), nn.Linear(10, 10))
    batches = [(x[:6], y[:6])]
    a = featurize(small, small.state_dict(), batches, projection="factored", factored_dims=(2, 3),
                  grad_wrt=["0.weight"]).phi
    f = Featurizer(bigger, bigger.state_dict(), projection="factored", factored_dims=(2, 3))
    assert [b.name for b in f.layout] == ["0.weight", "0.bias", "2.weight", "2.bias",
                                          "4.weight", "4.bias"]
    # The first layer's gradient differs in the bigger model, but its matrices do not: compare
    # against the reference built from the bigger model's own raw gradient.
    raw = featurize(bigger, bigger.state_dict(), batches, proj_dim=None, grad_wrt=["0.weight"]).phi
    p_out = projection_matrix(16, 2, seed=_name_seed(model_seed(0, 0), "0.weight/out"))
    p_in = projection_matrix(64, 3, seed=_name_seed(model_seed(0, 0), "0.weight/in"))
    expected = (p_out.T @ raw.reshape(6, 16, 64) @ p_in).reshape(6, -1)
    got = featurize(bigger, bigger.state_dict(), batches, projection="factored",
                    factored_dims=(2, 3), grad_wrt=["0.weight"]).phi
    assert _rel(got, expected) < 1e-5 and a.shape == got.shape


def test_factored_parameter_selection_and_errors(data, caplog):
    model = tiny_gpt2()
    sd = model.state_dict()
    with caplog.at_level("WARNING", logger="trak_fast"):
        f = Featurizer(model, sd, task=NextTokenMargin(), projection="factored",
                       factored_dims=(2, 2), seed=11)
    # Every parameter has a factored block: embeddings (tied lm_head included), norms, Conv1D.
    assert [b.name for b in f.layout] == [n for n, _ in model.named_parameters()]
    widths = {b.name: b.stop - b.start for b in f.layout}
    assert widths["transformer.wte.weight"] == widths["transformer.h.0.attn.c_attn.weight"] == 4
    assert widths["transformer.h.0.ln_1.weight"] == widths["transformer.h.0.ln_1.bias"] == 2
    assert f.num_features == f.layout[-1].stop == sum(widths.values())
    assert not caplog.records                     # nothing left out, nothing to warn about

    gated = nn.Sequential(nn.Linear(64, 10), Gate())
    with pytest.raises(ValueError, match=r"no factored form for \['1.scale'\]"):
        Featurizer(gated, gated.state_dict(), projection="factored", grad_wrt=["1.scale", "0.weight"])
    with pytest.raises(ValueError, match="needs the hook path"):
        Featurizer(model, sd, task=NextTokenMargin(), projection="factored", gradients="vmap")
    with pytest.raises(ValueError, match="factored_dims must be a pair"):
        Featurizer(model, sd, task=NextTokenMargin(), projection="factored", factored_dims=(0, 4))
    with pytest.raises(ValueError, match="factored_dims is only used with projection='factored'"):
        Featurizer(model, sd, task=NextTokenMargin(), factored_dims=(4, 4))
    with pytest.raises(ValueError, match="projection must be one of"):
        Featurizer(model, sd, task=NextTokenMargin(), projection="sketch")
    with pytest.raises(ValueError, match="gradients must be one of"):
        Featurizer(model, sd, task=NextTokenMargin(), gradients="fast")


def test_factored_attribute_and_trak_ensemble_refused(data):
    x, y = data
    model = digits.make_mlp(16)
    with pytest.raises(ValueError, match="ensemble='trak'.*projection='factored'"):
        attribute(model, [model.state_dict()], digits.batches(x, y), digits.batches(x[:3], y[:3]),
                  projection="factored", ensemble="trak", progress=False)


# ---- hook hygiene ----------------------------------------------------------------------------

class Exploding(Task):
    name = "exploding"

    def output(self, model, example):
        raise AssertionError("unused")

    def outputs(self, model, batch):
        model(batch[0])
        raise RuntimeError("boom in the task")

    def out_to_loss(self, model, batch):
        return torch.ones(len(batch[0]))


@pytest.mark.parametrize("projection", ["dense", "factored"])
def test_hooks_removed_after_an_exception(data, projection):
    model = digits.make_mlp(8)
    model.train()
    with pytest.raises(RuntimeError, match="boom in the task"):
        featurize(model, model.state_dict(), digits.batches(*data, 12), task=Exploding(),
                  proj_dim=8, projection=projection, gradients="hooks")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_hooks_with_kwargs
        assert not module._backward_hooks and module.training
    # The same module still featurizes correctly afterwards.
    after = featurize(model, model.state_dict(), digits.batches(*data, 12), proj_dim=None)
    reference = featurize(model, model.state_dict(), digits.batches(*data, 12), proj_dim=None,
                          gradients="vmap")
    assert _rel(after.phi, reference.phi) < 1e-6


def test_store_refuses_other_projection_or_factored_dims(data, tmp_path):
    model = digits.make_mlp(8)
    TRAK(tmp_path, model, train_size=N, projection="factored", factored_dims=(4, 2), progress=False)
    settings = json.loads((tmp_path / "metadata.json").read_text())["settings"]
    assert settings["projection"] == "factored" and settings["factored_dims"] == [4, 2]
    assert settings["num_features"] == 4 * 2 + 4 + 4 * 2 + 4
    with pytest.raises(StoreMismatchError, match="factored_dims"):
        TRAK(tmp_path, model, train_size=N, projection="factored", factored_dims=(4, 4))
    with pytest.raises(StoreMismatchError, match="projection"):
        TRAK(tmp_path, model, train_size=N, proj_dim=16)


def test_trak_store_factored_matches_attribute(data, tmp_path):
    x, y = data
    model = digits.make_mlp(8, seed=0)
    checkpoints = [digits.make_mlp(8, seed=s).state_dict() for s in range(2)]
    train, targets = digits.batches(x, y, 10), digits.batches(x[:5], y[:5])
    kwargs = dict(projection="factored", factored_dims=(4, 4))
    expected = attribute(model, checkpoints, train, targets, progress=False, **kwargs)
    trak = TRAK(tmp_path, model, train_size=N, progress=False, **kwargs)
    for model_id, sd in enumerate(checkpoints):
        trak.featurize(sd, train, model_id=model_id)
    trak.finalize()
    for model_id, sd in enumerate(checkpoints):
        trak.featurize_targets("t", sd, targets, model_id=model_id)
    torch.testing.assert_close(torch.from_numpy(trak.score("t").copy()), expected,
                               rtol=1e-4, atol=1e-6)


class BagOfWords(nn.Module):
    """Embedding (with a padding row) -> LayerNorm -> mean over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.emb = nn.Embedding(40, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)).mean(1))


@pytest.mark.parametrize("proj_dim", [32, None])
def test_embedding_and_layernorm_hooks_equal_vmap(proj_dim):
    torch.manual_seed(7)
    ids = torch.randint(0, 12, (10, 9))        # repeated ids, padding id 0, consecutive runs
    ids[:, -2:] = 0
    batches = [(ids[:6], torch.randint(0, 3, (6,))), (ids[6:], torch.randint(0, 3, (4,)))]
    model = BagOfWords()
    plan = Featurizer(model, model.state_dict(), proj_dim=8).plan
    assert not plan.vmapped                    # every parameter is hooked
    reference = featurize(model, model.state_dict(), batches, proj_dim=proj_dim, gradients="vmap")
    hooked = featurize(model, model.state_dict(), batches, proj_dim=proj_dim, gradients="hooks")
    assert _rel(hooked.phi, reference.phi) < 1e-5


def test_gradient_paths_are_reported(data, caplog):
    """Features and the store say which parameters took which path; INFO logs it once."""
    import logging
    model = tiny_gpt2()
    batches = _text_batches()
    with caplog.at_level(logging.INFO, logger="trak_fast"):
        feats = featurize(model, model.state_dict(), batches, task=NextTokenMargin(), proj_dim=8)
    names = [n for n, _ in model.named_parameters()]
    assert feats.paths == {"hooks": names, "vmap": [], "left_out": []}    # GPT-2: all by hooks
    assert any("per-example gradients: hooks: %d parameters (100.0%%)" % len(names)
               in r.getMessage() for r in caplog.records)

    gated = nn.Sequential(nn.Linear(64, 10), Gate())
    batches = digits.batches(*data[:2])
    assert featurize(gated, gated.state_dict(), batches, proj_dim=8).paths == {
        "hooks": ["0.weight", "0.bias"], "vmap": ["1.scale"], "left_out": []}
    assert featurize(gated, gated.state_dict(), batches, projection="factored").paths == {
        "hooks": ["0.weight", "0.bias"], "vmap": [], "left_out": ["1.scale"]}


def test_vmap_failure_names_the_parameters_and_the_ways_out(data):

    model = nn.Sequential(nn.Linear(64, 10), Gate(branch=True))
    with pytest.raises(RuntimeError, match=r"1 parameters have no hook adapter and take the vmap "
                       r"path \(\['1.scale'\]\).*grad_wrt=") as info:
        featurize(model, model.state_dict(), digits.batches(*data[:2]), proj_dim=8)
    assert "file an issue" not in str(info.value).lower()
    # The way out it names works: the hooked parameters alone.
    featurize(model, model.state_dict(), digits.batches(*data[:2]), proj_dim=8,
              grad_wrt=["0.weight", "0.bias"])


def test_row_slices_of_a_large_weight_give_the_same_features(data):
    """A grad_memory too small for one layer's per-example gradients: the dense hook path slices
    the weight's rows (Linear and GPT-2's Conv1D, and the tied lm_head) instead of the batch,
    and the features equal the unsliced ones."""
    model = tiny_gpt2()
    batches = _text_batches()
    kwargs = dict(task=NextTokenMargin(), proj_dim=16, gradients="hooks")
    full = featurize(model, model.state_dict(), batches, **kwargs).phi
    tight = featurize(model, model.state_dict(), batches, grad_memory=4 * 200, **kwargs).phi
    assert _rel(tight, full) < 1e-5     # float32 sums in another order
    mlp = digits.make_mlp(32, seed=3)
    mlp_batches = digits.batches(*data, 12)
    full = featurize(mlp, mlp.state_dict(), mlp_batches, proj_dim=24).phi
    tight = featurize(mlp, mlp.state_dict(), mlp_batches, proj_dim=24, grad_memory=4 * 100).phi
    assert _rel(tight, full) < 1e-5     # float32 sums in another order
