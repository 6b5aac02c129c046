"""Options of ``build`` and ``score``: one dataclass per command, from flags and a config file.

Every option is a flag (``--proj-dim 512``) and a key of a TOML or JSON ``--config`` file
(``proj_dim = 512``); a flag given on the command line overrides the file, the file overrides
the default. Feature and score settings are the fields of :class:`~trak_fast.FeatureSettings`
and :class:`~trak_fast.ScoreSettings`, validated by them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..features.tasks import LanguageModelingTask
from ..settings import FEATURE_FIELDS, SCORE_FIELDS, FeatureSettings, split_options
from .errors import CLIError
from .model import DEFAULT_ATTENTION


@dataclass
class DataOptions:
    data: List[str] = field(default_factory=list)
    split: Optional[str] = None
    text_column: Optional[str] = None
    prompt_column: Optional[str] = None
    completion_column: Optional[str] = None
    max_length: Optional[int] = None
    batch_size: int = 8
    tokenizer: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True

    def columns(self) -> Optional[Dict[str, str]]:
        if self.text_column is not None:
            if self.prompt_column or self.completion_column:
                raise CLIError("--text-column cannot be combined with --prompt-column / "
                               "--completion-column; give one or the pair")
            return {"text": self.text_column}
        if self.prompt_column or self.completion_column:
            if not (self.prompt_column and self.completion_column):
                raise CLIError("--prompt-column and --completion-column go together; got only "
                               + ("--prompt-column" if self.prompt_column else "--completion-column"))
            return {"prompt": self.prompt_column, "completion": self.completion_column}
        return None


@dataclass
class BuildOptions(DataOptions):
    store: Optional[str] = None
    model: Optional[str] = None
    checkpoint: List[str] = field(default_factory=list)
    optimizer_state: List[str] = field(default_factory=list)
    attn_implementation: str = DEFAULT_ATTENTION
    # FeatureSettings, the store's curvature and the kernel that finalize saves (None: the
    # language-modeling task's preferences; resolved by build_options).
    features: FeatureSettings = field(default_factory=FeatureSettings)
    curvature: Optional[str] = None
    kernel: Optional[str] = None
    kernel_weights: Optional[str] = None


@dataclass
class ScoreOptions(DataOptions):
    store: Optional[str] = None
    name: str = "queries"
    top_k: Optional[int] = None
    top_k_file: Optional[str] = None
    # ScoreSettings fields given (the others default to the build's kernel and the defaults).
    scoring: Dict[str, Any] = field(default_factory=dict)
    batch_size: Optional[int] = None     # default: the build's


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_FEATURE_FLAGS = {
    "proj_dim": dict(type=_none_or(int), metavar="K",
                     help="projected dimension k per checkpoint ('none': raw gradients) [2048; "
                     "unused by the default factored projection]"),
    "kind": dict(choices=["rademacher", "gaussian", "sparse"], help="entries of P [rademacher]"),
    "seed": dict(type=int, help="seed of the projection [0]"),
    "nnz": dict(type=int, help="nonzeros per row of P for --kind sparse [4]"),
    "projection": dict(choices=["dense", "per_layer", "factored"],
                       help="one P, one per layer, or per-layer factored P_out^T G P_in "
                       "[factored, unless a flag of the projection (--proj-dim, --kind, --nnz, "
                       "--gradients) is given: then dense]"),
    "factored_dims": dict(type=int, nargs=2, metavar=("K_OUT", "K_IN"),
                          help="(k_out, k_in) per layer for --projection factored [k k, k half "
                          "the model's width, 32 to 48]"),
    "gradients": dict(choices=["auto", "hooks", "vmap"],
                      help="how per-example gradients are computed [auto]"),
    "grad_wrt": dict(nargs="+", metavar="PARAM",
                     help="differentiate only these parameters (names as in state_dict) [all]"),
    "grad_memory": dict(type=int, metavar="BYTES",
                        help="bytes one group of per-example gradients may take [2**30]"),
    "feature_dtype": dict(choices=["float32", "float16"], help="stored features [float32]"),
}
_SCORE_FLAGS = {
    "ensemble": dict(choices=["mean", "trak"], help="the estimator: the paper's mean, or MadryLab "
                     "trak's scaling [mean]"),
    "lambda_reg": dict(type=float, metavar="LAMBDA",
                       help="damping (relative to tr(K)/n unless --relative-lambda false) [3.0]"),
    "relative_lambda": dict(type=_bool, metavar="BOOL", help="whether --lambda-reg is relative"),
    "kernel": dict(choices=["full", "per_layer"], help="one kernel (or Fisher), or one per layer "
                   "[per_layer with the default Fisher on factored features, else full]"),
    "kernel_weights": dict(choices=["none", "out_to_loss", "fisher"],
                           help="row weights of the kernel [out_to_loss]"),
    "curvature": dict(choices=["kernel", "fisher"],
                      help="TRAK's kernel, or the per-layer Fisher of labels sampled from the "
                      "model; build chooses what the store holds [fisher, unless --kernel or "
                      "--kernel-weights is given]"),
    "normalize": dict(choices=["none", "train", "targets", "both"],
                      help="divide each score by the norm of its train row, target feature or "
                      "both (cosine-like) [none]"),
}
assert set(_FEATURE_FLAGS) == set(FEATURE_FIELDS) and set(_SCORE_FLAGS) == set(SCORE_FIELDS)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_data_flags(parser: argparse.ArgumentParser, *, what: str) -> None:
    build = what == "training set"
    defaults = ("[the model's context]", "[8]", "[the model directory]") if build else \
        ("[the build's]",) * 3
    group = parser.add_argument_group(f"{what} data")
    group.add_argument("--data", nargs="+", metavar="PATH",
                       help=f"{what}: .jsonl, .csv or .parquet files, or a datasets save_to_disk "
                       "folder, read in order")
    group.add_argument("--split", help="the split of a save_to_disk DatasetDict")
    group.add_argument("--text-column", metavar="NAME",
                       help="the text column (default: 'prompt'+'completion' if both exist, "
                       "else 'text')")
    group.add_argument("--prompt-column", metavar="NAME",
                       help="prompt column: conditioned on, no loss taken on it")
    group.add_argument("--completion-column", metavar="NAME",
                       help="completion column: its tokens are the ones attributed")
    group.add_argument("--max-length", type=int, metavar="TOKENS",
                       help=f"cut sequences to this many tokens {defaults[0]}")
    group.add_argument("--batch-size", type=int, metavar="B",
                       help=f"examples per batch {defaults[1]}")
    group.add_argument("--tokenizer", metavar="DIR", help=f"tokenizer directory {defaults[2]}"
                       + ("" if build else "; another tokenizer than the build's is refused"))
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", help="TOML or JSON file of these options "
                     "(keys as the flags, with '_': proj_dim = 512); flags override it")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... [cuda if a GPU is visible (cuda:LOCAL_RANK "
                     "under torchrun), else cpu]; a resume is bitwise on the same device")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bars")


def add_build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", nargs="?", help="the store directory (created, or resumed)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="DIR|MODULE:FUNCTION",
                       help="a Hugging Face model directory (save_pretrained), or "
                       "package.module:function returning a torch.nn.Module")
    model.add_argument("--checkpoint", nargs="+", metavar="PATH",
                       help="the ensemble's checkpoints: model directories, .safetensors or "
                       "torch.save'd state dicts [the model's own weights]")
    model.add_argument("--optimizer-state", nargs="+", metavar="PATH",
                       help="one torch.save'd optimizer.state_dict() (Adam, AdamW) or {name: v} "
                       "per checkpoint: every gradient is divided by its sqrt(v_hat) + eps "
                       "(TrackStar's normalization) [none]")
    model.add_argument("--attn-implementation", metavar="NAME",
                       help="attention of Hugging Face models [eager]")
    add_data_flags(parser, what="training set")
    features = parser.add_argument_group("features (trak_fast.FeatureSettings)")
    for name, spec in _FEATURE_FLAGS.items():
        features.add_argument(_flag(name), **spec)
    kernel = parser.add_argument_group("the store's curvature, and the kernel saved by finalize "
                                       "(score may use others)")
    for name in ("curvature", "kernel", "kernel_weights"):
        kernel.add_argument(_flag(name), **_SCORE_FLAGS[name])


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", nargs="?", help="a store made by build")
    add_data_flags(parser, what="query set")
    out = parser.add_argument_group("output")
    out.add_argument("--name", help="the experiment's name in the store [queries]")
    out.add_argument("--top-k", type=int, metavar="N",
                     help="write each query's N strongest proponents and opponents as JSONL")
    out.add_argument("--top-k-file", metavar="FILE",
                     help="where [STORE/experiment_NAME/top_N.jsonl]")
    scoring = parser.add_argument_group("scoring (trak_fast.ScoreSettings; kernel defaults to "
                                        "the build's)")
    for name, spec in _SCORE_FLAGS.items():
        scoring.add_argument(_flag(name), **spec)


def _toml():
    try:
        import tomllib
    except ImportError:          # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise CLIError("a TOML --config needs Python >= 3.11 or the tomli package "
                           "(pip install tomli); or write the options as JSON") from exc
    return tomllib


def _read_config(path: str) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--config {path!r} does not exist")
    try:
        if file.suffix.lower() == ".toml":
            values = _toml().loads(file.read_text())
        elif file.suffix.lower() == ".json":
            values = json.loads(file.read_text())
        else:
            raise CLIError(f"--config {path!r}: expected a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"--config {path!r} cannot be parsed: {exc}") from exc
    if not isinstance(values, dict):
        raise CLIError(f"--config {path!r} must hold a table of options, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def _merged(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Flags given, over the config file's values; unknown config keys are refused."""
    given = {k: v for k, v in vars(namespace).items() if v is not None and k != "config"}
    config = _read_config(namespace.config) if getattr(namespace, "config", None) else {}
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CLIError(f"--config {namespace.config!r} has unknown option(s) {unknown}; the "
                       f"options are {sorted(known)}")
    for key in ("data", "checkpoint", "grad_wrt"):
        if isinstance(config.get(key), str):
            config[key] = [config[key]]
        if key in config and not (isinstance(config[key], list)
                                  and all(isinstance(v, str) for v in config[key])):
            raise CLIError(f"--config {namespace.config!r}: {key} must be a string or a list of "
                           f"strings, got {config[key]!r}")
    merged = {**config, **given}
    if not isinstance(merged.get("progress", True), bool):
        raise CLIError(f"--config {namespace.config!r}: progress must be true or false, got "
                       f"{merged['progress']!r}")
    for key in ("store", "model", "split", "text_column", "prompt_column", "completion_column",
                "tokenizer", "device", "name", "top_k_file", "attn_implementation"):
        if key in merged and not isinstance(merged[key], str):
            raise CLIError(f"--config {namespace.config!r}: {key} must be a string, got "
                           f"{merged[key]!r}")
    return merged


