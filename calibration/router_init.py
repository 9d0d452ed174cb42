"""Where router training starts: the closed-form routers and the stand-ins trained jointly with them.

The routers start by skipping, in each layer at the target rate, the tokens predicted to lose least when skipped.
On dense forward passes, a ridge regression per layer predicts a label from the router's :func:`router_features`
(through the router kind's own basis: the features for ``linear``, ``silu(down(features))`` for ``bottleneck``):

- ``contribution``: ``log(||FFN(x)|| / ||h||)``, the FFN's relative contribution (DiffSkip: the attention delta
  predicts the FFN delta); skipped tokens are those whose FFN adds least.
- ``recoverable``: ``log(||FFN(x) - standin(x)|| / ||h||)``, what the substitute cannot recover; skipped tokens are
  those whose stand-in error is smallest. With no stand-in (zeros) it is the same label as ``contribution``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import SkipConfig
from ..policies import LayerSignals, Routers, SkipPolicy, router_features
from ..runtime import load_standins, skipping
from ..standins import StandIns
from .router_settings import RouterTrainSettings, Substitutes
from .router_threshold import model_device, quantile
from .standin_fit import fit_standins



class LabelProbe(SkipPolicy):
    """A dense policy that records, per skippable layer and post-warm-up token, the router's input and the log of
    the skip label ``||FFN(x) - substitute(x)|| / ||h||`` (no substitute: ``||FFN(x)|| / ||h||``)."""

    def __init__(self, config: SkipConfig, substitutes: Substitutes = None) -> None:
        super().__init__(config.model.num_layers, config.skippable_layers, config.warmup)
        self.substitutes = substitutes or {}
        self.features: dict[int, list[Tensor]] = {i: [] for i in self.skippable_layers}
        self.labels: dict[int, list[Tensor]] = {i: [] for i in self.skippable_layers}
        self._warm_x: Tensor | None = None

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        assert s.positions is not None  # the runtime always passes them
        self._warm = self.is_warm(s.positions).expand(s.x.shape[:2])
        self._warm_x = s.x[self._warm]
        self.features[s.layer].append(router_features(s.attn_delta[self._warm]).cpu())
        return super().rule(s, state)

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> None:
        if layer in self.features:
            missed = delta[self._warm].float()
            if layer in self.substitutes:
                missed = missed - self.substitutes[layer](self._warm_x).float()
            rel = missed.norm(dim=-1) / h_mid[self._warm].float().norm(dim=-1).clamp_min(1e-6)
            self.labels[layer].append(rel.clamp_min(1e-8).log().cpu())
        return None


def fit_initial_routers(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, blocks: Tensor, rate: float,
                        batch_size: int = 1, kind: str = "linear", substitutes: Substitutes = None,
                        sharpness: float = 2.0, ridge: float = 1e-2) -> Routers:
    """Routers of `kind` that skip, in each layer at `rate`, the tokens whose label (see the module docstring:
    `substitutes` given -> ``recoverable``, else ``contribution``) is predicted smallest.

    Logits are scaled to `sharpness` per standard deviation of the prediction and cut at its `rate` quantile.
    """
    probe = LabelProbe(config, substitutes)
    with skipping(model, adapter, probe), torch.no_grad():
        for batch in blocks.split(batch_size):
            model(batch.to(model_device(model)))
    routers = Routers(config.model.hidden_size, config.skippable_layers, kind)
    for i in config.skippable_layers:
        fit_router(routers.nets[str(i)], torch.cat(probe.features[i]), torch.cat(probe.labels[i]), rate,
                   sharpness, ridge)
    return routers


@torch.no_grad()
def fit_router(net: nn.Module, features: Tensor, label: Tensor, rate: float, sharpness: float = 2.0,
               ridge: float = 1e-2) -> None:
    """Set `net`'s head so that its logit is high where the ridge prediction of `label` is low, cut at the `rate`
    quantile. A bottleneck's ``down`` first gets the linear prediction's direction (unit spread) as its first row,
    so its basis holds the linear fit."""
    if hasattr(net, "down"):
        w, _ = ridge_fit(features, label, ridge)
        direction = w / (features @ w).std().clamp_min(1e-6)
        net.down.weight[0] = direction.to(net.down.weight.dtype)
        net.down.bias[0] = -(features @ direction).mean()
    basis = net.basis(features.to(net.head.weight.device)).cpu()
    w, b = ridge_fit(basis, label, ridge)
    pred = basis @ w + b
    scale = sharpness / pred.std().clamp_min(1e-6).item()
    net.head.weight.copy_((-scale * w).view(1, -1))  # a small predicted label -> a high skip logit
    net.head.bias.copy_(torch.tensor([-scale * (b - quantile(pred, rate))]))


def ridge_fit(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, float]:
    """Weights and intercept of a ridge regression of `y` on `x` (float64; no penalty on the intercept)."""
    x = torch.cat([x.double(), torch.ones_like(x[:, :1], dtype=torch.float64)], 1)
    xtx = x.T @ x
    reg = ridge * xtx.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    w = torch.linalg.solve(xtx + reg, x.T @ y.double()).float()
    return w[:-1], w[-1].item()


def initial_standins(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, blocks: Tensor,
                     settings: RouterTrainSettings) -> StandIns | None:
    """The stand-ins joint training starts from (``None`` without a stand-in spec).

    ``closed-form``: the base config's own stand-ins when their kind and size match, else a closed-form fit on
    `blocks`; ``zero``: stand-ins that add nothing until trained.
    """
    spec = settings.standin
    if spec is None:
        return None
    layers, device = config.skippable_layers, model_device(model)
    if settings.standin_init == "zero":
        return StandIns(int(model.config.hidden_size), spec.known_size, layers, spec.kind,
                        int(model.config.intermediate_size)).to(device)
    if config.standin is not None and (config.standin.kind or "linear", config.standin.rank) == (spec.kind, spec.known_size):
        return load_standins(config).to(device)
    return fit_standins(model, adapter, blocks, layers, spec.known_size, config.warmup, spec.kind)
