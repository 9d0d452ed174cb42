"""The skip config: one versioned, validated JSON format shared by every command.

A config names the model it was made for (architecture and shape), the skip policy and its
parameters, the layers that never skip (cold start / cold end), the warm-up length, and paths
(relative to the config file) to trained router or stand-in weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import write_json_atomic

SCHEMA_VERSION = 2  # 2: stand-ins name their kind; version 1 files (linear stand-ins only) are read too
READABLE_VERSIONS = (1, 2)
CONFIG_FILENAME = "skip_config.json"


@dataclass(frozen=True)
class ModelIdentity:
    """What a config must match: architecture and shape of the model."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    source: str = ""

    @classmethod
    def of(cls, model: Any, source: str = "") -> "ModelIdentity":
        """The identity of a loaded Hugging Face model."""
        c = model.config
        return cls(c.model_type, int(c.num_hidden_layers), int(c.hidden_size), int(c.intermediate_size), source)

    def mismatches(self, other: "ModelIdentity") -> list[str]:
        """Human-readable differences in architecture or shape (the source name is not compared)."""
        out = []
        for name in ("model_type", "num_layers", "hidden_size", "intermediate_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {mine} (config) vs {theirs} (model)")
        return out


@dataclass(frozen=True)
class ArtifactRef:
    """A weights file next to the config (router or stand-in) with its size (a stand-in's rank or neurons) and
    its kind (a stand-in's: :data:`skiptool.standins.STANDIN_KINDS`; a router's: ``skiptool.policies.ROUTER_KINDS``,
    checked against the file's own when the policy loads)."""

    path: str
    rank: int | None = None
    kind: str | None = None


# calibrate's and train-router's stand-in when none is named (KIND:SIZE, see skiptool.standins): the FFN's own most
# important 1/16 of neurons (96 for SmolLM2-135M), which on WikiText-2 gave the lowest perplexity at equal FFN bytes
# saved of the kinds and sizes measured (README "Quality per byte saved"). Here, not in skiptool.standins, so the
# CLI can show it without importing torch.
DEFAULT_STANDIN = "core:auto"


