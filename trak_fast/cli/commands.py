"""``build`` and ``score``: thin calls into :class:`~trak_fast.TRAK`, with a record of the inputs.

The store gets a ``cli.json`` beside its ``metadata.json``: the build's model, checkpoints,
tokenizer and data (paths and fingerprints), columns, lengths and settings, and per experiment
the query data's. A rerun compares its inputs with the record before any work and refuses a
difference, naming the option; with the same inputs it resumes (TRAK's featurize continues
from its finished rows, bitwise; finished checkpoints, kernels, target features and scores are
kept), so Ctrl-C or SIGKILL costs at most the batches in flight.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..features.tasks import LanguageModelingTask
from ..pipeline import distributed
from ..pipeline.fingerprint import checkpoint_fingerprint
from ..pipeline.trak import TRAK
from ..settings import FeatureSettings, ScoreSettings
from . import model as models
from .data import Batches, Rows, absolute
from .errors import CLIError
from .options import BuildOptions, ScoreOptions, record_of

RECORD = "cli.json"
#: Keys of the build record that must match on a rerun, and the flag each comes from.
_IDENTITY = {"model": "--model", "checkpoint_fingerprints": "--model / --checkpoint (weights)",
             "optimizer_state_fingerprints": "--optimizer-state (file contents)",
             "tokenizer_fingerprint": "--tokenizer (its files)", "attn_implementation":
             "--attn-implementation", "data_fingerprint": "--data (file contents)",
             "split": "--split", "columns": "--text-column / --prompt-column / --completion-column",
             "max_length": "--max-length", "batch_size": "--batch-size", "features": None}
_QUERY_IDENTITY = {"data_fingerprint": "--data (file contents)", "split": "--split",
                   "columns": "--text-column / --prompt-column / --completion-column",
                   "max_length": "--max-length", "batch_size": "--batch-size"}


def _device(requested):
    """``--device``, else the GPU when one is visible (``cuda:LOCAL_RANK`` under torchrun)."""
    import torch

    if requested is not None or not torch.cuda.is_available():
        return requested
    if not distributed.active():
        return "cuda"
    return f"cuda:{os.environ.get('LOCAL_RANK', distributed.rank() % torch.cuda.device_count())}"


def say(message: str) -> None:
    if distributed.is_main():
        print(message, flush=True)


def _read_record(store: Path) -> Dict[str, Any]:
    path = store / RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _write_record(store: Path, record: Dict[str, Any]) -> None:
    path = store / RECORD
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _differences(old: Dict[str, Any], new: Dict[str, Any], keys: Dict[str, Any]) -> List[str]:
    out = []
    for key, flag in keys.items():
        if key == "features":
            for name, value in new["features"].items():
                if old["features"].get(name) != value:
                    out.append(f"--{name.replace('_', '-')}: the store has "
                               f"{old['features'].get(name)!r}, got {value!r}")
        elif old.get(key) != new.get(key):
            if key.endswith("fingerprint") or key.endswith("fingerprints"):
                out.append(f"{flag}: differs from the store's (fingerprint {old.get(key)} vs "
                           f"{new.get(key)})")
            else:
                out.append(f"{flag}: the store has {old.get(key)!r}, got {new.get(key)!r}")
    return out


def _tokenization(options, model_spec: str, model):
    tokenizer_path = models.tokenizer_dir(model_spec, options.tokenizer)
    tokenizer = models.load_tokenizer(tokenizer_path, "--tokenizer" if options.tokenizer
                                      else "--model")
    limit = models.max_positions(model)
    max_length = options.max_length or limit or 1024
    if limit is not None and max_length > limit:
        raise CLIError(f"--max-length {max_length} is longer than the model's context ({limit} "
                       "positions)")
    return tokenizer_path, tokenizer, max_length


def _path(spec: str) -> str:
    """A model or checkpoint spec as recorded: a function as given, a path made absolute."""
    return spec if models.is_function(spec) else os.path.abspath(spec)


def _load_checkpoint(spec: str, model, attn: str, model_spec: str):
    """``spec``'s weights; the model's own when ``spec`` is the model itself."""
    if spec == model_spec or models.is_function(spec):
        return dict(model.state_dict())
    return models.load_checkpoint(spec, model, attn)


def _load_optimizer_state(path: str) -> Any:
    """A ``--optimizer-state`` file: a torch.save'd ``optimizer.state_dict()`` or ``{name: v}``."""
    if not os.path.isfile(path):
        raise CLIError(f"--optimizer-state {path!r} does not exist")
    try:
        try:               # memory-mapped: a check reads only what it touches
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)   # legacy format
    except Exception as exc:
        raise CLIError(f"--optimizer-state {path!r}: cannot read it: {exc}") from exc