def build_options(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> BuildOptions:
    values = _merged(namespace, parser)
    features = {k: values.pop(k) for k in FEATURE_FIELDS if k in values}
    for key in ("factored_dims", "grad_wrt"):
        if isinstance(features.get(key), list):
            features[key] = tuple(features[key])
    task = LanguageModelingTask()
    # The task's preferences fill what the flags leave unset (see trak_fast.settings.preferred).
    try:
        features = split_options(features, accepts="features", task=task)[0]
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad feature setting: {exc}") from exc
    given = {k: values.pop(k) for k in ("curvature", "kernel", "kernel_weights") if k in values}
    try:
        scoring = split_options(given, features=features, accepts="scoring", task=task)[1]
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad score setting: {exc}") from exc
    options = BuildOptions(**values, features=features, curvature=scoring.curvature,
                           kernel=scoring.kernel, kernel_weights=scoring.kernel_weights)
    for name in ("store", "model"):
        if not getattr(options, name):
            raise CLIError(f"build needs {'a store directory' if name == 'store' else '--model'}"
                           " (on the command line or in --config)")
    if not options.data:
        raise CLIError("build needs --data (the training set)")
    _check_sizes(options)
    return options


def score_options(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> ScoreOptions:
    values = _merged(namespace, parser)
    scoring = {k: values.pop(k) for k in SCORE_FIELDS if k in values}
    options = ScoreOptions(**values, scoring=scoring)
    if not options.store:
        raise CLIError("score needs the store directory that build made")
    if not options.data:
        raise CLIError("score needs --data (the query set)")
    if options.top_k is not None and (isinstance(options.top_k, bool)
                                      or not isinstance(options.top_k, int) or options.top_k < 1):
        raise CLIError(f"--top-k must be a positive number of training examples, got {options.top_k}")
    _check_sizes(options)
    return options


def _check_sizes(options: DataOptions) -> None:
    for name in ("batch_size", "max_length"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CLIError(f"{_flag(name)} must be a positive int, got {value!r}")
    if options.max_length is not None and options.max_length < 2:
        raise CLIError(f"--max-length must be at least 2 (a token to predict from, one to "
                       f"predict), got {options.max_length}")


def record_of(options: BuildOptions) -> Dict[str, Any]:
    """The build's options as JSON (paths absolute), for the store's cli record."""
    out = dataclasses.asdict(options)
    out["features"] = {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in dataclasses.asdict(options.features).items()}
    return out
