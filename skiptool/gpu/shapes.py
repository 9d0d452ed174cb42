"""Llama shapes with random weights: decode speed depends on a model's shape, never on its weight values.

The GPU machine has no model hub, so the benchmark builds Hugging Face ``LlamaForCausalLM`` models of real
models' shapes (:data:`SHAPES`) directly on the device, in the wanted dtype, with random normal weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

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
        raise ConfigError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    return SHAPES[name]


def llama_config(shape: LlamaShape) -> Any:
    """A Hugging Face ``LlamaConfig`` of this shape (RoPE given the pre-5.x way, which 5.x still reads)."""
    from transformers import LlamaConfig

    extra = {"rope_scaling": dict(shape.rope_scaling)} if shape.rope_scaling else {}
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                       tie_word_embeddings=shape.tied_embeddings, rope_theta=shape.rope_theta, **extra)


def build_random_llama(shape: LlamaShape | str, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of `shape` with N(0, 0.02²) weights, built on `device` in `dtype`.

    Parameters are created on the device in the target dtype (no fp32 copy on the host, no transfer), then
    drawn in place; eval mode, gradients off. RMSNorm weights keep Hugging Face's ones.
    """
    from transformers import LlamaForCausalLM

    shape = shape_named(shape) if isinstance(shape, str) else shape
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    randomize_weights(model, seed)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int) -> None:
    """Draw every Linear and Embedding weight from N(0, INIT_STD²), reproducibly for a seed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, INIT_STD, generator=generator)
