"""DiffSkip routers trained with the LLM frozen: one tiny ``Linear(hidden, 1)`` per skippable layer.

A router reads its layer's RMS-normalised attention delta and decides, after attention and before
the FFN, whether that layer's FFN runs for the token. Training:

1. **Initial fit (closed form).** On dense forward passes, a ridge regression per layer predicts the
   log of the FFN's relative contribution ``||FFN(x)|| / ||h||`` from the router's input; the router
   starts by skipping the tokens with the smallest predicted contribution, at the target rate.
2. **Distillation.** The routers learn, through straight-through hard decisions (the forward pass
   skips exactly as inference will), to keep the skipping model's next-token distribution close to
   the dense model's (KL(dense || skipping)), with a strong penalty on the gap between the skip rate
   and the target.
   With a stand-in spec (``standin``) a stand-in per skippable layer (see :mod:`skiptool.standins`)
   is trained jointly with the routers: it starts from the closed-form fit (or from zero) and learns
   from the same loss, so a skipped FFN adds the stand-in's estimate instead of nothing.
3. **Threshold refit.** On held-out calibration blocks, the probability threshold is refitted so the
   *realised* ratio (skipped / (layers x tokens), cold layers and warm-up included, as
   :class:`skiptool.runtime.SkipStats` counts it) matches the target.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import CONFIG_FILENAME, ArtifactRef, PolicySpec, SkipConfig
from ..data import DataSpec
from ..errors import ConfigError
from ..fileio import atomic_directory, check_output_dir
from ..policies import (ESTIMATORS, FORCE_COMPUTE, LayerSignals, NeverSkip, RouterPolicy, Routers, SkipPolicy,
                        block_positions, build_policy, router_features)
from ..runtime import SkipRuntime, load_standins, skipping
from ..standins import StandIns, StandInSpec, skip_target
from .fit import eligible_fraction
from .standin_fit import fit_standins

ROUTER_FILENAME = "router.safetensors"
TRAINED_STANDIN_FILENAME = "router_standin.safetensors"  # not calibrate's file: a base config may share the folder
STANDIN_INITS = ("closed-form", "zero")
StepCallback = Callable[[int, dict[str, float]], None]
Substitutes = dict[int, nn.Module] | None
__all__ = ["ESTIMATORS", "RouterTrainSettings", "RouterTrainResult", "run_train_router", "train_router"]


@dataclass(frozen=True)
class RouterTrainSettings:
    """Hyper-parameters of :func:`train_router` (defaults: the demo model on a CPU in minutes)."""

    target_skip: float = 0.25
    steps: int = 120  # 40 steps: 1.81x dense perplexity at 24 % on the demo, 120 steps: 1.66x
    lr: float = 2e-3
    seq_len: int = 512
    batch_size: int = 1
    penalty: float = 100.0
    estimator: str = "ste"
    temperature: float = 1.0
    init_blocks: int = 4
    heldout_blocks: int = 4
    threshold: float | None = None  # None: refit on held-out blocks to the target ratio
    seed: int = 0
    device: str = "cpu"
    standin: StandInSpec | None = StandInSpec()  # None: no trained stand-ins (a base config's own are used as they are)
    standin_init: str = "closed-form"  # or "zero"
    standin_lr: float = 1e-3
    target_saved: float | None = None  # instead of target_skip: the share of FFN weight bytes to save

    def __post_init__(self) -> None:
        problems = [
            (not 0 < self.target_skip < 1, f"--target-skip must be in (0, 1) (got {self.target_skip:.3g}; a "
                                           "--target-saved is turned into the skip ratio that saves it)"),
            (self.target_saved is not None and not 0 < self.target_saved < 1,
             f"--target-saved must be in (0, 1) (got {self.target_saved})"),
            (self.estimator not in ESTIMATORS, f"--estimator must be one of {', '.join(ESTIMATORS)} "
                                               f"(got {self.estimator!r})"),
            (self.threshold is not None and not 0 < self.threshold < 1,
             f"--threshold must be a probability strictly between 0 and 1 (got {self.threshold})"),
            (self.standin_init not in STANDIN_INITS, f"--stand-in-init must be one of {', '.join(STANDIN_INITS)} "
                                                     f"(got {self.standin_init!r})"),
            (self.steps < 0 or self.batch_size < 1 or self.seq_len < 2,
             "--steps must be >= 0, --batch-size >= 1 and --seq-len >= 2"),
            (self.lr < 0 or self.standin_lr < 0 or self.penalty < 0, "--lr, --stand-in-lr and --penalty must be >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class HeldOut:
    """A router threshold measured on held-out blocks."""

    threshold: float
    skip_ratio: float
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass
class RouterTrainResult:
    """What :func:`train_router` wrote and measured."""

    config: SkipConfig
    config_path: Path
    router_path: Path
    standin_path: Path | None
    heldout: HeldOut
    dense_nll: float
    cost: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_nll)

    def to_dict(self) -> dict[str, Any]:
        return {"config": str(self.config_path), "router": str(self.router_path),
                "standin": None if self.standin_path is None else str(self.standin_path),
                "threshold": self.heldout.threshold, "heldout_skip_ratio": self.heldout.skip_ratio,
                "heldout_perplexity": self.heldout.perplexity, "dense_heldout_perplexity": self.dense_perplexity,
                "perplexity_ratio": self.heldout.perplexity / self.dense_perplexity, "cost": self.cost,
                "seconds": self.seconds, "final": self.history[-1] if self.history else {}}


# -- the rate arithmetic -------------------------------------------------------------------------
def skippable_fraction(config: SkipConfig, seq_len: int) -> float:
    """Share of all (layer, position) pairs of a ``seq_len`` block that a policy may skip."""
    return eligible_fraction(config.model.num_layers, len(config.skippable_layers), seq_len, config.warmup)


def inner_rate(config: SkipConfig, target_skip: float, seq_len: int) -> float:
    """The skip rate over skippable layers and post-warm-up positions that realises `target_skip` overall."""
    room = skippable_fraction(config, seq_len)
    if room <= 0 or target_skip >= room:
        raise ConfigError(f"target skip {target_skip:.0%} is out of reach: with cold layers {config.cold_start}/"
                          f"{config.cold_end} and warm-up {config.warmup} at {seq_len} tokens, at most "
                          f"{room:.0%} of FFN blocks can be skipped")
    return target_skip / room


def router_cost(routers: Routers, model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
    """Router parameters and FLOPs per token and layer, beside the FFN's."""
    layer = adapter.decoder_layers(model)[routers.layers[0]]
    ffn_params = sum(p.numel() for p in adapter.mlp_of(layer).parameters())
    h = routers.hidden_size
    router_params = h + 1
    router_flops = 4 * h + 2 * h + 1  # RMS normalisation (square, mean, scale) + dot product + bias
    ffn_flops = 2 * ffn_params
    return {"router_params_per_layer": router_params, "router_params_total": routers.parameter_count(),
            "ffn_params_per_layer": ffn_params, "param_share": router_params / ffn_params,
            "router_flops_per_token": router_flops, "ffn_flops_per_token": ffn_flops,
            "flop_share": router_flops / ffn_flops}


