"""The contract between exporters and runtimes: graph I/O names, file names and the export manifest.

Exporters write folders that runtimes (skiptool's backends, onnxruntime-genai, TensorRT) read; both sides
import this module and never each other.

**I/O names** follow Hugging Face Optimum and onnxruntime-genai so existing tools recognise the graph:
``input_ids``, ``attention_mask``, ``position_ids`` (int64), ``past_key_values.{i}.key/.value``
(``[batch, kv_heads, past_len, head_dim]``) in; ``logits`` and ``present.{i}.key/.value`` out. skiptool adds an
optional ``skip_mask`` input (int64 ``[num_layers]``: 1 force skip, -1 force compute, 0 follow the policy; an
all-zeros initializer backs it, so it may be omitted) and a ``skip_decisions`` output (bool
``[num_layers, batch, seq]``: which FFNs were skipped, per token; cold layers all false). A graph made from
onnxruntime-genai's builder (``export --format ort``) has no ``position_ids`` input: positions come from the
attention mask there.

**The export manifest** (``skiptool_export.json``) is one typed, versioned record of what a folder holds:
:class:`ExportManifest`, written by :func:`write_manifest` and read by :func:`read_manifest` and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SkipToolError
from .fileio import write_json_atomic

# -- graph I/O names ------------------------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
SKIP_MASK = "skip_mask"
LOGITS = "logits"
SKIP_DECISIONS = "skip_decisions"

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
PRESENT = "present_sequence_length"

# -- file names in an export folder ------------------------------------------------------------------
MODEL_FILE = "model.onnx"
OVERRIDE_MODEL_FILE = "model.skip_mask.onnx"  # onnxruntime-genai's variant: skip_mask a required input
ENGINE_FILE = "model.engine"
MANIFEST_FILE = "skiptool_export.json"
GENAI_CONFIG_FILE = "genai_config.json"


@dataclass(frozen=True)
class GraphIO:
    """Names and dynamic axes of a decoder graph with `num_layers` layers."""

    num_layers: int

    def past_names(self) -> list[str]:
        """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
        return [n % i for i in range(self.num_layers) for n in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [n % i for i in range(self.num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]

    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.past_names(), SKIP_MASK]

    def output_names(self) -> list[str]:
        return [LOGITS, *self.present_names(), SKIP_DECISIONS]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Optimum-style dynamic axes of every input and output (``skip_mask`` has none)."""
        axes: dict[str, dict[int, str]] = {
            INPUT_IDS: {0: BATCH, 1: SEQUENCE},
            ATTENTION_MASK: {0: BATCH, 1: TOTAL},
            POSITION_IDS: {0: BATCH, 1: SEQUENCE},
            LOGITS: {0: BATCH, 1: SEQUENCE},
            SKIP_DECISIONS: {1: BATCH, 2: SEQUENCE},
        }
        axes.update({name: {0: BATCH, 2: PAST} for name in self.past_names()})
        axes.update({name: {0: BATCH, 2: PRESENT} for name in self.present_names()})
        return axes


def genai_io() -> dict[str, dict[str, str]]:
    """The ``inputs`` / ``outputs`` sections of onnxruntime-genai's ``genai_config.json``."""
    return {
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }


# -- the export manifest ------------------------------------------------------------------------------
MANIFEST_VERSION = 1
MODES = ("skip", "dense")


@dataclass(frozen=True)
class ExportManifest:
    """What an export folder holds and how to run it (``skiptool_export.json``).

    `target` is the export target that wrote it (``onnx``, ``ort``, ``tensorrt``); `runtimes` the runtimes
    that can run it, the default first (``onnxruntime``, ``onnxruntime-genai``, ``tensorrt``). `file` is the
    graph, relative to the folder. `checks` holds the export's self-checks (parity reports by name).
    """

    target: str
    runtimes: tuple[str, ...]
    file: str
    precision: str  # fp32 / fp16 / int8 / int4
    mode: str  # "skip" (an If per skippable FFN) or "dense"
    policy: str  # the config's policy kind, or "dense"
    source: str  # the model it was exported from
    num_layers: int
    skippable_layers: tuple[int, ...]
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    if_count: int
    has_position_ids: bool = True
    checks: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    schema_version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SkipToolError(f"export manifest: mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if not self.runtimes:
            raise SkipToolError("export manifest: no runtime named")

    @property
    def io(self) -> GraphIO:
        return GraphIO(self.num_layers)

    @property
    def runtime(self) -> str:
        """The default runtime."""
        return self.runtimes[0]

    def replace(self, **changes: Any) -> "ExportManifest":
        from dataclasses import replace

        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}


_TUPLES = {"runtimes", "skippable_layers", "eos_token_ids", "files"}


def manifest_from_dict(data: Any, where: str = MANIFEST_FILE) -> ExportManifest:
    """An :class:`ExportManifest` from parsed JSON, or one clear :class:`SkipToolError` line."""
    if not isinstance(data, dict):
        raise SkipToolError(f"{where} is not a JSON object")
    version = data.get("schema_version")
    if version != MANIFEST_VERSION:
        hint = "re-export it with this skiptool" if not isinstance(version, int) or version < MANIFEST_VERSION \
            else "it was written by a newer skiptool"
        raise SkipToolError(f"{where} has schema_version {version!r}, this skiptool reads {MANIFEST_VERSION}: {hint}")
    names = {f.name for f in fields(ExportManifest)}
    required = {f.name for f in fields(ExportManifest) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise SkipToolError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise SkipToolError(f"{where} has unknown keys {', '.join(unknown)}")
    values = {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in data.items()}
    _check_types(values, where)
    return ExportManifest(**values)


def _check_types(values: dict[str, Any], where: str) -> None:
    ints = ("num_layers", "num_key_value_heads", "head_dim", "vocab_size", "if_count", "schema_version")
    strs = ("target", "file", "precision", "mode", "policy", "source")
    for key in ints:
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            raise SkipToolError(f"{where}: {key} must be an integer")
    for key in strs:
        if not isinstance(values[key], str):
            raise SkipToolError(f"{where}: {key} must be a string")
    for key in _TUPLES & set(values):
        if not isinstance(values[key], tuple):
            raise SkipToolError(f"{where}: {key} must be a list")
    if not isinstance(values.get("checks", {}), dict):
        raise SkipToolError(f"{where}: checks must be an object")


def write_manifest(folder: str | Path, manifest: ExportManifest) -> Path:
    """Write ``skiptool_export.json`` into `folder` atomically."""
    return write_json_atomic(Path(folder) / MANIFEST_FILE, manifest.to_dict())


def is_export(folder: str | Path) -> bool:
    """Whether `folder` holds a skiptool export manifest."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path) -> ExportManifest:
    """The manifest of an export folder, or one clear error line for anything else."""
    path = Path(folder) / MANIFEST_FILE
    if Path(folder).exists() and not Path(folder).is_dir():
        raise SkipToolError(f"{folder} is a file, not an export folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SkipToolError(f"{folder} is not a skiptool export (no {MANIFEST_FILE}); run `skiptool export -o DIR` "
                            "first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SkipToolError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SkipToolError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    return manifest_from_dict(data, str(path))
