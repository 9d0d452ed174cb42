"""onnxruntime-genai's model builder, run once per model and precision and cached.

The builder writes the fastest dense decoder graph ONNX Runtime has (GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits for int4) with its ``genai_config.json`` and tokenizer. Both the
``ort`` export target (which adds skipping to that graph) and the onnxruntime-genai benchmark peer (which runs
it as it is) take it from here. Builds are cached under ``$SKIPTOOL_CACHE/genai`` keyed by the Hugging Face
directory's files, the precision and the builder's version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .contract import GENAI_CONFIG_FILE, MODEL_FILE
from .errors import MissingDependencyError, SkipToolError
from .fileio import cache_root

PRECISIONS = ("fp32", "int8", "int4")
INSTALL = "pip install onnxruntime-genai  (or: pip install 'skiptool[compare]')"


def builder_version() -> str:
    """The installed onnxruntime-genai version, or one clear error line when it is missing."""
    from importlib import metadata

    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(f"onnxruntime-genai's model builder is not installed: {INSTALL}") from None


def genai_model_dir(hf_dir: str | Path, precision: str) -> Path:
    """The builder's output for `hf_dir` at `precision` (``fp32``, ``int8``, ``int4``; CPU), built once."""
    if precision not in PRECISIONS:
        raise SkipToolError(f"onnxruntime-genai precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    hf_dir = Path(hf_dir).resolve()
    target = cache_root() / "genai" / f"{hf_dir.name}-{_stamp(hf_dir, precision)}-{precision}"
    if (target / GENAI_CONFIG_FILE).is_file() and (target / MODEL_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _run_builder(hf_dir, scratch / "out", scratch / "cache", precision)
        if not target.exists():  # another process may have built it meanwhile
            os.replace(scratch / "out", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _stamp(hf_dir: Path, precision: str) -> str:
    files = sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("*.json"))
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.is_file()]
    key = ":".join([str(hf_dir), precision, builder_version(), *parts])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _run_builder(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / GENAI_CONFIG_FILE).is_file():
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise SkipToolError(f"onnxruntime-genai's model builder failed ({precision}): "
                            f"{lines[-1][:300] if lines else f'exit code {done.returncode}'}")


def copy_genai_model(hf_dir: str | Path, precision: str, out_dir: str | Path) -> Path:
    """Copy the cached build into `out_dir` (to be edited there); returns the graph's path."""
    source, out = genai_model_dir(hf_dir, precision), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copyfile(item, out / item.name)
    return out / MODEL_FILE
