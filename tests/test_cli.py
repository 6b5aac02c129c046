"""``python -m trak_fast build`` / ``score`` against the Python API, and ``top_k`` against torch.topk.

Models are a tiny GPT-2 and a tiny BERT (``BertLMHeadModel``, ``is_decoder=True``) built from
configs and saved with ``save_pretrained``, each with a tokenizer trained here with the
``tokenizers`` package (nothing is downloaded). Data files are written by the tests. The
reference is :class:`trak_fast.TRAK` fed batches tokenized here, following the documented
convention (prompt tokens with special tokens, completion tokens without, labels -100 on the
prompt and on padding, right padding to the batch's longest).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import trak_fast
from trak_fast import cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_TRAIN, N_QUERIES, BATCH, PROJ_DIM = 24, 4, 4, 48
WORDS = "the cat dog sat ran on a mat rug and ate fish meat slowly quickly today".split()


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(rng.choice(WORDS, 3)), "completion": " " + " ".join(rng.choice(WORDS, 2 + i % 3))}
            for i in range(n)]


TRAIN, QUERIES = _rows(N_TRAIN, 0), _rows(N_QUERIES, 1)


def _tokenizer(kind, path):
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    texts = [r["prompt"] + r["completion"] for r in TRAIN + QUERIES]
    if kind == "gpt2":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=120, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    else:
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(
            vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]")
        fast._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast.save_pretrained(path)
    return fast


def _model(kind, vocab, seed):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2,
                                         n_head=2, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, is_decoder=True)
    return transformers.BertLMHeadModel(config)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model directories (GPT-2 with a second checkpoint, BERT, a GPT-2 without tokenizer) and
    data files."""
    root = tmp_path_factory.mktemp("cli")
    out = {"root": root}
    for kind in ("gpt2", "bert"):
        tok = _tokenizer(kind, root / kind)
        _model(kind, len(tok), 0).save_pretrained(root / kind)
        out[kind] = str(root / kind)
    _model("gpt2", len(transformers.AutoTokenizer.from_pretrained(root / "gpt2")), 1) \
        .save_pretrained(root / "gpt2_b")
    out["gpt2_b"] = str(root / "gpt2_b")
    for name, rows in (("train", TRAIN), ("queries", QUERIES)):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        out[name] = str(root / f"{name}.jsonl")
    with open(root / "train.csv", "w") as handle:      # a text column, with a quoted comma
        handle.write("id,text\n" + "".join(f'{i},"{r["prompt"]},{r["completion"]}"\n'
                                           for i, r in enumerate(TRAIN)))
    out["csv"] = str(root / "train.csv")
    (root / "empty.jsonl").write_text("")
    out["empty"] = str(root / "empty.jsonl")
    return out


def run(*args):
    """The command in this process; its exit code."""
    return cli.main([str(a) for a in args])


def reference_batches(tokenizer_dir, rows, max_length=32):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = []
    for b in range(0, len(rows), BATCH):
        enc = []
        for r in rows[b:b + BATCH]:
            if "text" in r:
                ids = tok(r["text"])["input_ids"][:max_length]
                labels = list(ids)
            else:
                p, c = tok(r["prompt"])["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"]
                ids, labels = (p + c)[:max_length], ([-100] * len(p) + c)[:max_length]
            enc.append((ids, labels))
        width = max(len(i) for i, _ in enc)
        batches.append({
            "input_ids": torch.tensor([i + [pad] * (width - len(i)) for i, _ in enc]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in enc]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in enc])})
    return batches


def reference_scores(store, model_dirs, train, queries, tokenizer_dir, states=None, **settings):
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")  # noqa: E731
    model = load(model_dirs[0])
    trak = trak_fast.TRAK(store, model, train_size=len(train), task="language_modeling",
                          proj_dim=PROJ_DIM, progress=False, **settings)
    states = states or [None] * len(model_dirs)
    for m, d in enumerate(model_dirs):
        trak.featurize(load(d).state_dict(), reference_batches(tokenizer_dir, train), model_id=m,
                       optimizer_state=states[m])
    trak.finalize()
    for m, d in enumerate(model_dirs):
        trak.featurize_targets("q", load(d).state_dict(), reference_batches(tokenizer_dir, queries),
                               model_id=m, optimizer_state=states[m])
    return np.array(trak.score("q"))


