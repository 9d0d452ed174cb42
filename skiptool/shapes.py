"""Llama-shaped models with random weights: decode speed depends on a model's shape, never on its weight values.

Where no checkpoint can travel (the GPU machine has no model hub), skiptool builds Hugging Face causal LMs of real
models' shapes — a name from :data:`SHAPES`, or any Llama-shaped ``config.json`` — directly on the device, in the
wanted dtype, with random normal weights. ``load_model("random:8b")`` is the way in (:mod:`skiptool.models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

INIT_STD = 0.02  # Llama's initializer_range: activations stay in a sane range through many layers


@dataclass(frozen=True)
class LlamaShape:
    """The numbers that make a Llama-shaped model (head size = hidden / heads)."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_positions: int = 2048


LLAMA3_SCALING = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)

SHAPES: dict[str, LlamaShape] = {s.name: s for s in (
    LlamaShape("tiny", 6, 64, 128, 4, 2, 256, False, 10000.0, max_positions=256),
    LlamaShape("demo", 30, 576, 1536, 9, 3, 49152, True, 100000.0, max_positions=8192),  # SmolLM2-135M
    LlamaShape("1b", 16, 2048, 8192, 32, 8, 128256, True, 500000.0,  # Llama-3.2-1B
               rope_scaling=dict(LLAMA3_SCALING, factor=32.0), max_positions=131072),
    LlamaShape("8b", 32, 4096, 14336, 32, 8, 128256, False, 500000.0,  # Llama-3.1-8B
               rope_scaling=dict(LLAMA3_SCALING, factor=8.0), max_positions=131072),
)}


def shape_named(name: str) -> LlamaShape:
    """The shape called `name`, or a one-line error listing the known ones."""
    if name not in SHAPES:
        raise ModelLoadError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    return SHAPES[name]


def llama_config(shape: LlamaShape) -> Any:
    """A Hugging Face ``LlamaConfig`` of this shape (RoPE given the pre-5.x way, which 5.x still reads)."""
    from transformers import LlamaConfig

    extra = {"rope_scaling": dict(shape.rope_scaling)} if shape.rope_scaling else {}
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                       tie_word_embeddings=shape.tied_embeddings, rope_theta=shape.rope_theta, **extra)


def random_model_config(spec: str) -> Any:
    """The Hugging Face config a random model is built from: `spec` names a shape of :data:`SHAPES`, or is the
    path of a ``config.json`` (or of the folder holding one). Its architecture is checked by the caller."""
    if spec in SHAPES:
        return llama_config(SHAPES[spec])
    path = Path(spec).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ModelLoadError(f"random:{spec} is neither a known shape ({', '.join(SHAPES)}) nor a config.json file")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here is a user-facing load error
        raise ModelLoadError(f"cannot read model config {path}: {str(exc).strip().splitlines()[0][:300]}") from None


def build_random_model(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> nn.Module:
    """A causal LM of Hugging Face `config` with N(0, 0.02²) weights, built on `device` in `dtype`.

    Parameters are created on the device in the target dtype (no fp32 copy on the host, no transfer), then
    drawn in place; eval mode, gradients off. RMSNorm weights keep Hugging Face's ones.
    """
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    randomize_weights(model, seed)
    return model.eval().requires_grad_(False)


def build_random_llama(shape: LlamaShape | str, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of `shape` (a :class:`LlamaShape` or its name) with random weights."""
    shape = shape_named(shape) if isinstance(shape, str) else shape
    return build_random_model(llama_config(shape), device, dtype, seed)


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int) -> None:
    """Draw every Linear and Embedding weight from N(0, INIT_STD²), reproducibly for a seed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, INIT_STD, generator=generator)
