"""The runtime registry: name -> how to open an export folder with it, and why it cannot run here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..contract import ExportManifest, read_manifest
from ..errors import SkipToolError
from ..registry import Registry
from .base import DecodeBackend


@dataclass(frozen=True)
class RunOptions:
    """How to run an export: threads and intra-op spinning (ONNX Runtime), a forced ``skip_mask``, the longest
    sequence, and execution providers (ONNX Runtime; None: the best available)."""

    threads: int | None = None
    spin: bool | None = None
    skip_mask: Sequence[int] | None = None
    max_length: int = 2048
    providers: Sequence[str] | None = None


@dataclass(frozen=True)
class Runtime:
    """How to open an export folder in one runtime: ``open(folder, manifest, options)`` and, when it cannot
    run here, ``unavailable()`` says why (None when it can)."""

    name: str
    open: Callable[[Path, ExportManifest, RunOptions], DecodeBackend]
    unavailable: Callable[[], str | None] = lambda: None


RUNTIMES: Registry[Runtime] = Registry("runtime")


def open_export(folder: str | Path, runtime: str | None = None, **options: Any) -> DecodeBackend:
    """A decode backend over an export folder, in `runtime` (default: the manifest's first)."""
    manifest = read_manifest(folder)
    name = runtime or manifest.runtime
    if name not in manifest.runtimes:
        raise SkipToolError(f"{folder} ({manifest.target} export) runs in {', '.join(manifest.runtimes)}, not {name}")
    entry = RUNTIMES.get(name)
    reason = entry.unavailable()
    if reason is not None:
        raise SkipToolError(f"{name} cannot run {folder} here: {reason}")
    return entry.open(Path(folder), manifest, RunOptions(**options))