@pytest.fixture(scope="module")
def gpt2_run(files, tmp_path_factory):
    """build (two checkpoints) and score --top-k 3 on the jsonl prompt/completion files."""
    store = tmp_path_factory.mktemp("gpt2") / "store"
    assert run("build", store, "--model", files["gpt2"], "--checkpoint", files["gpt2"], files["gpt2_b"],
               "--data", files["train"], "--proj-dim", PROJ_DIM, "--batch-size", BATCH,
               "--no-progress") == 0
    assert run("score", store, "--data", files["queries"], "--top-k", 3, "--no-progress") == 0
    return store


def test_build_then_score_equals_trak_in_python(files, gpt2_run, tmp_path):
    assert trak_fast.__file__.startswith(ROOT)
    got = np.load(gpt2_run / "experiment_queries" / "scores.npy")
    want = reference_scores(tmp_path / "ref", [files["gpt2"], files["gpt2_b"]], TRAIN, QUERIES,
                            files["gpt2"])
    assert got.shape == (N_TRAIN, N_QUERIES) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


def test_optimizer_state_flag_equals_trak_in_python(files, gpt2_run, capsys, tmp_path):
    """build --optimizer-state (a file per checkpoint) gives TRAK.featurize(optimizer_state=)'s
    scores, other than the plain store's; a wrong count is refused, naming the flag."""
    paths, states = [], []
    for i, d in enumerate([files["gpt2"], files["gpt2_b"]]):
        model = transformers.AutoModelForCausalLM.from_pretrained(d)
        torch.manual_seed(i)
        states.append({n: 0.5 + torch.rand_like(p) for n, p in model.named_parameters()})
        paths.append(tmp_path / f"v{i}.pt")
        torch.save(states[-1], paths[-1])
    store = tmp_path / "store"
    args = ["build", store, "--model", files["gpt2"], "--checkpoint", files["gpt2"], files["gpt2_b"],
            "--data", files["train"], "--proj-dim", PROJ_DIM, "--batch-size", BATCH, "--no-progress"]
    code, err = _error(capsys, *args, "--optimizer-state", paths[0])
    assert code != 0 and "--optimizer-state needs one file per checkpoint: 1 for 2" in err
    # The second file lacks a parameter: refused at the start, before checkpoint 0 is featurized.
    bad = tmp_path / "bad.pt"
    torch.save({n: v for n, v in states[1].items() if n != "transformer.wpe.weight"}, bad)
    code, err = _error(capsys, *args, "--optimizer-state", paths[0], bad)
    assert code != 0 and f"--optimizer-state {str(bad)!r} has no second moment for" in err
    assert "transformer.wpe.weight" in err and not list(store.glob("**/*.npy"))
    assert run(*args, "--optimizer-state", *paths) == 0
    assert run("score", store, "--data", files["queries"], "--no-progress") == 0
    got = np.load(store / "experiment_queries" / "scores.npy")
    want = reference_scores(tmp_path / "ref", [files["gpt2"], files["gpt2_b"]], TRAIN, QUERIES,
                            files["gpt2"], states=states)
    np.testing.assert_array_equal(got, want)
    plain = np.load(gpt2_run / "experiment_queries" / "scores.npy")
    assert not np.allclose(got, plain, rtol=1e-3)


