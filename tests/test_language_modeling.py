"""LanguageModelingTask: f = sum of token margins, Q = mean of (1 - p_t), against a float64 loop.

The reference below walks every (sequence, position) pair in Python and uses
``m = log p - log(1 - p)`` (the task computes ``logit_y - logsumexp(others)``), so the two share
no code. Models are tiny GPT-2s built from a ``GPT2Config`` (nothing is downloaded) and a
plain bigram module that returns a logits tensor.
"""
import ast
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import trak_fast
from trak_fast import ClassificationTask, LanguageModelingTask
from trak_fast.features.tasks import get_task

VOCAB = 13


def gpt2(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config).to(dtype).eval()


class Bigram(torch.nn.Module):
    """Logits at t from token t alone: returns a plain ``[B, T, V]`` tensor."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 8, dtype=dtype)
        self.out = torch.nn.Linear(8, VOCAB, dtype=dtype)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.embed(input_ids)))


def reference(model, input_ids, attention_mask=None, labels=None):
    """``(f [B], Q [B])`` by a Python loop over positions, in the model's dtype (float64 here).

    A GPT-2 given a mask gets position ids that count each row's real tokens from 0 (the
    task's documented call), so left padding does not shift them."""
    if attention_mask is None:
        out = model(input_ids)
    elif isinstance(model, GPT2LMHeadModel):
        positions = torch.zeros_like(input_ids)
        for b in range(input_ids.shape[0]):
            seen = 0
            for t in range(input_ids.shape[1]):
                positions[b, t] = max(seen - 1, 0) if not attention_mask[b, t] else seen
                seen += int(attention_mask[b, t])
        out = model(input_ids, attention_mask=attention_mask, position_ids=positions)
    else:
        out = model(input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    labels = input_ids if labels is None else labels
    fs, qs = [], []
    for b in range(input_ids.shape[0]):
        f, weights = 0.0, []
        for t in range(input_ids.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100 or (attention_mask is not None and not (attention_mask[b, t] and attention_mask[b, t + 1])):
                continue
            log_p = torch.log_softmax(logits[b, t], dim=-1)[y]
            f = f + log_p - torch.log1p(-log_p.exp())
            weights.append(1 - log_p.exp())
        fs.append(f)
        qs.append(torch.stack(weights).mean())
    return torch.stack(fs), torch.stack(qs).detach()


def padded_batch(seqs, extra=0, pad_token=5, side="right"):
    """Padded ``{"input_ids", "attention_mask"}`` with ``extra`` more pad columns."""
    length = max(len(s) for s in seqs) + extra
    ids = torch.full((len(seqs), length), pad_token, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[row, where] = torch.as_tensor(s)
        mask[row, where] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sequences(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@pytest.fixture(params=["right", "left"])
def batch(request):
    """Padded on either side (left: the reference then also skips the first real token)."""
    b = padded_batch(sequences([9, 5, 7, 2]), side=request.param)
    labels = b["input_ids"].clone()
    labels[0, 3] = labels[0, 6] = -100          # ignored positions inside a sequence
    labels[2, 3:5] = -100
    b["labels"] = labels
    return b


@pytest.mark.parametrize("make_model", [gpt2, Bigram], ids=["gpt2", "plain-logits"])
def test_outputs_and_q_match_float64_loop(make_model, batch):
    model = make_model()
    task = LanguageModelingTask()
    f_ref, q_ref = reference(model, **batch)
    f, q = task.outputs_and_out_to_loss(model, batch)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.double(), q_ref, rtol=1e-6, atol=1e-7)   # Q is float32
    torch.testing.assert_close(task.outputs(model, batch), f_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(task.out_to_loss(model, batch).double(), q_ref, rtol=1e-6, atol=1e-7)
    assert f.requires_grad and not task.out_to_loss(model, batch).requires_grad
    assert not q.requires_grad


@pytest.mark.parametrize("make_model", [gpt2, Bigram], ids=["gpt2", "plain-logits"])
def test_batched_outputs_equal_per_example_output_under_vmap(make_model, batch):
    model = make_model()
    task = LanguageModelingTask()
    per_example = torch.func.vmap(lambda ex: task.output(model, ex), randomness="error")(batch)
    torch.testing.assert_close(task.outputs(model, batch), per_example, rtol=1e-10, atol=1e-10)
    # and without vmap, one example at a time
    for b in range(batch["input_ids"].shape[0]):
        one = task.output(model, {k: v[b] for k, v in batch.items()})
        torch.testing.assert_close(one, per_example[b], rtol=1e-10, atol=1e-10)


def test_example_outputs_depend_on_that_example_only(batch):
    model, task = gpt2(), LanguageModelingTask()
    f = task.outputs(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1] = (changed["input_ids"][1] + 3) % VOCAB
    changed["labels"][1] = changed["input_ids"][1]
    g = task.outputs(model, changed)
    torch.testing.assert_close(g[[0, 2, 3]], f[[0, 2, 3]], rtol=0, atol=0)
    assert not torch.allclose(g[1], f[1])


def test_one_predicted_token_is_the_classification_margin_and_one_minus_p():
    model = gpt2()
    seqs = sequences([6, 6, 6, 6], seed=3)
    ids = torch.stack(seqs)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]                  # only the last token is predicted
    lm_batch = {"input_ids": ids, "labels": labels}
    # The classification view: the prefix's last-position logits, the last token as label.

    class LastPosition(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, prefix):
            return self.lm(prefix).logits[:, -1]

    classifier = LastPosition(model)
    cls_batch = (ids[:, :-1], ids[:, -1])
    lm, cls = LanguageModelingTask(), ClassificationTask()
    torch.testing.assert_close(lm.outputs(model, lm_batch), cls.outputs(classifier, cls_batch),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm.out_to_loss(model, lm_batch), cls.out_to_loss(classifier, cls_batch),
                               rtol=1e-6, atol=1e-7)
    # Features too: the wrapper has the same parameters in the same order.
    phi_lm = trak_fast.featurize(model, model.state_dict(), [lm_batch], task="language_modeling",
                                 proj_dim=64)
    phi_cls = trak_fast.featurize(classifier, classifier.state_dict(), [cls_batch],
                                  task="classification", proj_dim=64)
    torch.testing.assert_close(phi_lm.phi, phi_cls.phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(phi_lm.out_to_loss, phi_cls.out_to_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make_model", [gpt2, Bigram], ids=["gpt2", "plain-logits"])
def test_raw_features_are_the_float64_gradient_of_f(make_model, batch):
    model = make_model()
    params = [p for _, p in model.named_parameters()]
    feats = trak_fast.featurize(model, model.state_dict(), [batch], task="language_modeling",
                                proj_dim=None)
    for b in range(batch["input_ids"].shape[0]):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        f, q = reference(model, **one)
        grad = torch.autograd.grad(f[0], params, allow_unused=True)
        expected = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grad, params)])
        torch.testing.assert_close(feats.phi[b], expected, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(feats.out_to_loss[b].double(), q[0], rtol=1e-6, atol=1e-7)


def test_padding_and_ignored_labels_change_nothing():
    """Padding a sequence (any pad token, any amount) leaves its f, Q and features unchanged."""
    model, task = gpt2(), LanguageModelingTask()
    seqs = sequences([8, 4, 6], seed=4)
    tight = padded_batch(seqs)
    loose = padded_batch(seqs, extra=5, pad_token=11)
    for b in (tight, loose):
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)  # pad labels: not -100
    f1, q1 = task.outputs_and_out_to_loss(model, tight)
    f2, q2 = task.outputs_and_out_to_loss(model, loose)
    torch.testing.assert_close(f2, f1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q2, q1, rtol=1e-6, atol=0)
    alone = [task.outputs(model, {"input_ids": s[None]})[0] for s in seqs]
    torch.testing.assert_close(f1, torch.stack(alone), rtol=1e-12, atol=1e-12)

    # Features, with batches of different lengths in one loader (fixed_shapes = False).
    kwargs = dict(task="language_modeling", proj_dim=32)
    padded = trak_fast.featurize(model, model.state_dict(), [tight, loose], **kwargs)
    single = trak_fast.featurize(model, model.state_dict(), [{"input_ids": s[None]} for s in seqs], **kwargs)
    torch.testing.assert_close(padded.phi, torch.cat([single.phi, single.phi]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.out_to_loss, torch.cat([single.out_to_loss] * 2), rtol=1e-6, atol=0)

    # -100 at a position removes exactly that token's term: the same as cutting the sequence
    # there when it is the last one.
    s = seqs[0]
    labels = s.clone()
    labels[-2:] = -100
    cut = task.outputs_and_out_to_loss(model, {"input_ids": s[None], "labels": labels[None]})
    short = task.outputs_and_out_to_loss(model, {"input_ids": s[None, :-2]})
    torch.testing.assert_close(cut[0], short[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cut[1], short[1], rtol=1e-6, atol=0)


def test_built_in_name_and_flags():
    task = get_task("language_modeling")
    assert isinstance(task, LanguageModelingTask)
    assert task.name == "language_modeling" and task.fixed_shapes is False
    assert task.has_batched_outputs


def test_bool_and_int32_inputs_work(batch):
    model, task = Bigram(), LanguageModelingTask()
    f_ref, _ = reference(model, **batch)
    small = {"input_ids": batch["input_ids"].int(), "attention_mask": batch["attention_mask"].bool(),
             "labels": batch["labels"].int()}
    assert task.check_batch(small, "batch") == 4
    torch.testing.assert_close(task.outputs(model, small), f_ref, rtol=1e-6, atol=1e-6)


def test_trak_fast_never_imports_transformers():
    """No module of the package imports it (a static check; a fresh interpreter costs seconds).

    The command line (``trak_fast/cli``) loads Hugging Face model directories, so it imports
    transformers, but only inside the functions that load one, never when a module is imported.
    """
    package = Path(trak_fast.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        in_cli = path.parent.name == "cli"
        nodes = tree.body if in_cli else ast.walk(tree)   # cli: module-level statements only
        for node in nodes:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "transformers"]
    assert offenders == []


def _ids(*shape):
    return torch.randint(0, VOCAB, shape)


@pytest.mark.parametrize("batch, error, match", [
    ((_ids(2, 5), _ids(2)), TypeError, "expects dict batches"),
    ({"labels": _ids(2, 5)}, ValueError, "needs 'input_ids'"),
    ({"input_ids": _ids(2, 5), "token_type_ids": _ids(2, 5)}, ValueError, "unexpected keys"),
    ({"input_ids": _ids(2, 5).float()}, TypeError, "'input_ids' must be an integer tensor"),
    ({"input_ids": _ids(10)}, ValueError, r"'input_ids' must be \[B, T\]"),
    ({"input_ids": _ids(2, 1)}, ValueError, "T >= 2"),
    ({"input_ids": _ids(2, 5), "attention_mask": torch.ones(2, 4, dtype=torch.long)}, ValueError,
     "'attention_mask' must have the shape of 'input_ids'"),
    ({"input_ids": _ids(2, 5), "attention_mask": torch.ones(2, 5)}, TypeError,
     "'attention_mask' must be an integer tensor"),
    ({"input_ids": _ids(2, 5), "attention_mask": torch.full((2, 5), 2)}, ValueError, "only 0 and 1"),
    ({"input_ids": _ids(2, 5), "labels": _ids(2, 6)}, ValueError, "'labels' must have the shape"),
    ({"input_ids": _ids(2, 5), "labels": _ids(2, 5).float()}, TypeError, "'labels' must be an integer"),
    ({"input_ids": _ids(2, 5), "labels": torch.tensor([[-100, 1, 2, 3, 4], [0, 1, -3, 3, 4]])}, ValueError,
     "must be -100 .* got -3"),
    ({"input_ids": _ids(2, 5), "labels": None}, TypeError, "'labels' must be an integer tensor, got NoneType"),
    ({"input_ids": _ids(3, 5), "labels": torch.cat([_ids(2, 5), torch.full((1, 5), -100)])}, ValueError,
     r"sequences \[2\] predict no token"),
    ({"input_ids": _ids(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])},
     ValueError, r"sequences \[1\] predict no token"),
])
def test_bad_batches_are_refused_with_a_clear_message(batch, error, match):
    model = Bigram()
    with pytest.raises(error, match=match):
        trak_fast.featurize(model, model.state_dict(), [batch], task="language_modeling", proj_dim=8)


class WrongOutput(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lm = Bigram()

    def forward(self, input_ids):
        logits = self.lm(input_ids)
        return logits[:, -1] if self.kind == "2d" else (logits,)


@pytest.mark.parametrize("kind, error, match", [
    ("2d", ValueError, r"logits \[B, T, V\]"),
    ("tuple", TypeError, "an object with .logits, got tuple"),
])
def test_model_outputs_that_are_not_logits_are_refused(kind, error, match):
    model = WrongOutput(kind)
    with pytest.raises(error, match=match):
        trak_fast.featurize(model, model.state_dict(), [{"input_ids": _ids(2, 5)}],
                            task="language_modeling", proj_dim=8)


def test_labels_outside_the_vocabulary_are_refused():
    model = Bigram()
    labels = _ids(2, 5)
    labels[1, 2] = VOCAB
    with pytest.raises(ValueError, match=rf"train batch 0: labels must be -100 or lie in \[0, {VOCAB}\)"):
        trak_fast.featurize(model, model.state_dict(), [{"input_ids": _ids(2, 5), "labels": labels}],
                            task="language_modeling", proj_dim=8)


@pytest.mark.parametrize("projection", ["dense", "factored"])
def test_hook_path_matches_vmap_and_ignores_padding(projection, batch):
    """The hook path (batched ``outputs``) gives the vmap path's features; more padding changes nothing."""
    model = gpt2()
    kwargs = dict(task="language_modeling", proj_dim=48, projection=projection)
    if projection == "factored":
        kwargs["factored_dims"] = (4, 4)
    hooks = trak_fast.featurize(model, model.state_dict(), [batch], gradients="hooks", **kwargs)
    if projection == "dense":               # factored exists on the hook path only
        vmap = trak_fast.featurize(model, model.state_dict(), [batch], gradients="vmap", **kwargs)
        torch.testing.assert_close(hooks.phi, vmap.phi, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hooks.out_to_loss, vmap.out_to_loss, rtol=1e-6, atol=0)
    # Three more pad columns on the right (another pad token, labels not -100): the real tokens
    # keep their positions, so nothing may change.
    wider = {k: torch.cat([v, torch.full((v.shape[0], 3), 0 if k == "attention_mask" else 9)], 1)
             for k, v in batch.items()}
    padded = trak_fast.featurize(model, model.state_dict(), [wider], gradients="hooks", **kwargs)
    torch.testing.assert_close(padded.phi, hooks.phi, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.out_to_loss, hooks.out_to_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_margin_equals_the_whole_vocabulary_form(dtype, monkeypatch):
    """FusedMargin (row blocks) against the masked-logsumexp formula, values and gradients; the
    block size is forced small so several blocks run."""
    from trak_fast.features.tasks.language_modeling import FusedMargin
    monkeypatch.setattr(FusedMargin, "BLOCK_ELEMENTS", 3 * 37)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(11, 37, generator=g, dtype=torch.float64)).to(dtype)
    logits[3, 5] = 40.0                      # a label with p close to 1
    target = torch.randint(0, 37, (11,), generator=g)
    target[3] = 5
    leaf = logits.clone().requires_grad_(True)
    margin, p = FusedMargin.apply(leaf, target)
    ref_leaf = logits.clone().requires_grad_(True)
    is_label = torch.arange(37) == target[:, None]
    correct = ref_leaf.gather(1, target[:, None])[:, 0]
    ref = correct - torch.logsumexp(ref_leaf.masked_fill(is_label, float("-inf")), dim=1)
    ref_p = torch.softmax(logits.double(), 1).gather(1, target[:, None])[:, 0]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margin, ref, **tol)
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-5, atol=1e-6)   # p is float32, as Q
    weights = torch.randn(11, generator=g, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad((margin * weights).sum(), leaf)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_leaf)
    torch.testing.assert_close(grad, ref_grad, **tol)
    if dtype == torch.float64:
        torch.autograd.gradcheck(lambda x: FusedMargin.apply(x, target)[0],
                                 (logits.clone().requires_grad_(True),))
