"""The one place that knows model architectures.

Each supported family is one data row saying where a decoder layer's parts live. Everything else in
skiptool reaches a layer's attention, norms and MLP only through an :class:`ArchAdapter`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ModelLoadError


@dataclass(frozen=True)
class ArchAdapter:
    """Where the parts of a pre-norm decoder-only model live (attribute paths)."""

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # inside `attention`
    rotary_embedding: str = "model.rotary_emb"  # the RoPE module, shared by every layer
    post_attention_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    # -- model level -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return _get_path(model, self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def lm_head_module(self, model: nn.Module) -> nn.Module:
        return _get_path(model, self.lm_head)

    def embedding_module(self, model: nn.Module) -> nn.Module:
        return _get_path(model, self.embed_tokens)

    def rotary_embedding_module(self, model: nn.Module) -> nn.Module:
        return _get_path(model, self.rotary_embedding)

    # -- layer level -------------------------------------------------------------------------
    def attention_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def attention_projections_of(self, layer: nn.Module) -> tuple[nn.Module, ...]:
        """The query, key, value and output projections of a layer's attention, in that order."""
        attention = self.attention_of(layer)
        return tuple(getattr(attention, name) for name in self.attention_projections)

    def input_norm_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.input_norm)

    def post_attention_norm_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.post_attention_norm)

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def mlp_parameter_count(self, layer: nn.Module) -> int:
        return sum(p.numel() for p in self.mlp_of(layer).parameters())


# One row per family. Qwen2 and Mistral share Llama's layout (Qwen2 adds q/k/v biases, which live
# inside attention and change nothing here).
_REGISTRY: tuple[ArchAdapter, ...] = (
    ArchAdapter(family="llama", model_types=("llama",)),
    ArchAdapter(family="qwen2", model_types=("qwen2",)),
    ArchAdapter(family="mistral", model_types=("mistral",)),
)


def supported_model_types() -> list[str]:
    """All `config.model_type` values skiptool supports."""
    return sorted(t for a in _REGISTRY for t in a.model_types)


def adapter_for_model_type(model_type: str) -> ArchAdapter:
    """The adapter of a model family, or a clear error naming the unsupported family."""
    for adapter in _REGISTRY:
        if model_type in adapter.model_types:
            return adapter
    raise ModelLoadError(
        f"unsupported architecture {model_type!r}: skiptool supports {', '.join(supported_model_types())}"
    )


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter for a loaded Hugging Face model (by its `config.model_type`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ModelLoadError(f"{type(model).__name__} has no Hugging Face config; cannot tell its architecture")
    return adapter_for_model_type(model_type)


def kv_shape(config: Any) -> tuple[int, int]:
    """(KV heads, head dim) of a Hugging Face decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads), int(head_dim)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands a KV cache to a Hugging Face causal LM's forward: ``cache`` from
    transformers 5.24 (``past_key_values`` is deprecated there, removed in 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