def test_top_k_jsonl_equals_torch_topk_of_the_scores(gpt2_run):
    scores = torch.from_numpy(np.load(gpt2_run / "experiment_queries" / "scores.npy"))
    lines = [json.loads(x) for x in open(gpt2_run / "experiment_queries" / "top_3.jsonl")]
    assert [x["query"] for x in lines] == list(range(N_QUERIES))
    for j, line in enumerate(lines):
        assert (line["prompt"], line["completion"]) == (QUERIES[j]["prompt"], QUERIES[j]["completion"])
        for side, largest in (("proponents", True), ("opponents", False)):
            values, indices = torch.topk(scores[:, j], 3, largest=largest)
            assert [e["index"] for e in line[side]] == indices.tolist()
            assert [e["score"] for e in line[side]] == values.tolist()
            assert [e["prompt"] + e["completion"] for e in line[side]] == \
                [TRAIN[i]["prompt"] + TRAIN[i]["completion"] for i in indices.tolist()]


@pytest.mark.parametrize("n, t, k, block_rows", [(1000, 37, 7, 64), (50, 3, 50, 7), (9, 2, 1, 1)])
def test_top_k_function_equals_torch_topk(n, t, k, block_rows):
    scores = torch.randn(n, t, generator=torch.Generator().manual_seed(n))
    best = trak_fast.top_k(scores.numpy(), k, block_rows=block_rows)
    for largest, idx, val in ((True, best.proponents, best.proponent_scores),
                              (False, best.opponents, best.opponent_scores)):
        values, indices = torch.topk(scores, k, dim=0, largest=largest)
        assert torch.equal(idx, indices.T) and torch.equal(val, values.T)


def test_top_k_ties_by_index_and_bad_input():
    best = trak_fast.top_k(np.zeros((6, 2), np.float32), 3, block_rows=2)
    for indices in (best.proponents, best.opponents):   # which tied rows: unspecified; listed in order
        assert all(row == sorted(set(row)) and len(row) == 3 for row in indices.tolist())
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 6\]"):
        trak_fast.top_k(np.zeros((6, 2)), 7)
    bad = np.zeros((6, 2), np.float32)
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"scores\[4, 1\] is nan"):
        trak_fast.top_k(bad, 2, block_rows=4)


def test_bert_csv_text_column_and_toml_config(files, tmp_path):
    config = tmp_path / "build.toml"
    config.write_text(f'model = "{files["bert"]}"\ndata = "{files["csv"]}"\n'
                      f'proj_dim = {PROJ_DIM}\nbatch_size = {BATCH}\nprogress = false\n')
    assert run("build", tmp_path / "store", "--config", config) == 0
    assert run("score", tmp_path / "store", "--data", files["csv"], "--no-progress") == 0
    got = np.load(tmp_path / "store" / "experiment_queries" / "scores.npy")
    text = [{"text": f"{r['prompt']},{r['completion']}"} for r in TRAIN]
    want = reference_scores(tmp_path / "ref", [files["bert"]], text, text, files["bert"])
    np.testing.assert_array_equal(got, want)
    settings = json.load(open(tmp_path / "store" / "metadata.json"))["settings"]
    assert settings["proj_dim"] == PROJ_DIM and settings["task"] == "language_modeling"


def test_save_to_disk_and_parquet_give_the_jsonl_store(files, gpt2_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(TRAIN)
    data.save_to_disk(str(tmp_path / "disk"))
    data.to_parquet(str(tmp_path / "train.parquet"))
    for source in (tmp_path / "disk", tmp_path / "train.parquet"):
        store = tmp_path / f"store_{source.suffix or 'disk'}"
        assert run("build", store, "--model", files["gpt2"], "--checkpoint", files["gpt2"],
                   files["gpt2_b"], "--data", source, "--proj-dim", PROJ_DIM, "--batch-size",
                   BATCH, "--no-progress") == 0
        for m in (0, 1):
            np.testing.assert_array_equal(np.load(store / f"model_{m}" / "features.npy"),
                                          np.load(gpt2_run / f"model_{m}" / "features.npy"))


def _subprocess_env(files):
    return dict(os.environ, OMP_NUM_THREADS="1", TRAK_TEST_MODEL=files["gpt2"],
                PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))