def _check_optimizer_states(paths: List[str], model, features: FeatureSettings) -> None:
    """Each ``--optimizer-state`` file read and matched to the featurized parameters (names,
    shapes, finite non-negative moments) before anything is featurized."""
    from ..features.gradients.second_moment import SecondMoments
    from ..features.spec import FeatureSpec
    names = FeatureSpec(model, LanguageModelingTask(), features).grad_names
    for path in paths:
        try:
            SecondMoments.from_state(_load_optimizer_state(path), model, names,
                                     torch.device("cpu"), torch.float32,
                                     where=f"--optimizer-state {path!r}")
        except (TypeError, ValueError) as exc:
            raise CLIError(str(exc)) from exc


def _file_fingerprint(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_build(options: BuildOptions):
    """``(model, tokenizer, rows, checkpoint specs, max_length, record)`` of a build: loads
    and checks every input, featurizes nothing."""
    model = models.load_model(options.model, options.attn_implementation)
    tokenizer_path, tokenizer, max_length = _tokenization(options, options.model, model)
    rows = Rows(options.data, split=options.split, columns=options.columns())
    specs = list(options.checkpoint) if options.checkpoint else [options.model]
    checkpoints = {}     # model_id -> fingerprint (each loaded once here, again when featurized)
    for model_id, spec in enumerate(specs):
        checkpoints[model_id] = checkpoint_fingerprint(
            _load_checkpoint(spec, model, options.attn_implementation, options.model))
    states = list(options.optimizer_state or [])
    if states and len(states) != len(specs):
        raise CLIError(f"--optimizer-state needs one file per checkpoint: {len(states)} for "
                       f"{len(specs)} checkpoint(s)")
    _check_optimizer_states(states, model, options.features)
    record = record_of(options)
    record["optimizer_state"] = [os.path.abspath(p) for p in states]
    if states:          # absent without: stores built before the flag resume as they were
        record["optimizer_state_fingerprints"] = [_file_fingerprint(p) for p in states]
    record.update(
        model=_path(options.model), checkpoint=[_path(s) for s in specs],
        checkpoint_fingerprints=[checkpoints[m] for m in sorted(checkpoints)],
        tokenizer=os.path.abspath(tokenizer_path),
        tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer_path),
        data=absolute(options.data), data_fingerprint=rows.fingerprint(), columns=rows.columns,
        max_length=max_length, train_size=len(rows), store=os.path.abspath(options.store))
    record.pop("progress"), record.pop("device")
    return model, tokenizer, rows, specs, max_length, record


def record_build(store: Path, record: Dict[str, Any]) -> None:
    """Writes the build's record into the store's cli.json (keeping its experiments)."""
    full = _read_record(store)
    full["build"] = record
    full.setdefault("experiments", {})
    _write_record(store, full)


def run_build(options: BuildOptions) -> int:
    store = Path(options.store)
    model, tokenizer, rows, specs, max_length, record = prepare_build(options)
    # Checked before TRAK opens the store (which would name a setting, not a flag); written
    # after TRAK() accepted every setting, so a refused value is never recorded.
    with distributed.step("build: checking the store's record"):
        if distributed.is_main():
            old = _read_record(store).get("build")
            differences = [] if old is None else _differences(old, record, _IDENTITY)
            if differences:
                raise CLIError(f"the store {str(store)!r} was built from other inputs:\n  "
                               + "\n  ".join(differences)
                               + "\nrerun with the same options to resume, or use a new store "
                               "directory")
    trak = TRAK(store, model, train_size=len(rows), task=LanguageModelingTask(),
                features=options.features, curvature=options.curvature,
                device=_device(options.device), progress=options.progress and distributed.is_main())
    with distributed.step("build: recording the inputs"):
        if distributed.is_main():
            record_build(store, record)
    say(f"build: {len(rows)} training examples, {len(specs)} checkpoint(s), "
        f"{trak.num_features} features each -> {store}")
    batches = Batches(rows, tokenizer, max_length=max_length, batch_size=options.batch_size,
                      pad_id=models.pad_id(tokenizer), what="--data")
    for model_id, spec in enumerate(specs):
        entry = trak.store.model_entry(model_id)
        if entry is not None and entry["featurized"]:
            say(f"checkpoint {model_id}: already featurized")
            continue
        checkpoint = _load_checkpoint(spec, model, options.attn_implementation, options.model)
        state = _load_optimizer_state(options.optimizer_state[model_id]) \
            if options.optimizer_state else None
        trak.featurize(checkpoint, batches, model_id=model_id, optimizer_state=state)
    trak.finalize(list(range(len(specs))), kernel=options.kernel,
                  kernel_weights=options.kernel_weights)
    say(f"build: done; score queries with: python -m trak_fast score {store} --data QUERIES")
    return 0


