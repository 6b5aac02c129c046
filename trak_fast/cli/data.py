"""Data for the command line: rows from jsonl, csv or parquet files or a ``save_to_disk``
folder, the text columns, tokenization and padded batches for the language modeling task.

Rows are read in order, file after file, and never all at once: a :class:`Rows` source counts
its rows when opened and streams them for every pass. Each row becomes ``input_ids`` and
``labels`` (``-100`` where no loss is taken):

- a ``text`` column: the tokenized text, every token after the first predicted;
- ``prompt`` and ``completion`` columns: the prompt's tokens (with the tokenizer's special
  tokens) followed by the completion's (without), labels ``-100`` on the prompt, so only the
  completion's tokens count.

Sequences are cut to ``max_length`` tokens and right-padded to the longest of their batch
(the attention mask marks the padding, labels there are ``-100``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .errors import CLIError

FILE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
                or (path / "dataset_dict.json").exists():
            return "save_to_disk"
        raise CLIError(f"--data {str(path)!r} is a folder but not a datasets save_to_disk folder "
                       "(no state.json or dataset_dict.json in it)")
    if not path.exists():
        raise CLIError(f"--data {str(path)!r} does not exist")
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise CLIError(f"--data {str(path)!r}: expected a .jsonl, .csv or .parquet file or a "
                       f"save_to_disk folder, got a {path.suffix or 'suffix-less'} file")
    return kind


def _needs(module: str, what: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise CLIError(f"reading {what} needs the {module.split('.')[0]!r} package "
                       f"(pip install {module.split('.')[0]})") from exc


class _File:
    """One data file or folder: its columns, its number of rows and a stream of them."""

    def __init__(self, path: Path, split: Optional[str]):
        self.path, self.kind, self.split = path, _kind(path), split
        self.dataset = None
        if self.kind == "jsonl":
            self.columns, self.size = self._scan_jsonl()
        elif self.kind == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                self.size = sum(1 for _ in reader)
        elif self.kind == "parquet":
            pq = _needs("pyarrow.parquet", "parquet files")
            meta = pq.ParquetFile(path)
            self.columns, self.size = list(meta.schema_arrow.names), meta.metadata.num_rows
        else:
            datasets = _needs("datasets", "a save_to_disk folder")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split is None or split not in loaded:
                    raise CLIError(f"--data {str(path)!r} holds the splits {sorted(loaded)}; "
                                   f"choose one with --split, got {split!r}")
                loaded = loaded[split]
            self.dataset = loaded
            self.columns, self.size = list(loaded.column_names), len(loaded)
        if self.size == 0:
            raise CLIError(f"--data {str(path)!r} holds no rows")

    def _scan_jsonl(self):
        columns: Dict[str, None] = {}
        size = 0
        for _, row in self._jsonl_rows():
            columns.update(dict.fromkeys(row))
            size += 1
        return list(columns), size

    def _jsonl_rows(self) -> Iterator[Any]:
        with open(self.path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise CLIError(f"--data {str(self.path)!r} line {line_number} is not valid "
                                   f"JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise CLIError(f"--data {str(self.path)!r} line {line_number}: expected a "
                                   f"JSON object per line, got {type(row).__name__}")
                yield line_number, row

    def rows(self) -> Iterator[Dict[str, Any]]:
        if self.kind == "jsonl":
            yield from (row for _, row in self._jsonl_rows())
        elif self.kind == "csv":
            with open(self.path, newline="", encoding="utf-8") as handle:
                yield from csv.DictReader(handle)
        elif self.kind == "parquet":
            pq = _needs("pyarrow.parquet", "parquet files")
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:
            for start in range(0, self.size, 1024):
                chunk = self.dataset[start:start + 1024]
                keys = list(chunk)
                yield from (dict(zip(keys, values)) for values in zip(*(chunk[k] for k in keys)))

    def digest(self, hasher: Any) -> None:
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.rglob("*") if p.is_file())
        for file in files:
            hasher.update(str(file.relative_to(self.path.parent)).encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(chunk)
        hasher.update(str(self.split).encode())


class Rows:
    """The rows of one or several data files, in order, with the text columns chosen.

    ``columns``: ``{"text": name}`` or ``{"prompt": name, "completion": name}``; ``None``
    chooses ``prompt``/``completion`` when both exist, else ``text``.
    """

    def __init__(self, paths: Sequence[str], *, split: Optional[str] = None,
                 columns: Optional[Dict[str, str]] = None, option: str = "--data"):
        if not paths:
            raise CLIError(f"{option}: give at least one data file or folder")
        self.files = [_File(Path(p), split) for p in paths]
        present = self.files[0].columns
        if columns is None:
            if "prompt" in present and "completion" in present:
                columns = {"prompt": "prompt", "completion": "completion"}
            else:
                columns = {"text": "text"}
        self.columns = dict(columns)
        for file in self.files:
            missing = [c for c in self.columns.values() if c not in file.columns]
            if missing:
                raise CLIError(
                    f"{option} {str(file.path)!r} has no column {missing[0]!r} (its columns: "
                    f"{', '.join(file.columns) or 'none'}); name the text column with "
                    "--text-column, or the pair with --prompt-column and --completion-column")
        self.size = sum(f.size for f in self.files)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Dict[str, str]]:
        for file in self.files:
            for index, row in enumerate(file.rows()):
                out = {}
                for role, column in self.columns.items():
                    value = row.get(column)
                    if not isinstance(value, str):
                        raise CLIError(f"{str(file.path)!r} row {index}: column {column!r} must "
                                       f"hold text, got {type(value).__name__} {value!r:.40}")
                    out[role] = value
                yield out

    def fingerprint(self) -> str:
        """A hash of the files' bytes (and the split), to refuse other data on a resume."""
        hasher = hashlib.blake2b(digest_size=16)
        for file in self.files:
            file.digest(hasher)
        return hasher.hexdigest()

    def rows_at(self, indices: Sequence[int]) -> Dict[int, Dict[str, str]]:
        """Rows ``indices`` (``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``), in one
        streaming pass that stops after the last one."""
        wanted, out = set(int(i) for i in indices), {}
        for index, row in enumerate(self):
            if index in wanted:
                out[index] = row
                if len(out) == len(wanted):
                    break
        return out