@dataclass(frozen=True)
class PolicySpec:
    """A policy kind and its parameters, as stored. The kinds and their typed parameters are registered in
    :mod:`skiptool.policies` (``none``, ``static``, ``cosine``, ``router``, ``random``), which checks them when
    the policy is built (:func:`skiptool.policies.check_policy`)."""

    kind: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkipConfig:
    """A validated skip config. Build with the constructor, read with :func:`load_config`."""

    model: ModelIdentity
    policy: PolicySpec = PolicySpec()
    cold_start: int = 2
    cold_end: int = 2
    warmup: int = 32
    target_skip: float | None = None
    router: ArtifactRef | None = None
    standin: ArtifactRef | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived -----------------------------------------------------------------------------
    @property
    def skippable_layers(self) -> list[int]:
        """Layers outside the cold regions, in order."""
        return list(range(self.cold_start, self.model.num_layers - self.cold_end))

    def resolve(self, relative: str) -> Path:
        """A path from the config, resolved against the config file's directory."""
        p = Path(relative)
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def with_policy(self, kind: str, **params: Any) -> "SkipConfig":
        """A copy with another policy."""
        return replace(self, policy=PolicySpec(kind, dict(params)))

    def evolve(self, **changes: Any) -> "SkipConfig":
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    def check_matches(self, model: Any) -> None:
        """Raise :class:`ConfigError` unless this config was made for a model of this shape."""
        problems = self.model.mismatches(ModelIdentity.of(model))
        if problems:
            raise ConfigError("skip config does not match the model: " + "; ".join(problems))

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("base_dir")
        return {"schema_version": SCHEMA_VERSION, **data}

    def save(self, path: str | Path) -> Path:
        """Write the config atomically (a directory gets ``skip_config.json`` inside it)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / CONFIG_FILENAME
        return write_json_atomic(path, self.to_dict())

    def save_with_artifacts(self, folder: str | Path) -> Path:
        """Save into `folder` with the router / stand-in weight files it names copied beside it."""
        import shutil

        from .fileio import atomic_path

        folder, refs = Path(folder), {}
        for name in ("router", "standin"):
            ref: ArtifactRef | None = getattr(self, name)
            if ref is None:
                continue
            src = self.resolve(ref.path)
            if not src.is_file():
                raise ConfigError(f"the {name} weights the skip config names are missing: {src}")
            if src.resolve() != (folder / src.name).resolve():
                with atomic_path(folder / src.name, suffix=src.suffix) as tmp:
                    shutil.copyfile(src, tmp)
            refs[name] = replace(ref, path=src.name)
        return replace(self, base_dir=folder.resolve(), **refs).save(folder)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "SkipConfig":
        if not isinstance(data, dict):
            raise ConfigError("skip config must be a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ConfigError(f"unsupported skip config schema_version {version!r} (this skiptool reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
        known = {"schema_version", "model", "policy", "cold_start", "cold_end", "warmup", "target_skip",
                 "router", "standin", "metadata"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown skip config keys: {', '.join(unknown)}")
        try:
            return cls(
                model=ModelIdentity(**_require(data, "model", dict)),
                policy=PolicySpec(**data.get("policy", {"kind": "none"})),
                cold_start=data.get("cold_start", 2),
                cold_end=data.get("cold_end", 2),
                warmup=data.get("warmup", 32),
                target_skip=data.get("target_skip"),
                router=_artifact(data.get("router")),
                standin=_artifact(data.get("standin")),
                metadata=data.get("metadata", {}),
                base_dir=base_dir,
            )
        except TypeError as exc:  # wrong or missing fields in a nested object
            raise ConfigError(f"malformed skip config: {exc}") from None


def load_config(path: str | Path) -> SkipConfig:
    """Read and validate a skip config file (or a directory holding ``skip_config.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"skip config not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"skip config {path} is not UTF-8 text (a skip_config.json written by skiptool is)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read skip config {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"skip config {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    return SkipConfig.from_dict(data, base_dir=path.parent.resolve())


def check_warmup_fits(warmup: int, seq_len: int) -> None:
    """One clear error line unless sequences of `seq_len` tokens reach past a warm-up of `warmup` positions (the
    positions that never skip): calibration, training and evaluation would have no token to learn from or skip."""
    if warmup >= seq_len:
        raise ConfigError(f"the warm-up ({warmup} positions, which never skip) must be shorter than the sequences "
                          f"({seq_len} tokens): use a longer --seq-len or a shorter warm-up")


def dense_config(model: Any, source: str = "", cold_start: int = 2, cold_end: int = 2, warmup: int = 32) -> SkipConfig:
    """A config for `model` that never skips (the starting point of calibration)."""
    return SkipConfig(model=ModelIdentity.of(model, source), cold_start=cold_start, cold_end=cold_end, warmup=warmup)


# -- validation ----------------------------------------------------------------------------------
def _require(data: dict, key: str, typ: type) -> Any:
    value = data.get(key)
    if not isinstance(value, typ):
        raise ConfigError(f"skip config needs {key!r} as a {typ.__name__}")
    return value


def _artifact(value: Any) -> ArtifactRef | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise ConfigError("router/standin entries need a 'path' string")
    return ArtifactRef(**value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(cfg: SkipConfig) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "intermediate_size"):
        if not _is_int(getattr(m, name)) or getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} must be a positive integer")
    for name in ("cold_start", "cold_end", "warmup"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be a non-negative integer")
    if cfg.cold_start + cfg.cold_end >= m.num_layers:
        raise ConfigError(f"cold_start + cold_end ({cfg.cold_start} + {cfg.cold_end}) leaves no skippable layer "
                          f"of {m.num_layers}")
    if cfg.target_skip is not None and not (isinstance(cfg.target_skip, (int, float)) and 0 <= cfg.target_skip < 1):
        raise ConfigError("target_skip must be a number in [0, 1)")
    if not isinstance(cfg.policy.kind, str) or not cfg.policy.kind:
        raise ConfigError("policy.kind must be a non-empty string")
    if not isinstance(cfg.policy.params, dict):
        raise ConfigError("policy.params must be an object")
    if not isinstance(cfg.metadata, dict):
        raise ConfigError("metadata must be an object")
    for ref in (cfg.router, cfg.standin):
        if ref is not None and ref.rank is not None and (not _is_int(ref.rank) or ref.rank <= 0):
            raise ConfigError("artifact rank must be a positive integer")
        if ref is not None and ref.kind is not None and (not isinstance(ref.kind, str) or not ref.kind):
            raise ConfigError("artifact kind must be a non-empty string")