# -- 1. the closed-form initial fit --------------------------------------------------------------
class _ContributionProbe(SkipPolicy):
    """A dense policy that records, per skippable layer and post-warm-up token, the router's input and
    the log of the FFN's relative contribution ``||FFN(x)|| / ||h||``."""

    def __init__(self, config: SkipConfig) -> None:
        super().__init__(config.model.num_layers, config.skippable_layers, config.warmup)
        self.features: dict[int, list[Tensor]] = {i: [] for i in self.skippable_layers}
        self.targets: dict[int, list[Tensor]] = {i: [] for i in self.skippable_layers}

    def rule(self, s: LayerSignals, state: Tensor | None) -> Tensor:
        assert s.positions is not None  # the runtime always passes them
        self._warm = self.is_warm(s.positions).expand(s.x.shape[:2])
        self.features[s.layer].append(router_features(s.attn_delta[self._warm]).cpu())
        return super().rule(s, state)

    def update(self, layer: int, h_mid: Tensor, delta: Tensor, skip: Tensor, state: Tensor | None) -> None:
        if layer in self.features:
            rel = delta[self._warm].float().norm(dim=-1) / h_mid[self._warm].float().norm(dim=-1).clamp_min(1e-6)
            self.targets[layer].append(rel.clamp_min(1e-8).log().cpu())
        return None


