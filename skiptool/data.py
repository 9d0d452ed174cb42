"""Text data for calibration, training and evaluation: files, JSONL, Hugging Face datasets -> token blocks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError

BUILTIN_SAMPLE = "builtin:wikitext2-sample"


@dataclass(frozen=True)
class DataSpec:
    """Where text comes from and which part of it to use.

    `source` is a path to a ``.txt`` / ``.jsonl`` / ``.json`` file, a Hugging Face dataset name
    (``name`` or ``name:config``), or ``builtin:wikitext2-sample``. `part` is a pair of fractions
    ``(start, end)`` of the text; disjoint parts keep calibration and evaluation text apart.
    """

    source: str = BUILTIN_SAMPLE
    field: str = "text"
    split: str = "test"
    part: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        for name, hint in _EMPTY_HINTS.items():
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{hint} (got {value!r})")
        check_part(*self.part)

    def same_text(self, other: "DataSpec") -> bool:
        """Whether both name the same text (the same file, dataset split and field)."""
        return (_canonical(self.source), self.field, self.split) == (_canonical(other.source), other.field,
                                                                      other.split)

    def overlaps(self, other: "DataSpec") -> bool:
        """Whether the two specs select overlapping parts of the same text."""
        return self.same_text(other) and self.part[0] < other.part[1] and other.part[0] < self.part[1]


_EMPTY_HINTS = {"source": "--data is empty: name a text or JSONL file or a Hugging Face dataset, or leave --data out "
                          "for the built-in excerpt",
                "field": "--field is empty: name the text field of the JSONL records or dataset rows",
                "split": "--split is empty: name a dataset split, e.g. test"}


def _canonical(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def parse_part(text: str) -> tuple[float, float]:
    """Parse ``"0:0.5"`` into ``(0.0, 0.5)``, checking ``0 <= start < end <= 1``."""
    try:
        start_s, end_s = text.split(":")
        start, end = float(start_s or 0.0), float(end_s or 1.0)
    except ValueError:
        raise DataError(f"--part must look like START:END with fractions, e.g. 0:0.5 (got {text!r})") from None
    return check_part(start, end)


def check_part(start: float, end: float) -> tuple[float, float]:
    """``(start, end)`` if it is a part of a text, ``0 <= start < end <= 1``; one clear error line otherwise."""
    if not 0.0 <= start < end <= 1.0:
        raise DataError(f"--part needs 0 <= START < END <= 1 (got {start:g}:{end:g})")
    return start, end


def check_blocks(num_blocks: int | None, seq_len: int) -> None:
    """One clear error line unless text can be cut into `num_blocks` (None: all there are) blocks of `seq_len`
    tokens: a block needs 2 tokens (one predicts the next), and a count at least 1."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 tokens (got {seq_len})")
    if num_blocks is not None and num_blocks < 1:
        raise DataError(f"--samples must be at least 1 block (got {num_blocks})")


def check_data(spec: DataSpec) -> None:
    """Read the text `spec` names, so a missing, unreadable or empty source (or one without the field) fails in one
    line before a model is loaded; its token count is checked when it is cut into blocks."""
    load_text(spec)


def load_text(spec: DataSpec) -> str:
    """The selected part of the text a spec names, or a :class:`DataError`."""
    text = _read_source(spec)
    start, end = spec.part
    n = len(text)
    text = text[int(start * n): int(end * n)]
    if not text.strip():
        raise DataError(f"no text in {spec.source!r} (part {start}:{end})")
    return text


def token_blocks(tokenizer: Any, spec: DataSpec, seq_len: int, num_blocks: int | None = None) -> Tensor:
    """Tokenise the selected text and cut it into ``[n, seq_len]`` blocks (a BOS token leads each block).

    Blocks are consecutive and never overlap; the remainder is dropped.
    """
    check_blocks(num_blocks, seq_len)
    ids = tokenizer(load_text(spec), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    count = len(ids) // body
    if num_blocks is not None:
        count = min(count, num_blocks)
    if count == 0:
        raise DataError(f"{spec.source!r} has {len(ids)} tokens, fewer than one block of {seq_len}")
    blocks = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        blocks = torch.cat([torch.full((count, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


def _read_source(spec: DataSpec) -> str:
    if spec.source == BUILTIN_SAMPLE:
        return resources.files("skiptool").joinpath("data/wikitext2_sample.txt").read_text(encoding="utf-8")
    path = Path(spec.source).expanduser()
    if path.exists():
        return _read_file(path, spec.field)
    if spec.source.startswith((".", "/", "~")) or path.suffix in {".txt", ".raw", ".jsonl", ".json"}:
        raise DataError(f"data file not found: {spec.source}")
    return _read_hf_dataset(spec)


def _read_file(path: Path, field: str) -> str:
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix in {".jsonl", ".json"}:
        return _texts_from_json(raw, path, field)
    return raw.replace("\r\n", "\n")


def _texts_from_json(raw: str, path: Path, field: str) -> str:
    records: list[Any]
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc.msg}") from None
        records = data if isinstance(data, list) else [data]
    else:
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from None
    texts = [r[field] for r in records if isinstance(r, dict) and isinstance(r.get(field), str)]
    if not texts:
        raise DataError(f"{path} has no records with a string field {field!r}")
    return "\n\n".join(texts)


def _read_hf_dataset(spec: DataSpec) -> str:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{spec.source!r} is not a file; reading Hugging Face datasets needs `pip install datasets`") from None
    from datasets import load_dataset

    name, _, config = spec.source.partition(":")
    try:
        ds = load_dataset(name, config or None, split=spec.split)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load dataset {spec.source!r}: {str(exc).splitlines()[0][:200]}") from None
    if spec.field not in ds.column_names:
        raise DataError(f"dataset {spec.source!r} has no field {spec.field!r} (fields: {', '.join(ds.column_names)})")
    return "\n".join(t for t in ds[spec.field] if isinstance(t, str))