def test_sigkill_mid_build_then_rerun_is_bitwise_equal(files, tmp_path, monkeypatch):
    args = ["build", "--model", "cli_models:slow_lm", "--tokenizer", files["gpt2"], "--data",
            files["train"], "--proj-dim", PROJ_DIM, "--batch-size", 2, "--no-progress"]
    store = tmp_path / "killed"
    env = dict(_subprocess_env(files), TRAK_TEST_DELAY="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "trak_fast", args[0], str(store), *map(str, args[1:])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    finished = store / "model_0" / "finished.npy"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if finished.exists() and np.load(finished).sum() >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    done = int(np.load(finished).sum())
    assert proc.returncode == -signal.SIGKILL and 0 < done < N_TRAIN, output[-2000:]
    monkeypatch.setenv("TRAK_TEST_MODEL", files["gpt2"])
    monkeypatch.syspath_prepend(HERE)
    for where in (store, tmp_path / "whole"):       # the rerun resumes; a run without a kill
        assert run(args[0], where, *args[1:]) == 0
        assert run("score", where, "--data", files["queries"], "--no-progress") == 0
    for name in ("model_0/features.npy", "model_0/out_to_loss.npy", "experiment_queries/scores.npy"):
        np.testing.assert_array_equal(np.load(store / name), np.load(tmp_path / "whole" / name))


def test_torchrun_two_ranks_equal_one_process(files, gpt2_run, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch without torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "trak_fast"]
    for args in (["build", store, "--model", files["gpt2"], "--checkpoint", files["gpt2"],
                  files["gpt2_b"], "--data", files["train"], "--proj-dim", PROJ_DIM,
                  "--batch-size", BATCH, "--no-progress"],
                 ["score", store, "--data", files["queries"], "--top-k", 3, "--no-progress"]):
        done = subprocess.run(launch + [str(a) for a in args], env=_subprocess_env(files),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in ("model_0/features.npy", "model_1/features.npy"):
        np.testing.assert_array_equal(np.load(store / name), np.load(gpt2_run / name))
    np.testing.assert_allclose(np.load(store / "experiment_queries" / "scores.npy"),
                               np.load(gpt2_run / "experiment_queries" / "scores.npy"),
                               rtol=1e-5, atol=1e-7)
    assert (store / "experiment_queries" / "top_3.jsonl").read_text() == \
        (gpt2_run / "experiment_queries" / "top_3.jsonl").read_text()


def _error(capsys, *args):
    code = run(*args)
    return code, capsys.readouterr().err


def test_rerun_with_other_inputs_is_refused_naming_the_option(files, gpt2_run, capsys, tmp_path):
    base = ["build", gpt2_run, "--model", files["gpt2"], "--checkpoint", files["gpt2"], files["gpt2_b"],
            "--data", files["train"], "--proj-dim", PROJ_DIM, "--batch-size", BATCH, "--no-progress"]
    assert run(*base) == 0          # the same command: everything is done already
    for change, expected in ((["--max-length", 16], "--max-length: the store has 32, got 16"),
                             (["--batch-size", 2], "--batch-size: the store has 4, got 2"),
                             (["--seed", 3], "--seed: the store has 0, got 3"),
                             (["--data", files["queries"]], "--data (file contents)"),
                             (["--checkpoint", files["gpt2_b"]], "--model / --checkpoint (weights)")):
        code, err = _error(capsys, *base, *change)
        assert code == 2 and expected in err, err
    code, err = _error(capsys, "score", gpt2_run, "--data", files["train"], "--no-progress")
    assert code == 2 and "experiment 'queries' of the store was made from other queries" in err
    assert "--data (file contents)" in err


def test_bad_inputs_get_trak_fast_messages(files, gpt2_run, capsys, tmp_path):
    bare = tmp_path / "no_tokenizer"
    transformers.AutoModelForCausalLM.from_pretrained(files["gpt2"]).save_pretrained(bare)
    common = ["--proj-dim", PROJ_DIM, "--no-progress"]
    cases = [
        (["build", tmp_path / "s1", "--model", files["gpt2"], "--data", files["train"],
          "--text-column", "body", *common], "has no column 'body' (its columns: prompt, completion)"),
        (["build", tmp_path / "s2", "--model", files["gpt2"], "--data", files["empty"], *common],
         "holds no rows"),
        (["build", tmp_path / "s3", "--model", str(bare), "--data", files["train"], *common],
         "has no tokenizer"),
        (["score", gpt2_run, "--data", files["queries"], "--tokenizer", files["bert"],
          "--name", "other", "--no-progress"],
         "is not the tokenizer the training set was tokenized with"),
        (["score", gpt2_run, "--data", files["queries"], "--top-k", 99, "--no-progress"],
         "--top-k 99 is more than the store's 24 training examples"),
        (["build", tmp_path / "s4", "--model", "cli_models:not_a_model", "--tokenizer",
          files["gpt2"], "--data", files["train"], *common], "must return a torch.nn.Module"),
        (["build", tmp_path / "s5", "--model", files["gpt2"], "--data", files["train"],
          "--kind", "sparse", "--projection", "factored", *common], "bad feature setting"),
    ]
    for args, expected in cases:
        code, err = _error(capsys, *args)
        assert code == 2 and expected in err, (args, err)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"proj_dimm": 4}))
    code, err = _error(capsys, "build", tmp_path / "s6", "--config", config)
    assert code == 2 and "unknown option(s) ['proj_dimm']" in err


