"""Atomic file output: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, SkipToolError


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if needed and check that files can be created in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".skiptool-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise SkipToolError(f"output directory {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return path


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`, on error removed."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """Yield a temporary directory beside `target`; on success its files are moved into `target`.

    Files already in `target` that the new output does not contain are left alone; a failure
    leaves `target` exactly as it was.
    """
    target = Path(target)
    ensure_writable_dir(target)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".skiptool-tmp-"))
    try:
        yield tmp
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