def fit_initial_routers(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, blocks: Tensor,
                        rate: float, batch_size: int = 1, sharpness: float = 2.0, ridge: float = 1e-2) -> Routers:
    """Routers that skip, in each layer at `rate`, the tokens whose FFN contribution is predicted smallest.

    Per layer, a ridge regression predicts the log of the FFN's relative contribution from the router's
    input (DiffSkip: the attention delta predicts the FFN delta); logits are scaled to `sharpness`
    per standard deviation of the prediction and cut at its `rate` quantile.
    """
    probe = _ContributionProbe(config)
    with skipping(model, adapter, probe), torch.no_grad():
        for batch in blocks.split(batch_size):
            model(batch.to(_device(model)))
    routers = Routers(config.model.hidden_size, config.skippable_layers)
    for i in config.skippable_layers:
        x = torch.cat(probe.features[i]).double()
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        xtx = x.T @ x
        reg = ridge * xtx.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
        reg[-1, -1] = 0  # no penalty on the intercept
        w = torch.linalg.solve(xtx + reg, x.T @ torch.cat(probe.targets[i]).double()).float()
        pred = x.float() @ w
        scale = sharpness / pred.std().clamp_min(1e-6).item()
        lin = routers.nets[str(i)]
        lin.weight.data = (-scale * w[:-1]).view(1, -1)  # a small predicted contribution -> a high skip logit
        lin.bias.data = torch.tensor([-scale * (w[-1].item() - _quantile(pred, rate))])
    return routers


# -- 2. distillation -----------------------------------------------------------------------------
def train_routers(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers, blocks: Tensor,
                  settings: RouterTrainSettings, on_step: StepCallback | None = None,
                  substitutes: Substitutes = None, standins: StandIns | None = None) -> list[dict[str, float]]:
    """Train `routers` in place (the LLM stays frozen); returns the per-step history.

    `substitutes` are fixed stand-ins; `standins` are trained jointly with the routers (and used as the
    substitutes) at ``settings.standin_lr``.
    """
    seq_len, warmup = blocks.shape[1], config.warmup
    target = inner_rate(config, settings.target_skip, seq_len)
    room = skippable_fraction(config, seq_len)
    policy = RouterPolicy(config.model.num_layers, config.skippable_layers, warmup, routers, threshold=0.5)
    policy.train_decisions(settings.estimator, settings.temperature)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = [{"params": list(routers.parameters()), "lr": settings.lr}]
    if standins is not None:
        substitutes = standins.by_layer()
        groups.append({"params": list(standins.parameters()), "lr": settings.standin_lr})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    try:
        with skipping(model, adapter, policy, substitutes) as rt:
            rt.controller.counting = False
            for step in range(settings.steps):
                rows = torch.randint(0, blocks.shape[0], (settings.batch_size,), generator=generator)
                ids = blocks[rows].to(_device(model))
                kl, rate = _distillation_step(rt, policy, ids)
                loss = kl + settings.penalty * (rate - target) ** 2
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                record = {"step": step + 1, "loss": loss.item(), "kl": kl.item(), "skip_ratio": rate.item() * room}
                history.append(record)
                if on_step is not None:
                    on_step(step + 1, record)
    finally:
        policy.train_decisions(None)
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return history


