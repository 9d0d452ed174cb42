"""Per-layer statistics of a frozen model over calibration blocks, read through the skip runtime's signals.

A :class:`StatsRecorder` is a policy that never skips and treats every layer as skippable, so the
runtime hands it each layer's signals (attention delta, residual stream) and each FFN's output. The
runtime wraps the model only inside :func:`collect_layer_stats` (``skipping`` always restores it).

Per layer, over every token after warm-up:

- ``saturation``: FFN-SkipLLM's ``cos(h, h + FFN(h))`` with ``h`` the stream entering the FFN block;
- ``ffn_ratio``: ``||FFN(h)|| / ||h||``;
- ``attn_ffn_cos``: the cosine between the attention delta and the FFN delta;
- ``probe_auc``: how well a linear probe on the RMS-normalised attention delta (a DiffSkip router's
  input) tells a small FFN delta (``ffn_ratio`` below the layer's median) from a large one — ridge
  regression fitted on the first half of the tokens, ROC AUC on the second half (0.5 = no signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..policies import LayerSignals, NeverSkip, block_positions, is_warm, router_features, saturation
from ..runtime import skipping

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
Progress = Callable[[int, int], Any]


class StatsRecorder(NeverSkip):
    """A dense policy that records, for every layer, the signals of tokens past a warm-up of `warmup` positions."""

    def __init__(self, num_layers: int, warmup: int, max_probe_tokens: int = 4096) -> None:
        super().__init__(num_layers, list(range(num_layers)), warmup=0)
        self.record_from = int(warmup)
        self.max_probe_tokens = max_probe_tokens
        self.rows: dict[str, list[list[Tensor]]] = {k: [[] for _ in range(num_layers)]
                                                     for k in ("saturation", "ffn_ratio", "attn_ffn_cos", "features")}
        self._seen: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (warm token mask, their attention deltas)

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        assert s.positions is not None  # the runtime always passes them
        warm = is_warm(s.positions, self.record_from).expand(s.x.shape[:2])
        a = s.attn_delta[warm].float()
        self._seen[s.layer] = (warm, a)
        if sum(t.shape[0] for t in self.rows["features"][s.layer]) < self.max_probe_tokens:
            self.rows["features"][s.layer].append(router_features(a).half().cpu())
        return super().rule(s, state)

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> Tensor | None:
        warm, a = self._seen.pop(layer)
        h, d = h_mid[warm].float(), delta[warm].float()
        self.rows["saturation"][layer].append(saturation(h, d).cpu())
        self.rows["ffn_ratio"][layer].append((d.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-6)).cpu())
        self.rows["attn_ffn_cos"][layer].append(torch.nn.functional.cosine_similarity(a, d, dim=-1, eps=1e-6).cpu())
        return state

    def matrix(self, key: str) -> Tensor:
        """``[num_layers, tokens]`` of one recorded signal."""
        return torch.stack([torch.cat(r) for r in self.rows[key]])


@dataclass
class LayerStats:
    """Per-token signals of every layer (``[num_layers, tokens]``, tokens after warm-up) and probe AUCs."""

    saturation: Tensor
    ffn_ratio: Tensor
    attn_ffn_cos: Tensor
    probe_auc: list[float]
    warmup: int
    seq_len: int
    num_blocks: int

    @property
    def num_layers(self) -> int:
        return int(self.saturation.shape[0])

    def mean_saturation(self) -> list[float]:
        return self.saturation.mean(1).tolist()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: means and quantiles per layer."""
        layers = []
        for i in range(self.num_layers):
            row: dict[str, Any] = {"layer": i}
            for key in ("saturation", "ffn_ratio", "attn_ffn_cos"):
                values = getattr(self, key)[i]
                row[key] = {"mean": float(values.mean()),
                            **{f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, _quantiles(values))}}
            row["probe_auc"] = self.probe_auc[i]
            layers.append(row)
        return {"warmup": self.warmup, "seq_len": self.seq_len, "num_blocks": self.num_blocks,
                "tokens_per_layer": int(self.saturation.shape[1]), "layers": layers}


def _quantiles(values: Tensor) -> list[float]:
    return torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


@torch.no_grad()
def collect_layer_stats(model: nn.Module, adapter: ArchAdapter, blocks: Tensor, warmup: int,
                        batch_size: int = 4, progress: Progress | None = None) -> LayerStats:
    """Run the dense model over `blocks` ``[n, seq]`` and gather every layer's statistics."""
    if warmup >= blocks.shape[1]:
        raise ValueError(f"warm-up ({warmup}) covers the whole block of {blocks.shape[1]} tokens")
    recorder = StatsRecorder(adapter.num_layers(model), warmup)
    with skipping(model, adapter, recorder):
        run_blocks(model, blocks, batch_size, progress)
    features = [torch.cat(r).float() for r in recorder.rows["features"]]
    ratio = recorder.matrix("ffn_ratio")
    return LayerStats(saturation=recorder.matrix("saturation"), ffn_ratio=ratio,
                      attn_ffn_cos=recorder.matrix("attn_ffn_cos"),
                      probe_auc=[probe_auc(f, ratio[i, : f.shape[0]]) for i, f in enumerate(features)],
                      warmup=warmup, seq_len=int(blocks.shape[1]), num_blocks=int(blocks.shape[0]))


def run_blocks(model: nn.Module, blocks: Tensor, batch_size: int = 4, progress: Progress | None = None) -> None:
    """Forward `blocks` through the decoder stack only (no LM head: statistics and skip counts need none)."""
    body = getattr(model, "model", model)
    device = next(model.parameters()).device
    n = blocks.shape[0]
    for start in range(0, n, batch_size):
        ids = blocks[start:start + batch_size].to(device)
        body(input_ids=ids, position_ids=block_positions(ids))
        if progress is not None:
            progress(min(start + batch_size, n), n)


def probe_auc(features: Tensor, ffn_ratio: Tensor, ridge: float = 1.0) -> float:
    """AUC of a ridge probe on `features` separating small from large FFN deltas (train/test halves)."""
    n = features.shape[0]
    half = n // 2
    if half < 2:
        return float("nan")
    small = (ffn_ratio < ffn_ratio.median()).double()
    x = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    xt, yt = x[:half], small[:half] * 2 - 1
    gram = xt.T @ xt + ridge * half / x.shape[1] * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xt.T @ yt)
    return roc_auc(x[half:] @ w, small[half:] > 0.5)


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    sorted_scores, order = scores.sort()
    _, inverse, counts = sorted_scores.unique_consecutive(return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts + 1  # 1-based rank of each tie group's first member
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = (first + (counts - 1) / 2).double()[inverse]  # tied scores share their average rank
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))
