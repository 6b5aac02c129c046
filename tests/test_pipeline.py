"""Featurizing and ``attribute``: against autograd loops, the projection oracle and the tutorial."""
import copy

import pytest
import torch
from torch import nn

from trak_fast import digits, model_seed, project, projection_matrix
from trak_fast.pipeline.attribute import attribute
from trak_fast.features.loop import featurize, target_features
from trak_fast.scoring.kernel import RegularizedInverse, compute_kernel, kernel_matrix
from trak_fast.scoring.scores import model_scores
from trak_fast.features.tasks import ClassificationTask, RegressionTask, Task

N_TRAIN, N_TARGETS = 120, 6


@pytest.fixture(scope="module")
def data():
    return digits.load_digits(N_TRAIN, N_TARGETS)


@pytest.fixture(scope="module")
def trained(data):
    x, y, _, _ = data
    models = []
    for seed in range(2):
        model = digits.make_mlp(8, seed=seed)
        digits.train(model, x, y, epochs=3, seed=seed)
        models.append(model)
    return models


def _margin_grads_loop(model, x, y):
    """Per-example gradients of the margin, one autograd call per example (no torch.func)."""
    rows = []
    for i in range(len(x)):
        logits = model(x[i:i + 1])[0]
        others = logits.clone()
        others[y[i]] = float("-inf")
        margin = logits[y[i]] - torch.logsumexp(others, 0)
        grads = torch.autograd.grad(margin, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_raw_features_equal_autograd_loop_and_projection_oracle(data, trained):
    x, y, _, _ = data
    model = trained[0]
    batches = digits.batches(x, y, 32)
    raw = featurize(model, model.state_dict(), batches, proj_dim=None)
    expected = _margin_grads_loop(model, x, y)
    torch.testing.assert_close(raw.phi, expected, rtol=1e-4, atol=1e-5)
    p = expected.shape[1]
    for model_id in (0, 1):
        projected = featurize(model, model.state_dict(), batches, proj_dim=48, seed=5,
                              model_id=model_id).phi
        oracle = expected.double() @ projection_matrix(p, 48, seed=model_seed(5, model_id),
                                                       dtype=torch.float64)
        torch.testing.assert_close(projected.double(), oracle, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[torch.arange(len(y)), y]
    torch.testing.assert_close(raw.out_to_loss, 1 - probs)


def test_regression_features_of_linear_model_are_projected_inputs():
    # f(x) = w . x, so grad_w f = x exactly and phi = P^T x; Q = y - f.
    model = nn.Linear(10, 1, bias=False)
    x = torch.randn(25, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randn(25, generator=torch.Generator().manual_seed(1))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    out = featurize(model, model.state_dict(), batches, task="regression", proj_dim=16, seed=3)
    torch.testing.assert_close(out.phi, project(x, 16, seed=model_seed(3, 0)))
    raw = featurize(model, model.state_dict(), batches, task=RegressionTask(), proj_dim=None)
    torch.testing.assert_close(raw.phi, x)
    torch.testing.assert_close(out.out_to_loss, (y - model(x)[:, 0]).detach())


def test_parameter_groups_and_row_slices_give_the_same_features(data, trained):
    x, y, _, _ = data
    model = trained[0]
    batches = digits.batches(x, y, 40)
    whole = featurize(model, model.state_dict(), batches, proj_dim=32).phi
    # 4 bytes x 40 rows x 100 elements: many groups, and layers larger than the budget are
    # run on slices of the batch.
    grouped = featurize(model, model.state_dict(), batches, proj_dim=32, grad_memory=4 * 40 * 100).phi
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)


class _ForbiddenGrad(torch.autograd.Function):
    """Identity whose backward fails: proves a gradient was (not) computed."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the gradient of the frozen parameter was computed")


class _Guarded(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 10)
        self.gain = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return self.body(x) * _ForbiddenGrad.apply(self.gain)


def test_grad_wrt_never_computes_other_gradients(data):
    x, y, _, _ = data
    model = _Guarded()
    batches = digits.batches(x[:20], y[:20], 10)
    with pytest.raises(RuntimeError, match="frozen parameter was computed"):
        featurize(model, model.state_dict(), batches, proj_dim=8)
    out = featurize(model, model.state_dict(), batches, proj_dim=None, grad_wrt=["body.weight", "body.bias"])
    assert out.phi.shape == (20, 64 * 10 + 10)
    # The same gradients as an autograd loop over the two Linear parameters.
    params = [model.body.weight, model.body.bias]
    rows = []
    for i in range(20):
        logits = model(x[i:i + 1])[0]
        others = logits.clone()
        others[y[i]] = float("-inf")
        grads = torch.autograd.grad(logits[y[i]] - torch.logsumexp(others, 0), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(out.phi, torch.stack(rows), rtol=1e-4, atol=1e-6)


def test_attribute_never_touches_the_callers_model(data, trained):
    x, y, xt, yt = data
    model = digits.make_mlp(8, seed=7)
    model.train()
    before = copy.deepcopy(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    attribute(model, [m.state_dict() for m in trained], digits.batches(x, y, 60),
              digits.batches(xt, yt), proj_dim=16, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert [id(p) for p in model.parameters()] == params_before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


class _CrossEntropy(Task):
    """The tutorial's train-side model output: the loss itself (Q = 1)."""

    def output(self, model, example):
        x, label = example
        return nn.functional.cross_entropy(model(x[None]), label[None])

    def out_to_loss(self, model, batch):
        return torch.ones(batch[1].shape[0])


def test_tutorial_formula_reproduced_by_building_blocks(data, trained):
    """The minimal tutorial's cells, run literally for one model, versus the building blocks."""
    x, y, xt, yt = data
    x, y = x[:40], y[:40]
    model = copy.deepcopy(trained[0])
    proj_dim, lam = 64, 1e-2
    model_size = sum(p.numel() for p in model.parameters())
    P = projection_matrix(model_size, proj_dim, seed=model_seed(0, 0))

    loss = nn.CrossEntropyLoss(reduction="none")
    L = loss(model(x), y)
    rows = []
    for l in L:
        phi = torch.autograd.grad(l, model.parameters(), retain_graph=True)
        phi = torch.cat([p.flatten() for p in phi])
        rows.append((P.T @ phi).detach())
    Phi_train = torch.stack(rows)

    def model_output(logits, label):
        bindex = torch.arange(logits.shape[0])
        logits_correct = logits[bindex, label.unsqueeze(0)]
        cloned_logits = logits.clone()
        cloned_logits[bindex, label.unsqueeze(0)] = torch.tensor(-float("inf"))
        return (logits_correct - cloned_logits.logsumexp(dim=-1)).sum()

    target_rows = []
    for i in range(len(xt)):
        O = model_output(model(xt[i:i + 1]), yt[i:i + 1])
        phi = torch.autograd.grad(O, model.parameters())
        target_rows.append((P.T @ torch.cat([p.flatten() for p in phi])).detach())
    Phi_target = torch.stack(target_rows)

    H = torch.zeros(proj_dim, proj_dim)
    for i in range(len(x)):   # the tutorial's Hessian loop with a batch size of 1
        L = nn.CrossEntropyLoss(reduction="sum")(model(x[i:i + 1]), y[i:i + 1])
        phi = torch.autograd.grad(L, model.parameters())
        X = (P.T @ torch.cat([p.flatten() for p in phi]).reshape(-1, 1)).detach()
        H += X @ X.T
    H_inv = torch.linalg.inv(H.double() + lam * torch.eye(proj_dim, dtype=torch.float64))
    expected = Phi_train.double() @ H_inv @ Phi_target.double().T

    train_phi = featurize(model, model.state_dict(), digits.batches(x, y, 16), task=_CrossEntropy(),
                          proj_dim=proj_dim).phi
    target_phi = target_features(model, model.state_dict(), digits.batches(xt, yt, 4), proj_dim=proj_dim)
    torch.testing.assert_close(kernel_matrix(train_phi), H.double(), rtol=1e-4, atol=1e-6)
    got = model_scores(train_phi, target_phi, compute_kernel(train_phi, form="primal"),
                       lambda_reg=lam, relative_lambda=False)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-4
    inverse = RegularizedInverse(kernel_matrix(train_phi), lam)
    torch.testing.assert_close(inverse.matrix(), H_inv, rtol=1e-3, atol=1e-3)


class _DictTask(ClassificationTask):
    """A custom task over dict batches {"pixels": ..., "label": ...} (as text models use)."""

    name = "dict-classification"

    def output(self, model, example):
        return super().output(model, (example["pixels"], example["label"]))

    def out_to_loss(self, model, batch):
        return super().out_to_loss(model, (batch["pixels"], batch["label"]))

    def check_batch(self, batch, where):
        return Task.check_batch(self, batch, where)


def test_custom_task_with_dict_batches(data, trained):
    x, y, _, _ = data
    model = trained[0]
    tuples = digits.batches(x, y, 50)
    dicts = [{"pixels": a, "label": b} for a, b in tuples]
    expected = featurize(model, model.state_dict(), tuples, proj_dim=16)
    got = featurize(model, model.state_dict(), dicts, task=_DictTask(), proj_dim=16)
    torch.testing.assert_close(got.phi, expected.phi)
    torch.testing.assert_close(got.out_to_loss, expected.out_to_loss)


def test_progress_bars_and_quiet(data, trained, capsys):
    x, y, xt, yt = data
    args = (trained[0], [trained[0].state_dict()], digits.batches(x, y, 60), digits.batches(xt, yt))
    attribute(*args, proj_dim=8, progress=False)
    assert capsys.readouterr().err == ""
    attribute(*args, proj_dim=8, progress=True)
    assert "train" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------

def test_labels_out_of_range_raise(data, trained):
    x, y, xt, yt = data
    bad = [(x[:10], torch.full((10,), 10))]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got labels in \[10, 10\]"):
        featurize(trained[0], trained[0].state_dict(), bad, proj_dim=8)
    with pytest.raises(ValueError, match="labels must lie"):
        attribute(trained[0], [trained[0].state_dict()], digits.batches(x, y), [(xt, yt - 1)],
                  proj_dim=8, progress=False)


def test_empty_loader_raises(data, trained):
    with pytest.raises(ValueError, match="train yielded no batches"):
        attribute(trained[0], [trained[0].state_dict()], [], digits.batches(*data[2:]),
                  proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="empty"):
        featurize(trained[0], trained[0].state_dict(), [(data[0][:0], data[1][:0])], proj_dim=8)


def test_generator_loader_exhausted_on_second_checkpoint_raises(data, trained):
    x, y, xt, yt = data
    once = (b for b in digits.batches(x, y, 60))
    with pytest.raises(TypeError, match=r"train is a one-shot iterator \(generator: iter\(train\) is "
                                        r"train\).*once per checkpoint \(2 checkpoints\)"):
        attribute(trained[0], [m.state_dict() for m in trained], once, digits.batches(xt, yt),
                  proj_dim=8, progress=False)


def test_checkpoints_that_do_not_fit_raise(data, trained):
    model = trained[0]
    batches = digits.batches(*data[:2])
    missing = {k: v for k, v in model.state_dict().items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"checkpoint 0 does not fit the model: missing keys \['2.bias'\]"):
        featurize(model, missing, batches, proj_dim=8)
    extra = dict(model.state_dict(), **{"3.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['3.weight'\]"):
        featurize(model, extra, batches, proj_dim=8)
    wider = digits.make_mlp(16).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint 0\['0.weight'\] has shape \(16, 64\).*\(8, 64\)"):
        featurize(model, wider, batches, proj_dim=8)
    with pytest.raises(TypeError, match="list of state_dicts"):
        attribute(model, model.state_dict(), batches, batches, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="at least one state_dict"):
        attribute(model, [], batches, batches, proj_dim=8, progress=False)


def test_inconsistent_target_shapes_raise(data, trained):
    x, y, xt, yt = data
    model = trained[0]
    ragged = [(xt[:3], yt[:3]), (xt[3:, :32], yt[3:])]
    with pytest.raises(ValueError, match=r"targets batch 1: per-example shapes \[\(32,\), \(\)\] differ"):
        attribute(model, [model.state_dict()], digits.batches(x, y), ragged, proj_dim=8, progress=False)
    uneven = [(xt[:4], yt[:3])]
    with pytest.raises(ValueError, match=r"targets batch 0: every tensor must have the same batch size"):
        attribute(model, [model.state_dict()], digits.batches(x, y), uneven, proj_dim=8, progress=False)


def test_bad_arguments_raise(data, trained):
    model = trained[0]
    batches = digits.batches(*data[:2])
    with pytest.raises(ValueError, match="grad_wrt names parameters the model does not have"):
        featurize(model, model.state_dict(), batches, grad_wrt=["nope"])
    with pytest.raises(ValueError, match=r"proj_dim must be an int in \[1, 2\*\*31\) or None"):
        featurize(model, model.state_dict(), batches, proj_dim=0)
    with pytest.raises(ValueError, match="task must be"):
        featurize(model, model.state_dict(), batches, task="ranking")
    with pytest.raises(ValueError, match="kind must be one of"):
        featurize(model, model.state_dict(), batches, kind="dense")
    with pytest.raises(TypeError, match=r"expects \(inputs, labels\) batches"):
        featurize(model, model.state_dict(), [data[0][:5]], proj_dim=8)


# ---- models with buffers and randomness ------------------------------------------------------

def _bn_dropout_mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(16, 10)).double()


def test_batchnorm_and_dropout_use_checkpoint_buffers_in_eval_mode(data):
    x, y, _, _ = data
    x = x[:40].double()
    y = y[:40]
    source = _bn_dropout_mlp()
    torch.manual_seed(0)
    source.train()
    with torch.no_grad():
        for _ in range(5):          # training-mode passes give non-trivial running statistics
            source(x * 3 + 1)
    checkpoint = copy.deepcopy(source.state_dict())
    assert checkpoint["1.running_mean"].abs().min() > 0.01

    model = _bn_dropout_mlp()       # other weights and fresh buffers: the checkpoint must win
    model.train()
    model[3].eval()                 # a mixed flag, to check that each module's own is restored
    own_state = copy.deepcopy(model.state_dict())
    out = featurize(model, checkpoint, digits.batches(x, y, 16), proj_dim=None)

    assert model.training and model[1].training and not model[3].training
    for name, tensor in model.state_dict().items():      # running stats were not updated
        assert torch.equal(tensor, own_state[name]), name
    source.eval()                   # the reference: an eval-mode autograd loop
    expected = _margin_grads_loop(source, x, y)
    assert out.phi.dtype == torch.float64
    torch.testing.assert_close(out.phi, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        probs = torch.softmax(source(x), 1)[torch.arange(len(y)), y]
    torch.testing.assert_close(out.out_to_loss, (1 - probs).float())


# ---- all-zero features -----------------------------------------------------------------------

class _Unused(nn.Module):
    def __init__(self, detach=False):
        super().__init__()
        self.body = nn.Linear(64, 10)
        self.unused = nn.Parameter(torch.ones(3))
        self.detach = detach

    def forward(self, x):
        out = self.body(x)
        return out.detach() if self.detach else out


@pytest.mark.parametrize("detach, grad_wrt", [(False, ["unused"]), (True, None)])
def test_all_zero_features_raise_instead_of_zero_scores(data, detach, grad_wrt):
    x, y, xt, yt = data
    model = _Unused(detach)
    args = (model, [model.state_dict()], digits.batches(x, y, 60), digits.batches(xt, yt))
    assert not featurize(model, model.state_dict(), args[2], proj_dim=8, grad_wrt=grad_wrt).phi.any()
    for ensemble in ("mean", "trak"):
        with pytest.raises(ValueError, match=r"checkpoint 0: every train feature is zero: the task "
                                             r"output does not depend on the differentiated "
                                             r"parameters \(check grad_wrt, and that forward does "
                                             r"not detach\)"):
            attribute(*args, proj_dim=8, grad_wrt=grad_wrt, ensemble=ensemble, progress=False)
    if not detach:   # the parameters the output does depend on still give scores
        assert attribute(*args, proj_dim=8, grad_wrt=["body.weight"], progress=False).abs().sum() > 0