def _distillation_step(rt: SkipRuntime, policy: RouterPolicy, ids: Tensor) -> tuple[Tensor, Tensor]:
    """KL(dense || skipping) over the positions past the warm-up, and their straight-through skip rate."""
    positions = block_positions(ids)
    warm = policy.is_warm(positions)  # warm-up positions never skip: their distributions are the dense ones
    with torch.no_grad(), _dense(rt):
        teacher = F.log_softmax(rt.model(ids, position_ids=positions).logits[warm].float(), dim=-1)
    student = F.log_softmax(rt.model(ids, position_ids=positions).logits[warm].float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    rate = torch.stack([d[warm].mean() for d in policy.soft_decisions.values()]).mean()
    return kl, rate


@contextmanager
def _dense(rt: SkipRuntime) -> Iterator[None]:
    """Every FFN runs (the teacher pass)."""
    previous = rt.controller.override
    rt.set_override([FORCE_COMPUTE] * rt.policy.num_layers)
    try:
        yield
    finally:
        rt.set_override(previous)


# -- 3. threshold refit --------------------------------------------------------------------------
def measure(model: nn.Module, adapter: ArchAdapter, policy: SkipPolicy, blocks: Tensor, batch_size: int = 2,
            routers: Routers | None = None, substitutes: Substitutes = None) -> tuple[float, float, list[Tensor]]:
    """Realised skip ratio, mean next-token NLL and (if `routers`) the post-warm-up router logits."""
    nll_sum, count, warm_logits = 0.0, 0, []
    with _logit_capture(routers) as logits, skipping(model, adapter, policy, substitutes) as rt, torch.no_grad():
        for batch in blocks.split(batch_size):
            batch = batch.to(_device(model))
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
        threshold = _probability(logit_thr)
        policy = _router_policy(config, routers, threshold)
        ratio, nll, logits = measure(model, adapter, policy, blocks, batch_size, routers, substitutes)
        tried.append(HeldOut(threshold, ratio, nll))
        if abs(ratio - target_skip) < 0.002:
            break
        logit_thr = _quantile(torch.cat(logits), 1 - target)
    return min(tried, key=lambda h: abs(h.skip_ratio - target_skip))


def _quantile(values: Tensor, q: float) -> float:
    """The `q`-quantile of a 1-D tensor of any length (``torch.quantile`` refuses large inputs)."""
    ordered = values.float().sort().values
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)].item()


def _probability(logit: float) -> float:
    return min(max(1 / (1 + math.exp(-logit)), 1e-6), 1 - 1e-6)


def _router_policy(config: SkipConfig, routers: Routers, threshold: float) -> RouterPolicy:
    return RouterPolicy(config.model.num_layers, config.skippable_layers, config.warmup, routers, threshold)


