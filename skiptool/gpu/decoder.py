"""A static-KV-cache decode engine for Llama-shaped Hugging Face models, with FFN skipping decided on the device.

The engine runs the model's own modules (norms, projections, MLP; no weight is copied) in its own loop, after
gpt-fast: a preallocated KV cache, RoPE tables for every position, attention through
``scaled_dot_product_attention`` with an explicit mask, and static input buffers (token ids, position), so that
one decode step can be captured as ONE CUDA graph and replayed. It is independent of Hugging Face's cache API.

Decisions come from the policy itself (``init_state`` / ``decide`` / ``update``, as :class:`~skiptool.runtime.SkipLayer`
asks them), computed on the device. What happens to the FFN depends on the mode:

- ``dense``: the plain MLP everywhere, no policy (the baseline);
- ``device``: :func:`~skiptool.gpu.kernels.skippable_ffn` reads the decisions from device memory (Triton on CUDA),
  nothing goes to the host, the whole step is one graph;
- ``host``: each skippable layer's all-skip flag is read on the host and Python picks the branch, as ONNX Runtime's
  and TensorRT's ``If`` do. On CUDA the segments between two reads are captured as graphs ("pieces"), each branch
  as a graph of its own, so what is measured is the host round trip, not Python's launch overhead.

Prefill runs eagerly; in ``device``/``host`` mode only the rows that need a skippable FFN go through it.
Skip counters stay on the device and are read once (:meth:`DecodeEngine.skip_summary`). On the CPU the same engine
runs eagerly with the reference kernels (the tests compare it with the PyTorch eager runtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..errors import ConfigError
from ..policies import LayerSignals, SkipPolicy
from .kernels import (gathered_skippable_ffn, kernel_backend, reference_skippable_ffn, skippable_ffn,
                      substitute_output)
from .weights import FFNWeights, SubstituteWeights

FFN_MODES = ("dense", "device", "host")
CACHE_ALIGNMENT = 16  # cache length rounded up to this: SDPA's masked kernels want aligned key lengths


@dataclass
class LayerParts:
    """What the engine calls in one decoder layer: the model's own modules, and the FFN in the kernels' form."""

    index: int
    input_norm: nn.Module
    projections: tuple[nn.Module, ...]  # q, k, v, o
    post_norm: nn.Module
    mlp: nn.Module
    ffn: FFNWeights
    substitute: SubstituteWeights | None
    skippable: bool

    @classmethod
    def of(cls, layer: nn.Module, index: int, adapter: ArchAdapter, skippable: bool, activation: str,
           substitute: nn.Module | None) -> "LayerParts":
        mlp = adapter.mlp_of(layer)
        weight = next(mlp.parameters())
        return cls(index, adapter.input_norm_of(layer), adapter.attention_projections_of(layer),
                   adapter.post_attention_norm_of(layer), mlp, FFNWeights.of(mlp, adapter, activation),
                   SubstituteWeights.of(substitute, weight.dtype, weight.device), skippable)


class StaticKVCache:
    """Every layer's keys and values for `batch` sequences of up to `max_len` positions, allocated once (fixed
    addresses: what a CUDA graph needs). Attention reads all `max_len` positions; a mask hides the unwritten ones."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, positions: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``[batch, kv_heads, len(positions), head_dim]`` keys and values at `positions`; the layer's cache."""
        self.keys[layer].index_copy_(2, positions, keys)
        self.values[layer].index_copy_(2, positions, values)
        return self.keys[layer], self.values[layer]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class SkipCounters:
    """Skipped tokens and avoided FFN calls per layer, kept on the device (no sync per step), read once."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.skipped_tokens = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.avoided_calls = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.tokens = self.forwards = 0

    def add(self, decisions: Tensor) -> None:
        """Count one forward pass's ``[layers, batch, seq]`` decisions (device ops only)."""
        self.skipped_tokens += decisions.sum((1, 2))
        self.avoided_calls += decisions.flatten(1).all(1)

    def count_forward(self, tokens: int) -> None:
        self.tokens += tokens
        self.forwards += 1

    def reset(self) -> None:
        self.skipped_tokens.zero_()
        self.avoided_calls.zero_()
        self.tokens = self.forwards = 0

    def summary(self) -> dict[str, Any]:
        """Ratios over ALL layers (as the eager runtime counts): of (layer, token) pairs skipped, and of (layer,
        forward) FFN calls avoided because every row skipped — what saves weight reads in memory-bound decode."""
        skipped, avoided = torch.stack([self.skipped_tokens, self.avoided_calls]).cpu().tolist()
        tokens, forwards = self.tokens * self.num_layers, self.forwards * self.num_layers
        return {"skip_ratio": sum(skipped) / tokens if tokens else 0.0,
                "call_skip_ratio": sum(avoided) / forwards if forwards else 0.0,
                "per_layer": [s / self.tokens if self.tokens else 0.0 for s in skipped],
                "ffn_calls": forwards - sum(avoided), "ffn_calls_avoided": sum(avoided),
                "tokens": self.tokens, "forwards": self.forwards}


