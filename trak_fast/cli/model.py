"""Models, checkpoints and tokenizers for the command line.

``--model`` is a Hugging Face model directory (``save_pretrained``; loaded with
``AutoModelForCausalLM``, on the CPU, never downloaded) or ``package.module:function``, a
function called without arguments that returns a ``torch.nn.Module`` taking
``(input_ids, attention_mask=...)`` and returning logits ``[B, T, V]`` (or an object with
``.logits``). ``--checkpoint`` (repeatable) gives the ensemble's weights: model directories,
``.safetensors`` files or ``torch.save``'d state dicts; without it the model's own weights are
the one checkpoint. The tokenizer is ``--tokenizer`` or the model directory's.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .errors import CLIError

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: Files that make up a saved tokenizer (their bytes are its fingerprint).
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece",
                    "sentencepiece")
#: Attention implementation for Hugging Face models: eager attention. Every parameter of the
#: common families takes the hook path, where SDPA works too, but a parameter no adapter owns
#: (BertLMHeadModel's prediction bias, registered outside its Linear as well) takes vmap, which
#: cannot trace transformers' SDPA mask code. --attn-implementation sdpa where that is known safe.
DEFAULT_ATTENTION = "eager"


def is_function(spec: str) -> bool:
    return not os.path.exists(spec) and bool(_FUNCTION.match(spec))


def load_model(spec: str, attn_implementation: str = DEFAULT_ATTENTION) -> torch.nn.Module:
    """The model of ``--model`` (see the module docstring), in eval mode."""
    if is_function(spec):
        module_name, function_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CLIError(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
        function = getattr(module, function_name, None)
        if not callable(function):
            raise CLIError(f"--model {spec!r}: {module_name!r} has no function {function_name!r}")
        model = function()
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"--model {spec!r} must return a torch.nn.Module, got "
                           f"{type(model).__name__}")
        return model.eval()
    path = Path(spec)
    if not path.is_dir():
        raise CLIError(f"--model {spec!r}: expected a Hugging Face model directory "
                       "(save_pretrained) or package.module:function, got "
                       f"{'a file' if path.exists() else 'a path that does not exist'}")
    if not (path / "config.json").exists():
        raise CLIError(f"--model {spec!r} has no config.json; save the model with save_pretrained")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {spec!r}: cannot load it as a causal language model "
                       f"(AutoModelForCausalLM): {exc}") from exc
    return model.eval()


def max_positions(model: torch.nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_checkpoint(spec: str, model: torch.nn.Module, attn_implementation: str
                    ) -> Dict[str, torch.Tensor]:
    """A checkpoint of ``--checkpoint``: a model directory, .safetensors or a torch.save'd dict."""
    path = Path(spec)
    if path.is_dir():
        return dict(load_model(spec, attn_implementation).state_dict())
    if not path.exists():
        raise CLIError(f"--checkpoint {spec!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CLIError(f"--checkpoint {spec!r}: cannot read it as a state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise CLIError(f"--checkpoint {spec!r} must hold a state dict, got {type(state).__name__}")
    # A safetensors file drops tied weights (lm_head.weight = the embedding): take them over.
    full = dict(model.state_dict())
    missing = [k for k in full if k not in state]
    tied = {k: state[t] for k in missing for t in _tied_sources(model, k) if t in state}
    return {**state, **tied}


def _tied_sources(model: torch.nn.Module, name: str):
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return [other for other, p in params.items() if target is not None and p is target and other != name]


def tokenizer_dir(model_spec: str, tokenizer: Optional[str]) -> str:
    if tokenizer is not None:
        return tokenizer
    if is_function(model_spec):
        raise CLIError(f"--model {model_spec!r} is a function; give its tokenizer with --tokenizer DIR")
    return model_spec


def load_tokenizer(directory: str, option: str) -> Any:
    path = Path(directory)
    if not path.is_dir():
        raise CLIError(f"{option} {directory!r}: expected a directory holding a tokenizer "
                       "(tokenizer.save_pretrained), got "
                       f"{'a file' if path.exists() else 'a path that does not exist'}")
    if not _tokenizer_files(path):
        raise CLIError(f"{option} {directory!r} has no tokenizer (no tokenizer.json, "
                       "tokenizer_config.json or vocabulary file); save one beside the model "
                       "with tokenizer.save_pretrained, or pass --tokenizer DIR")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{option} {directory!r}: cannot load its tokenizer: {exc}") from exc


def _tokenizer_files(path: Path):
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(_TOKENIZER_FILES))


def tokenizer_fingerprint(directory: str) -> str:
    """A hash of the tokenizer's files: the same tokenizer gives the same token ids."""
    hasher = hashlib.blake2b(digest_size=16)
    for file in _tokenizer_files(Path(directory)):
        hasher.update(file.name.encode() + b"\0" + file.read_bytes())
    return hasher.hexdigest()


def pad_id(tokenizer: Any) -> int:
    """The id written at padding positions (masked out, so any valid id works)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