@contextmanager
def _logit_capture(routers: Routers | None) -> Iterator[list[Tensor]]:
    """Collect every router logit ``[batch, seq]`` computed inside the block (hooks always removed)."""
    captured: list[Tensor] = []
    if routers is None:
        yield captured
        return
    handles = [lin.register_forward_hook(lambda m, i, o: captured.append(o.detach().squeeze(-1).float().cpu()))
               for lin in routers.nets.values()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- the pipeline step ---------------------------------------------------------------------------
def split_blocks(blocks: Tensor, settings: RouterTrainSettings) -> tuple[Tensor, Tensor]:
    """Training blocks and held-out blocks (the last ones) for the threshold refit."""
    held = min(settings.heldout_blocks, blocks.shape[0] // 4)
    if blocks.shape[0] - held < 1 or held < 1:
        raise ConfigError(f"need at least 4 blocks of {blocks.shape[1]} tokens to train routers and hold some out "
                          f"(got {blocks.shape[0]}); give more data or a shorter --seq-len")
    return blocks[:-held], blocks[-held:]


def train_router(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, blocks: Tensor, out_dir: str | Path,
                 settings: RouterTrainSettings = RouterTrainSettings(), on_step: StepCallback | None = None,
                 data: DataSpec | None = None) -> RouterTrainResult:
    """Fit, train and threshold the routers for `config`'s cold regions and warm-up; write them to `out_dir`.

    Writes ``router.safetensors``, the trained stand-ins (``router_standin.safetensors``, unless
    ``settings.standin`` is None: then a base config's own stand-ins are copied beside the config) and last
    ``skip_config.json`` (policy ``router``), each atomically.
    """
    start = time.perf_counter()
    config.check_matches(model)
    check_output_dir(out_dir)
    settings = with_skip_target(settings, config, model, adapter)
    torch.manual_seed(settings.seed)
    train_blocks, heldout_blocks = split_blocks(blocks, settings)
    rate = inner_rate(config, settings.target_skip, blocks.shape[1])  # an unreachable target fails first
    standins = initial_standins(model, adapter, config, train_blocks[: settings.init_blocks], settings)
    if standins is not None:
        substitutes: Substitutes = standins.by_layer()
    else:
        substitutes = load_standins(config).by_layer() if config.standin is not None else None
    routers = fit_initial_routers(model, adapter, config, train_blocks[: settings.init_blocks], rate)
    routers.to(_device(model))
    history = train_routers(model, adapter, config, routers, train_blocks, settings, on_step,
                            None if standins is not None else substitutes, standins)
    dense = NeverSkip(config.model.num_layers, config.skippable_layers, config.warmup)
    _, dense_nll, _ = measure(model, adapter, dense, heldout_blocks, settings.batch_size)
    if settings.threshold is None:
        heldout = refit_threshold(model, adapter, config, routers, heldout_blocks, settings.target_skip,
                                  batch_size=settings.batch_size, substitutes=substitutes)
    else:
        policy = _router_policy(config, routers, settings.threshold)
        ratio, nll, _ = measure(model, adapter, policy, heldout_blocks, settings.batch_size, None, substitutes)
        heldout = HeldOut(settings.threshold, ratio, nll)
    cost = router_cost(routers, model, adapter)
    if standins is not None:
        cost["standin"] = standins.cost(int(model.config.intermediate_size))
    standin_ref = (ArtifactRef(TRAINED_STANDIN_FILENAME, standins.rank_, standins.kind) if standins is not None
                   else _absolute(config, config.standin))
    with atomic_directory(out_dir) as tmp:  # routers, stand-ins and config appear together or not at all
        routers.cpu().save(tmp / ROUTER_FILENAME)
        if standins is not None:
            standins.cpu().save(tmp / TRAINED_STANDIN_FILENAME)
        new_config = _router_config(config, settings, heldout, history, tmp, data, blocks.shape[0], standin_ref)
        new_config.save_with_artifacts(tmp)  # a base config's fixed stand-ins are copied beside it
    out = Path(out_dir).resolve()
    new_config = new_config.evolve(base_dir=out, standin=None if new_config.standin is None else
                                   replace(new_config.standin, path=Path(new_config.standin.path).name))
    config_path, router_path = out / CONFIG_FILENAME, out / ROUTER_FILENAME
    standin_path = out / TRAINED_STANDIN_FILENAME if standins is not None else None
    return RouterTrainResult(new_config, config_path, router_path, standin_path, heldout, dense_nll, cost, history,
                             time.perf_counter() - start)


def with_skip_target(settings: RouterTrainSettings, config: SkipConfig, model: nn.Module,
                     adapter: ArchAdapter) -> RouterTrainSettings:
    """`settings` with `target_skip` set to the ratio that saves `target_saved` of the FFN bytes (when given), with
    the stand-ins that will be in place (trained ones, else the base config's)."""
    if settings.target_saved is None:
        return settings
    spec = settings.standin or (StandInSpec(config.standin.kind or "linear", config.standin.rank or 1)
                                if config.standin is not None else None)
    ffn = adapter.mlp_parameter_count(adapter.decoder_layers(model)[0])
    return replace(settings, target_skip=skip_target(settings.target_saved, spec, int(model.config.hidden_size), ffn))


def initial_standins(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, blocks: Tensor,
                     settings: RouterTrainSettings) -> StandIns | None:
    """The stand-ins joint training starts from (``None`` without a stand-in spec).

    ``closed-form``: the base config's own stand-ins when their kind and size match, else a closed-form fit on
    `blocks`; ``zero``: stand-ins that add nothing until trained.
    """
    spec = settings.standin
    if spec is None:
        return None
    layers, device = config.skippable_layers, _device(model)
    if settings.standin_init == "zero":
        return StandIns(int(model.config.hidden_size), spec.size, layers, spec.kind,
                        int(model.config.intermediate_size)).to(device)
    if config.standin is not None and (config.standin.kind or "linear", config.standin.rank) == (spec.kind, spec.size):
        return load_standins(config).to(device)
    return fit_standins(model, adapter, blocks, layers, spec.size, config.warmup, spec.kind)


def _absolute(config: SkipConfig, ref: ArtifactRef | None) -> ArtifactRef | None:
    return None if ref is None else replace(ref, path=str(config.resolve(ref.path).resolve()))


def _router_config(config: SkipConfig, settings: RouterTrainSettings, heldout: HeldOut,
                   history: list[dict[str, float]], out_dir: Path, data: DataSpec | None,
                   num_blocks: int, standin: ArtifactRef | None) -> SkipConfig:
    training = {"target_skip": settings.target_skip, "steps": settings.steps, "lr": settings.lr,
                "seq_len": settings.seq_len, "batch_size": settings.batch_size, "estimator": settings.estimator,
                "penalty": settings.penalty, "heldout_skip_ratio": heldout.skip_ratio,
                "heldout_perplexity": heldout.perplexity, "from_policy": config.policy.kind,
                "final_kl": history[-1]["kl"] if history else None,
                "standin": str(settings.standin) if settings.standin is not None else None,
                "standin_init": settings.standin_init if settings.standin is not None else None}
    return config.evolve(
        policy=PolicySpec("router", {"threshold": heldout.threshold}), target_skip=settings.target_skip,
        router=ArtifactRef(ROUTER_FILENAME), standin=standin,
        metadata={**_calibration_data(data, num_blocks, settings.seq_len), **config.metadata,
                  "router_training": training}, base_dir=out_dir.resolve())


def _calibration_data(data: DataSpec | None, num_blocks: int, seq_len: int) -> dict[str, Any]:
    """The ``calibration_data`` record sweeps read (a base config's own record takes precedence)."""
    if data is None:
        return {}
    source = data.source
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    return {"calibration_data": {"source": source, "field": data.field, "split": data.split,
                                 "part": list(data.part), "samples": min(num_blocks, 16), "seq_len": seq_len}}


def run_train_router(model_source: str, config_path: str | Path | None, data: DataSpec, out_dir: str | Path,
                     settings: RouterTrainSettings = RouterTrainSettings(),
                     on_step: StepCallback | None = None) -> RouterTrainResult:
    """The `train-router` command: load the model, the base config (or a dense one) and the data, then train."""
    from ..config import dense_config, load_config
    from ..data import token_blocks
    from ..models import load_model

    from ..accelerators import check_device
    from ..policies import check_policy

    check_device(settings.device)
    check_output_dir(out_dir)
    base = load_config(config_path) if config_path is not None else None
    if base is not None:
        check_policy(base)
    lm = load_model(model_source, device=settings.device)
    config = base if base is not None else dense_config(lm.model, source=model_source)
    config.check_matches(lm.model)
    blocks = token_blocks(lm.tokenizer, data, settings.seq_len)
    return train_router(lm.model, lm.adapter, config, blocks, out_dir, settings, on_step, data)


# -- the sweep curve -----------------------------------------------------------------------------
def router_sweep_candidate(ctx: Any, target: float, with_standins: bool) -> tuple[RouterPolicy, Substitutes] | None:
    """``eval --sweep``'s ``router`` / ``router+standin`` curves: a router config's routers (with its stand-ins
    when `with_standins`), the threshold refitted on the config's calibration blocks so that the realised ratio
    on the evaluation blocks is about `target`; ``None`` for a config without routers (or without stand-ins
    when they are asked for) or a target out of reach. `ctx` is a :class:`skiptool.evaluate.SweepContext`."""
    config = ctx.config
    if config.policy.kind != "router" or (with_standins and config.standin is None):
        return None
    routers = build_policy(config).routers
    substitutes = load_standins(config).by_layer() if with_standins else None
    blocks = ctx.calibration_blocks
    calib_target = target * skippable_fraction(config, int(blocks.shape[1])) / ctx.eligible_fraction()
    try:
        held = refit_threshold(ctx.model, ctx.adapter, config, routers, blocks, calib_target,
                               batch_size=ctx.batch_size, substitutes=substitutes,
                               start=config.policy.params.get("threshold", 0.5))
    except ConfigError:
        return None
    return _router_policy(config, routers, held.threshold), substitutes