def run_score(options: ScoreOptions) -> int:
    store = Path(options.store)
    if not (store / "metadata.json").exists():
        raise CLIError(f"store {str(store)!r} does not exist; make it with python -m trak_fast build")
    build = _read_record(store).get("build")
    if build is None:
        raise CLIError(f"store {str(store)!r} was not made by python -m trak_fast build (no "
                       f"{RECORD}); score it with the Python API (TRAK.featurize_targets, score)")
    if options.top_k is not None and options.top_k > build["train_size"]:
        raise CLIError(f"--top-k {options.top_k} is more than the store's "
                       f"{build['train_size']} training examples")
    model = models.load_model(build["model"], build["attn_implementation"])
    tokenizer_path = options.tokenizer or build["tokenizer"]
    if options.tokenizer is not None:
        models.load_tokenizer(tokenizer_path, "--tokenizer")
        if models.tokenizer_fingerprint(tokenizer_path) != build["tokenizer_fingerprint"]:
            raise CLIError(f"--tokenizer {options.tokenizer!r} is not the tokenizer the training "
                           f"set was tokenized with ({build['tokenizer']!r}; their files differ): "
                           "queries must be tokenized like the training set")
    tokenizer = models.load_tokenizer(tokenizer_path, "--tokenizer")
    max_length = options.max_length or build["max_length"]
    batch_size = options.batch_size or build["batch_size"]
    rows = Rows(options.data, split=options.split, columns=options.columns())
    features = dict(build["features"])
    for key in ("factored_dims", "grad_wrt"):
        if isinstance(features.get(key), list):         # JSON's lists ("auto" stays)
            features[key] = tuple(features[key])
    curvature = build.get("curvature") or "kernel"      # builds before curvature: the kernel
    trak = TRAK(store, model, train_size=build["train_size"], task=LanguageModelingTask(),
                features=FeatureSettings(**features), curvature=curvature,
                device=_device(options.device), progress=options.progress and distributed.is_main())
    scoring = dict(kernel=build["kernel"], kernel_weights=build["kernel_weights"],
                   curvature=curvature)
    scoring.update(options.scoring)
    try:
        scoring = ScoreSettings(**scoring)
        scoring.check_features(trak.settings)
    except ValueError as exc:
        raise CLIError(f"bad score setting: {exc}") from exc
    name = options.name
    query = {"data": absolute(options.data), "data_fingerprint": rows.fingerprint(),
             "split": options.split, "columns": rows.columns, "max_length": max_length,
             "batch_size": batch_size, "tokenizer": os.path.abspath(tokenizer_path)}

    def check_or_write() -> None:
        full = _read_record(store)
        old = full.setdefault("experiments", {}).get(name)
        if old is not None:
            differences = _differences(old, query, _QUERY_IDENTITY)
            if differences:
                raise CLIError(f"experiment {name!r} of the store was made from other queries:"
                               "\n  " + "\n  ".join(differences)
                               + "\nrerun with the same options to resume, or pass --name NEW")
        full["experiments"][name] = query
        _write_record(store, full)
    with distributed.step("score: checking the store's record"):
        if distributed.is_main():
            check_or_write()
    say(f"score: {len(rows)} queries against {build['train_size']} training examples")
    batches = Batches(rows, tokenizer, max_length=max_length, batch_size=batch_size,
                      pad_id=models.pad_id(tokenizer), what="--data")
    ids = list(range(len(build["checkpoint"])))
    for model_id, spec in enumerate(build["checkpoint"]):
        experiment = trak.status()["experiments"].get(name)
        if experiment is not None and str(model_id) in experiment["targets"]:
            continue
        checkpoint = _load_checkpoint(spec, model, build["attn_implementation"], build["model"])
        states = build.get("optimizer_state") or []
        state = _load_optimizer_state(states[model_id]) if states else None
        trak.featurize_targets(name, checkpoint, batches, model_id=model_id, optimizer_state=state)
    wanted = {**vars(scoring), "model_ids": ids}
    if trak.status()["experiments"][name]["scores"] == wanted:
        scores = trak.load_scores(name)
        say("score: the scores with these settings are already saved")
    else:
        scores = trak.score(name, scoring=scoring, model_ids=ids, overwrite=True)
    say(f"score: scores [{scores.shape[0]} train x {scores.shape[1]} queries] in "
        f"{trak.store.scores_path(name)}")
    if options.top_k is not None:
        path = Path(options.top_k_file) if options.top_k_file else \
            trak.store.experiment_dir(name) / f"top_{options.top_k}.jsonl"
        with distributed.step("score: the top-k file"):
            if distributed.is_main():
                _write_top_k(trak, name, options.top_k, path, rows,
                             Rows(build["data"], split=build["split"], columns=build["columns"]))
        say(f"score: top-{options.top_k} proponents and opponents per query in {path}")
    return 0


def _write_top_k(trak: TRAK, name: str, k: int, path: Path, queries: Rows, train: Rows) -> None:
    best = trak.top_k(name, k)
    train_rows = train.rows_at(sorted(set(best.proponents.flatten().tolist())
                                      | set(best.opponents.flatten().tolist())))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for j, row in enumerate(queries):
            line = {"query": j, **row}
            for side in ("proponents", "opponents"):
                indices = getattr(best, side)[j].tolist()
                values = getattr(best, side[:-1] + "_scores")[j].tolist()
                line[side] = [{"index": i, "score": v, **train_rows[i]}
                              for i, v in zip(indices, values)]
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