def encode(tokenizer: Any, row: Dict[str, str], max_length: int, where: str) -> List[List[int]]:
    """``[input_ids, labels]`` of one row (see the module docstring)."""
    if "text" in row:
        ids = list(tokenizer(row["text"])["input_ids"])[:max_length]
        labels = list(ids)
    else:
        prompt = list(tokenizer(row["prompt"])["input_ids"])
        completion = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
        ids = (prompt + completion)[:max_length]
        labels = ([-100] * len(prompt) + completion)[:max_length]
    # Position 0 is never predicted (nothing comes before it).
    if sum(1 for label in labels[1:] if label != -100) == 0:
        what = "text" if "text" in row else "completion"
        raise CLIError(f"{where}: the {what} leaves no token to predict after tokenizing and "
                       f"cutting to --max-length {max_length} ({len(ids)} tokens); it needs at "
                       "least one token after the first (and after the prompt)")
    return [ids, labels]


class Batches:
    """Padded ``{input_ids, attention_mask, labels}`` batches of :class:`Rows`, made on the fly
    for every pass (sized: ``len`` is the number of batches)."""

    def __init__(self, rows: Rows, tokenizer: Any, *, max_length: int, batch_size: int,
                 pad_id: int, what: str):
        self.rows, self.tokenizer, self.max_length = rows, tokenizer, max_length
        self.batch_size, self.pad_id, self.what = batch_size, pad_id, what

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def _batch(self, encoded: List[List[List[int]]]) -> Dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        shape = (len(encoded), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        for b, (ids, lab) in enumerate(encoded):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            mask[b, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        pending = []
        for index, row in enumerate(self.rows):
            pending.append(encode(self.tokenizer, row, self.max_length, f"{self.what} row {index}"))
            if len(pending) == self.batch_size:
                yield self._batch(pending)
                pending = []
        if pending:
            yield self._batch(pending)


def absolute(paths: Sequence[str]) -> List[str]:
    return [os.path.abspath(p) for p in paths]
