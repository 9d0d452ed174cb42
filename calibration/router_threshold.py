"""The last step of router training: the probability threshold refitted on held-out blocks so that the *realised*
ratio (skipped / (layers x tokens), cold layers and warm-up included, as :class:`skiptool.runtime.SkipStats`
counts it) matches the target; and the measurement it rests on."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import SkipConfig
from ..policies import RouterPolicy, Routers, SkipPolicy, block_positions
from ..runtime import skipping
from .router_settings import Substitutes, inner_rate



@dataclass
class HeldOut:
    """A router threshold measured on held-out blocks."""

    threshold: float
    skip_ratio: float
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def measure(model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy, blocks: Tensor, batch_size: int = 2,
            routers: Routers | None = None, substitutes: Substitutes = None) -> tuple[float, float, list[Tensor]]:
    """Realised skip ratio, mean next-token NLL and (if `routers`) the post-warm-up router logits."""
    nll_sum, count, warm_logits = 0.0, 0, []
    with logit_capture(routers) as logits, skipping(model, adapter, policy, substitutes) as rt, torch.no_grad():
        for batch in blocks.split(batch_size):
            batch = batch.to(model_device(model))
            positions = block_positions(batch)
            out = model(batch, position_ids=positions).logits[:, :-1].float()
            nll_sum += F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum").item()
            count += batch[:, 1:].numel()
            warm = policy.is_warm(positions).cpu()
            warm_logits += [x[warm] for x in logits]
            logits.clear()
        ratio = rt.stats.skip_ratio
    return ratio, nll_sum / count, warm_logits


def refit_threshold(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers, blocks: Tensor,
                    target_skip: float, iterations: int = 4, batch_size: int = 2,
                    substitutes: Substitutes = None, start: float = 0.5) -> HeldOut:
    """The probability threshold whose realised skip ratio on `blocks` is closest to `target_skip`.

    Skipping changes later layers' inputs, so the quantile of the router logits is iterated to a
    fixed point; every candidate is measured and the closest one is returned.
    """
    target = inner_rate(config, target_skip, blocks.shape[1])
    logit_thr, tried = math.log(start / (1 - start)), []
    for _ in range(iterations):
        threshold = probability(logit_thr)
        policy = router_policy(config, routers, threshold)
        ratio, nll, logits = measure(model, adapter, policy, blocks, batch_size, routers, substitutes)
        tried.append(HeldOut(threshold, ratio, nll))
        if abs(ratio - target_skip) < 0.002:
            break
        logit_thr = quantile(torch.cat(logits), 1 - target)
    return min(tried, key=lambda h: abs(h.skip_ratio - target_skip))


def quantile(values: Tensor, q: float) -> float:
    """The `q`-quantile of a 1-D tensor of any length (``torch.quantile`` refuses large inputs)."""
    ordered = values.float().sort().values
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)].item()


def probability(logit: float) -> float:
    """``sigmoid(logit)``, kept strictly inside (0, 1)."""
    return min(max(1 / (1 + math.exp(-logit)), 1e-6), 1 - 1e-6)


def router_policy(config: SkipConfig, routers: Routers, threshold: float) -> RouterPolicy:
    return RouterPolicy(config.model.num_layers, config.skippable_layers, config.warmup, routers, threshold)


@contextmanager
def logit_capture(routers: Routers | None) -> Iterator[list[Tensor]]:
    """Collect every router logit ``[batch, seq]`` computed inside the block (hooks always removed)."""
    captured: list[Tensor] = []
    if routers is None:
        yield captured
        return
    handles = [net.register_forward_hook(lambda m, i, o: captured.append(o.detach().float().cpu()))
               for net in routers.nets.values()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
