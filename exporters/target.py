"""Export targets: what ``skiptool export --format NAME`` can write, registered by name.

A target is one module with an export function ``(ExportRequest, progress) -> ExportReport`` registered in
:data:`EXPORT_TARGETS`. Every target writes one folder (all or nothing) with the graph, the skip config, the
tokenizer and the export manifest (:mod:`skiptool.contract`), and checks what it wrote before it returns:
an export whose parity with the PyTorch skip runtime is outside its documented tolerance fails and leaves
nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from skiptool.contract import ExportManifest
from skiptool.errors import SkipToolError
from skiptool.registry import Registry

Progress = Callable[[str], None]
QUANTIZE = ("none", "int8", "int4")
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportRequest:
    """What ``skiptool export`` was asked: the model, the skip config (None: dense with the default cold
    layers), the folder, and the precision."""

    source: str
    out_dir: Path
    config_path: Path | None = None
    quantize: str = "none"  # none, int8, int4
    dtype: str = "fp32"  # fp32, fp16
    dense: bool = False  # the same exporter without any If: the dense baseline
    parity_steps: int = 32

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.quantize, QUANTIZE, "--quantize"), (self.dtype, DTYPES, "--dtype")):
            if value not in allowed:
                raise SkipToolError(f"{what} must be one of {', '.join(allowed)} (got {value!r})")
        if self.quantize != "none" and self.dtype != "fp32":
            raise SkipToolError("--quantize int8/int4 starts from the fp32 graph; use it with --dtype fp32")
        if self.parity_steps < 1:
            raise SkipToolError(f"--parity-steps must be at least 1 (got {self.parity_steps})")


@dataclass
class ExportReport:
    """What an export wrote and checked: its manifest, and target-specific details (op counts, sizes)."""

    out_dir: Path
    manifest: ExportManifest
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "manifest": self.manifest.to_dict(), "details": self.details,
                "seconds": self.seconds}


@dataclass(frozen=True)
class ExportTarget:
    """One ``--format``: its name, a one-line summary for ``--help``, and its export function."""

    name: str
    summary: str
    export: Callable[[ExportRequest, Progress], ExportReport]


EXPORT_TARGETS: Registry[ExportTarget] = Registry("export format")


def run_export(fmt: str, request: ExportRequest, progress: Progress | None = None) -> ExportReport:
    """Export with the target named `fmt` (the request's paths and skip config checked before any work)."""
    target = EXPORT_TARGETS.get(fmt)
    check_request_files(request)
    return target.export(request, progress or (lambda _message: None))


def check_request_files(request: ExportRequest) -> None:
    """One clear error line, before the model loads, for an output folder that cannot be written or a skip config
    that cannot be read or whose policy is malformed (whether it fits the model is checked once the model is
    loaded)."""
    from skiptool.config import load_config
    from skiptool.fileio import check_output_dir
    from skiptool.policies import check_policy

    check_output_dir(request.out_dir)
    if request.config_path is not None:
        check_policy(load_config(request.config_path))