def test_help_names_every_setting(capsys):
    with pytest.raises(SystemExit):
        run("build", "--help")
    text = capsys.readouterr().out
    for field in trak_fast.settings.FEATURE_FIELDS + ("kernel", "kernel_weights"):
        assert "--" + field.replace("_", "-") in text
    with pytest.raises(SystemExit):
        run("score", "--help")
    text = capsys.readouterr().out
    for field in trak_fast.settings.SCORE_FIELDS + ("top_k",):
        assert "--" + field.replace("_", "-") in text


def _parsed(argv):
    namespace = cli.parser().parse_args(argv)
    command, sub = namespace.__dict__.pop("command"), namespace.__dict__.pop("command_parser")
    return (cli.options.build_options if command == "build" else cli.options.score_options)(namespace, sub)


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "m", "data": "a.jsonl", "proj-dim": 16, "kind": "gaussian",
                                  "factored_dims": None, "kernel_weights": "fisher", "batch_size": 2}))
    options = _parsed(["build", "s", "--config", str(config), "--proj-dim", "32", "--grad-wrt", "x.w"])
    assert (options.features.proj_dim, options.features.kind, options.features.grad_wrt) == (32, "gaussian", ("x.w",))
    assert (options.kernel_weights, options.batch_size, options.data, options.store) == ("fisher", 2, ["a.jsonl"], "s")
    assert options.features.seed == trak_fast.FeatureSettings().seed
    toml = tmp_path / "score.toml"
    toml.write_text('lambda_reg = 0.5\nensemble = "trak"\ntop_k = 7\ndata = ["q.csv"]\n')
    options = _parsed(["score", "s", "--config", str(toml), "--lambda-reg", "2"])
    assert options.scoring == {"lambda_reg": 2.0, "ensemble": "trak"} and options.top_k == 7


def test_interrupted_score_resumes_with_the_targets_it_kept(files, gpt2_run, monkeypatch):
    calls = []
    original = trak_fast.TRAK.featurize_targets

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["model_id"])
        if len(calls) == 2:
            raise KeyboardInterrupt     # Ctrl-C while the second checkpoint's targets are made
        return original(self, *args, **kwargs)
    monkeypatch.setattr(trak_fast.TRAK, "featurize_targets", interrupted)
    args = ["score", gpt2_run, "--data", files["queries"], "--name", "resumed", "--no-progress"]
    assert run(*args) == 130
    assert run(*args) == 0 and calls == [0, 1, 1]       # checkpoint 0's targets were kept
    np.testing.assert_array_equal(np.load(gpt2_run / "experiment_resumed" / "scores.npy"),
                                  np.load(gpt2_run / "experiment_queries" / "scores.npy"))
