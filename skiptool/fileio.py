"""Atomic file output: work in a temporary place beside the target, then rename it into place.

Nothing is created at the target — not even its folder — until the output is complete, so a failed command
leaves no empty folders and no half-written files: :func:`check_output_dir` fails early on a path that cannot
be written, :func:`atomic_path` renames one finished file into place, :func:`atomic_directory` moves a
finished set of files into a folder together.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, SkipToolError


def cache_root() -> Path:
    """Where skiptool caches converted models and builds (``$SKIPTOOL_CACHE`` or ``~/.cache/skiptool``)."""
    return Path(os.environ.get("SKIPTOOL_CACHE", Path.home() / ".cache" / "skiptool"))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: str | Path) -> Path:
    """Fail early, creating nothing, unless `path` is a directory that exists or could be created and written;
    returns the nearest existing folder at or above it (where temporary output can live)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SkipToolError(f"output path {str(path)!r} exists and is not a directory")
    existing = _existing_ancestor(path)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SkipToolError(f"output directory {str(path)!r} is not writable")
    return existing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to `target` (its folder created then), on error
    removed."""
    target = Path(target)
    scratch = check_output_dir(target.parent)
    fd, tmp = tempfile.mkstemp(dir=scratch, prefix=f".{target.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `target` atomically."""
    return write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success its files are moved into `target` (created then).

    Files already in `target` that the new output does not contain are left alone; a failure leaves `target`
    exactly as it was (and does not create it).
    """
    target = Path(target)
    scratch = check_output_dir(target)
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix=".skiptool-tmp-"))
    try:
        yield tmp
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = target / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors_atomic(target: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write tensors (with string metadata) as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(target, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(target)


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing or unreadable file is a :class:`ConfigError` naming `what`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise ConfigError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None