Op = Callable[[SimpleNamespace], None]  # one step of a forward pass, reading and writing the pass's carry


@dataclass
class HostBranch:
    """A skippable layer's FFN in host mode: its all-skip flag is read on the host, then one branch runs."""

    skip: Op
    compute: Op


class DecodeEngine:
    """Prefill and greedy decode of `batch_size` equal-length sequences of up to `max_len` tokens.

    ``prefill(ids)`` fills the cache (eager); ``capture()`` turns the decode step into CUDA graph(s) (CUDA only);
    ``step(tokens)`` decodes one token per sequence and returns the logits (a buffer the next step overwrites).
    The cache holds `max_len` positions, rounded up to a multiple of :data:`CACHE_ALIGNMENT`.
    `override` (per layer: 1 force skip, -1 force compute, 0 policy) is fixed for the engine's life.
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy, *, batch_size: int, max_len: int,
                 mode: str = "device", substitutes: dict[int, nn.Module] | None = None,
                 override: Sequence[int] | Tensor | None = None) -> None:
        layers = _unwrapped_layers(model, adapter)
        if mode not in FFN_MODES:
            raise ConfigError(f"unknown FFN mode {mode!r} (expected one of {', '.join(FFN_MODES)})")
        if policy.num_layers != len(layers):
            raise ConfigError(f"policy is for {policy.num_layers} layers, model has {len(layers)}")
        weight = next(model.parameters())
        self.device, self.dtype, self.mode = weight.device, weight.dtype, mode
        self.batch_size, self.max_len = batch_size, -(-max_len // CACHE_ALIGNMENT) * CACHE_ALIGNMENT
        self.policy = policy.to(self.device)
        self.override = None if override is None else torch.as_tensor(override, dtype=torch.int64).to(self.device)
        config = model.config
        self.layers = [LayerParts.of(layer, i, adapter, policy.is_skippable(i), config.hidden_act,
                                     (substitutes or {}).get(i)) for i, layer in enumerate(layers)]
        self.embed, self.lm_head = adapter.embedding_module(model), adapter.lm_head_module(model)
        self.final_norm = attrgetter(adapter.final_norm)(model)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = getattr(adapter.attention_of(layers[0]), "scaling", self.head_dim ** -0.5)
        self.rope_cos, self.rope_sin = rope_tables(adapter.rotary_embedding_module(model), self.max_len, self.dtype,
                                                   self.device)
        self.key_positions = torch.arange(self.max_len, device=self.device)
        self.cache = StaticKVCache(len(layers), batch_size, self.kv_heads, self.max_len, self.head_dim, self.dtype,
                                   self.device)
        self.counters = SkipCounters(len(layers), self.device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.int64, device=self.device)
        self.position = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.decode_decisions = torch.zeros(len(layers), batch_size, 1, dtype=torch.bool, device=self.device)
        self.all_skip = torch.zeros((), dtype=torch.bool, device=self.device)  # the latest layer's, for host reads
        self.next_tokens = self.tokens.view(-1)
        self.last_decisions = self.decode_decisions
        self.length = 0
        self.graphed: str | None = None  # "whole" (one graph per step) or "pieces" (host mode), once captured
        self._decode_ops = self._ops(decode=True)
        self._replay: Callable[[], None] | None = None
        self._graph_carry: SimpleNamespace | None = None

    # -- public ----------------------------------------------------------------------------------
    @property
    def kernel_backend(self) -> str:
        """What runs the skippable FFNs of a decode step: "triton", or "torch" (plain PyTorch ops)."""
        return kernel_backend(self.device) if self.mode == "device" else "torch"

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompts ``[batch, seq]`` from position 0 (eager) and return their logits ``[batch, seq, vocab]``."""
        batch, seq = input_ids.shape
        if batch != self.batch_size or seq >= self.max_len:
            raise ConfigError(f"prefill needs {self.batch_size} prompts shorter than {self.max_len} tokens "
                              f"(got {batch} of {seq})")
        decisions = torch.zeros(len(self.layers), batch, seq, dtype=torch.bool, device=self.device)
        carry = SimpleNamespace(tokens=input_ids.to(self.device), cache_positions=self.key_positions[:seq],
                                decisions=decisions)
        self._run(self._ops(decode=False), carry)
        self._finish_forward(carry, seq)
        self.length = seq
        return carry.logits

    @torch.no_grad()
    def step(self, tokens: Tensor | None = None) -> Tensor:
        """Decode one position: `tokens` ``[batch]`` (default: the previous step's greedy choice). Returns the
        logits ``[batch, vocab]``, valid until the next step."""
        if self.length >= self.max_len:
            raise ConfigError(f"the cache holds {self.max_len} positions; all are used")
        self.tokens.copy_((self.next_tokens if tokens is None else tokens).view(self.batch_size, 1))
        self.position.fill_(self.length)
        if self._replay is not None:
            self._replay()
            carry = self._graph_carry
        else:
            carry = self._decode_carry()
            self._run(self._decode_ops, carry)
        self._finish_forward(carry, 1)
        self.length += 1
        return carry.logits[:, -1]

    def rewind(self, length: int) -> None:
        """Continue decoding from position `length` (the cache after it is overwritten)."""
        self.length = length

    @torch.no_grad()
    def capture(self) -> bool:
        """Capture the decode step as CUDA graph(s): one for ``dense``/``device``, pieces between the host reads
        for ``host``. Warms up first (two eager steps at the current position, which the next step rewrites).
        Returns False on a CPU (the engine stays eager)."""
        if self.device.type != "cuda":
            return False
        if self.length >= self.max_len:
            raise ConfigError("capture needs a free cache position to warm up on")
        self.position.fill_(self.length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self._decode_ops, self._decode_carry())
        torch.cuda.current_stream().wait_stream(side)
        self._capture_graphs()
        return True

    def skip_summary(self) -> dict[str, Any]:
        """The counters since construction or the last :meth:`reset_counters` (one device read)."""
        return self.counters.summary()

    def reset_counters(self) -> None:
        self.counters.reset()

    # -- one forward pass as a list of ops -------------------------------------------------------
    def _ops(self, decode: bool) -> list[Op | HostBranch]:
        ops: list[Op | HostBranch] = [self._begin]
        for part in self.layers:
            decide = [] if self.mode == "dense" else [partial(self._decide, part)]
            ops += [partial(self._attend, part), *decide, self._ffn_op(part, decode), partial(self._finish, part)]
        return ops + [self._end]

    def _ffn_op(self, part: LayerParts, decode: bool) -> Op | HostBranch:
        if self.mode == "dense" or not part.skippable:
            return partial(self._dense_ffn, part)
        if not decode:
            return partial(self._gathered_ffn, part)
        if self.mode == "device":
            return partial(self._device_ffn, part)
        return HostBranch(partial(self._substitute_ffn, part), partial(self._merged_ffn, part))

    def _begin(self, c: SimpleNamespace) -> None:
        batch, seq = c.tokens.shape
        c.positions = c.cache_positions.expand(batch, seq)
        c.h = self.embed(c.tokens)
        c.cos, c.sin = self.rope_cos[c.positions].unsqueeze(1), self.rope_sin[c.positions].unsqueeze(1)
        causal = self.key_positions <= c.cache_positions[:, None]
        c.mask = causal.repeat(self.heads // self.kv_heads, 1)[None, None]  # rows: (query group, position)
        c.no_skip = torch.zeros(batch, seq, dtype=torch.bool, device=self.device)
        c.state = None if self.mode == "dense" else self.policy.init_state(c.h)

    def _attend(self, part: LayerParts, c: SimpleNamespace) -> None:
        q_proj, k_proj, v_proj, o_proj = part.projections
        a = part.input_norm(c.h)
        batch, seq, _ = a.shape
        q = _rotate(_split_heads(q_proj(a), self.heads, self.head_dim), c.cos, c.sin)
        k = _rotate(_split_heads(k_proj(a), self.kv_heads, self.head_dim), c.cos, c.sin)
        keys, values = self.cache.write(part.index, c.cache_positions, k, _split_heads(v_proj(a), self.kv_heads,
                                                                                        self.head_dim))
        out = grouped_query_attention(q, keys, values, c.mask, self.scale)
        c.attn_delta = o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
        c.h_mid = c.h + c.attn_delta
        c.x = part.post_norm(c.h_mid)

    def _decide(self, part: LayerParts, c: SimpleNamespace) -> None:
        if not part.skippable:
            c.skip = c.no_skip
            return
        signals = LayerSignals(part.index, c.h, c.attn_delta, c.h_mid, c.x)
        c.skip = self.policy.decide(signals, c.positions, c.state, self.override)
        c.decisions[part.index].copy_(c.skip)
        if self.mode == "host":
            torch.all(c.skip, out=self.all_skip)

    def _dense_ffn(self, part: LayerParts, c: SimpleNamespace) -> None:
        c.delta = part.mlp(c.x)

    def _gathered_ffn(self, part: LayerParts, c: SimpleNamespace) -> None:
        c.delta = gathered_skippable_ffn(c.x, part.ffn, c.skip, part.substitute)

    def _device_ffn(self, part: LayerParts, c: SimpleNamespace) -> None:
        c.delta = skippable_ffn(c.x, part.ffn, c.skip, part.substitute)

    def _substitute_ffn(self, part: LayerParts, c: SimpleNamespace) -> None:
        c.delta = substitute_output(c.x, part.substitute)

    def _merged_ffn(self, part: LayerParts, c: SimpleNamespace) -> None:
        c.delta = reference_skippable_ffn(c.x, part.ffn, c.skip, part.substitute)

    def _finish(self, part: LayerParts, c: SimpleNamespace) -> None:
        if self.mode != "dense":
            c.state = self.policy.update(part.index, c.h_mid, c.delta, c.skip, c.state)
        c.h = c.h_mid + c.delta

    def _end(self, c: SimpleNamespace) -> None:
        c.logits = self.lm_head(self.final_norm(c.h))
        c.next_tokens = c.logits[:, -1].argmax(-1)
        if self.mode != "dense":
            self.counters.add(c.decisions)

    # -- running and capturing -------------------------------------------------------------------
    def _decode_carry(self) -> SimpleNamespace:
        return SimpleNamespace(tokens=self.tokens, cache_positions=self.position, decisions=self.decode_decisions)

    def _run(self, ops: list[Op | HostBranch], c: SimpleNamespace) -> None:
        for op in ops:
            if isinstance(op, HostBranch):
                (op.skip if bool(self.all_skip) else op.compute)(c)  # the host read: a device sync
            else:
                op(c)

    def _finish_forward(self, c: SimpleNamespace, seq: int) -> None:
        self.next_tokens = c.next_tokens
        self.last_decisions = c.decisions
        self.counters.count_forward(self.batch_size * seq)

    def _capture_graphs(self) -> None:
        carry = self._decode_carry()
        self._replay = self._capture_pieces(carry) if self.mode == "host" else self._capture_whole(carry)
        self._graph_carry = carry
        self.graphed = "pieces" if self.mode == "host" else "whole"
        self.counters.reset()

    def _capture_whole(self, c: SimpleNamespace) -> Callable[[], None]:
        graph = _captured(lambda: self._run(self._decode_ops, c))
        return graph.replay

    def _capture_pieces(self, c: SimpleNamespace) -> Callable[[], None]:
        """Graphs of the ops between host reads, and of both branches of each read. Tensors pass between graphs at
        their captured addresses (each graph keeps its own memory pool); the flag read in between is the static
        `all_skip`, and both branches of a layer write one shared `delta` buffer, which the next piece reads."""
        segments: list[list[Op]] = [[]]
        branches: list[HostBranch] = []
        for op in self._decode_ops:
            if isinstance(op, HostBranch):
                branches.append(op)
                segments.append([])
            else:
                segments[-1].append(op)
        delta = torch.empty(self.batch_size, 1, self.layers[0].ffn.down.shape[0], dtype=self.dtype,
                            device=self.device)
        pieces = [_captured(partial(_run_all, segments[0], c))]
        choices = []
        for branch, segment in zip(branches, segments[1:]):
            choices.append(tuple(_captured(partial(_run_into, fn, c, delta)) for fn in (branch.skip, branch.compute)))
            c.delta = delta
            pieces.append(_captured(partial(_run_all, segment, c)))

        def replay() -> None:
            pieces[0].replay()
            for (skip_graph, compute_graph), piece in zip(choices, pieces[1:]):
                (skip_graph if bool(self.all_skip) else compute_graph).replay()  # the host read: a device sync
                piece.replay()

        return replay


def grouped_query_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA with `groups` query heads per key/value head, without copying the cache: each kv head's queries are
    stacked along the sequence axis (``[b, kv, groups * seq, d]``); `mask` is ``[1, 1, groups * seq, keys]``."""
    batch, heads, seq, dim = q.shape
    kv_heads = keys.shape[1]
    stacked = q.reshape(batch, kv_heads, heads // kv_heads * seq, dim)
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, seq, dim)


def rope_tables(rotary: nn.Module, max_len: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin ``[max_len, head_dim]`` from the model's own rotary module (its theta and Llama-3 scaling)."""
    positions = torch.arange(max_len, device=device)[None]
    cos, sin = rotary(torch.zeros((), dtype=dtype, device=device), positions)
    return cos[0], sin[0]


def _split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """``[b, s, heads * d]`` -> ``[b, heads, s, d]``."""
    return x.view(*x.shape[:2], heads, head_dim).transpose(1, 2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, Hugging Face's convention (rotate-half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _unwrapped_layers(model: nn.Module, adapter: ArchAdapter) -> nn.ModuleList:
    """The decoder layers, refusing layers wrapped by :func:`skiptool.runtime.apply_skip` (they hide their parts)."""
    layers = adapter.decoder_layers(model)
    if not all(hasattr(layer, adapter.attention) for layer in layers):
        raise ConfigError("the decode engine needs the model's own decoder layers; if apply_skip wrapped them, "
                          "call .remove() on its runtime first")
    return layers


def _captured(fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _run_all(ops: list[Op], c: SimpleNamespace) -> None:
    for op in ops:
        op(c)


def _run_into(op: Op, c: SimpleNamespace, delta: Tensor) -> None:
    op(c)
    delta.copy_(c.delta)
