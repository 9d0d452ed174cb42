"""DiffSkip routers trained with the LLM frozen: the ``train-router`` pipeline step.

A router per skippable layer (:class:`skiptool.policies.Routers`, kind ``linear`` or ``bottleneck``) reads its
layer's RMS-normalised attention delta and decides, after attention and before the FFN, whether that layer's FFN
runs for the token. Training, one module per part:

1. **Initial fit** (:mod:`.router_init`): closed-form routers that skip the tokens predicted to lose least (the
   FFN's contribution, or what the stand-in cannot recover), and the stand-ins' starting point.
2. **Distillation** (:mod:`.router_loop`): a token budget of straight-through steps on the top-k KL to the dense
   model (:mod:`.teacher`, whose targets are cached on disk) with a skip-rate penalty; stand-ins trained jointly;
   checkpoints and ``--resume`` (:mod:`.router_checkpoint`).
3. **Threshold refit** (:mod:`.router_threshold`) on held-out blocks to the target's realised ratio.

Settings: :mod:`.router_settings`. The routers, the stand-ins and the config are written together or not at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import ArchAdapter
from ..config import CONFIG_FILENAME, ArtifactRef, PolicySpec, SkipConfig
from ..data import DataSpec
from ..errors import ConfigError
from ..fileio import atomic_directory, check_output_dir
from ..policies import ESTIMATORS, NeverSkip, RouterPolicy, Routers, build_policy
from ..runtime import load_standins
from ..standins import StandIns, StandInSpec, sized_standin, skip_target
from .router_checkpoint import Checkpoints, TrainingState, blocks_digest, check_resumable
from .router_init import fit_initial_routers, initial_standins
from .router_loop import StepCallback, train_routers
from .router_settings import (RouterTrainSettings, Substitutes, TemperatureSchedule, inner_rate, skippable_fraction,
                              steps_for_tokens)
from .router_threshold import HeldOut, measure, model_device, refit_threshold, router_policy
from .teacher import TeacherCache, resolve_cache_root

ROUTER_FILENAME = "router.safetensors"
TRAINED_STANDIN_FILENAME = "router_standin.safetensors"  # not calibrate's file: a base config may share the folder
__all__ = ["ESTIMATORS", "RouterTrainSettings", "RouterTrainResult", "TemperatureSchedule", "run_train_router",
           "steps_for_tokens", "train_router", "train_routers"]


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
    tokens: int = 0  # training tokens of the whole run (resumed steps included)
    tokens_per_s: float = 0.0  # training speed of this process's steps

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_nll)

    def to_dict(self) -> dict[str, Any]:
        return {"config": str(self.config_path), "router": str(self.router_path),
                "standin": None if self.standin_path is None else str(self.standin_path),
                "threshold": self.heldout.threshold, "heldout_skip_ratio": self.heldout.skip_ratio,
                "heldout_perplexity": self.heldout.perplexity, "dense_heldout_perplexity": self.dense_perplexity,
                "perplexity_ratio": self.heldout.perplexity / self.dense_perplexity, "cost": self.cost,
                "seconds": self.seconds, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
                "final": self.history[-1] if self.history else {}}


def router_cost(routers: Routers, model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
    """Router parameters and FLOPs per token and layer, beside the FFN's."""
    layer = adapter.decoder_layers(model)[routers.layers[0]]
    ffn_params = sum(p.numel() for p in adapter.mlp_of(layer).parameters())
    net = routers.nets[str(routers.layers[0])]
    router_params = sum(p.numel() for p in net.parameters())
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    activations = sum(m.out_features for m in linears[:-1])  # a SiLU per hidden unit (about 4 FLOPs each)
    # RMS normalisation (square, mean, scale) + the multiply-adds + the bias adds + the activations
    router_flops = 4 * routers.hidden_size + sum(2 * m.weight.numel() + m.out_features for m in linears) \
        + 4 * activations
    ffn_flops = 2 * ffn_params
    return {"router_kind": routers.kind, "router_params_per_layer": router_params,
            "router_params_total": routers.parameter_count(), "ffn_params_per_layer": ffn_params,
            "param_share": router_params / ffn_params, "router_flops_per_token": router_flops,
            "ffn_flops_per_token": ffn_flops, "flop_share": router_flops / ffn_flops}


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
                 data: DataSpec | None = None, resume: bool = False) -> RouterTrainResult:
    """Fit, train and threshold the routers for `config`'s cold regions and warm-up; write them to `out_dir`.

    Writes ``router.safetensors``, the trained stand-ins (``router_standin.safetensors``, unless
    ``settings.standin`` is None: then a base config's own stand-ins are copied beside the config) and last
    ``skip_config.json`` (policy ``router``), together. While training, ``out_dir/.checkpoint/`` holds the run's
    latest checkpoint; `resume` continues from it; it is removed once the outputs are written.
    """
    start = time.perf_counter()
    config.check_matches(model)
    check_output_dir(out_dir)
    settings = with_skip_target(replace(settings, standin=sized_standin(settings.standin, model)), config, model,
                                adapter)
    torch.manual_seed(settings.seed)
    train_blocks, heldout_blocks = split_blocks(blocks, settings)
    rate = inner_rate(config, settings.target_skip, blocks.shape[1])  # an unreachable target fails first
    checkpoints = Checkpoints(out_dir, settings.checkpoint_every)
    state = resumable_state(checkpoints, resume, settings, train_blocks)
    cache = open_teacher_cache(settings, model, config)
    routers, standins, substitutes = starting_point(model, adapter, config, train_blocks, settings, rate, state)
    trained_at = time.perf_counter()
    history = train_routers(model, adapter, config, routers, train_blocks, settings, on_step,
                            None if standins is not None else substitutes, standins, cache=cache,
                            checkpoints=checkpoints, resume=state)
    steps_run = settings.steps - (state.step if state is not None else 0)
    speed = steps_run * settings.tokens_per_step / max(time.perf_counter() - trained_at, 1e-9)
    heldout, dense_nll = heldout_figures(model, adapter, config, routers, heldout_blocks, settings, substitutes)
    result = write_outputs(model, adapter, config, routers, standins, heldout, dense_nll, history, settings, out_dir,
                           data, blocks.shape[0])
    checkpoints.remove()
    result.seconds, result.tokens_per_s = time.perf_counter() - start, speed
    result.tokens = len(history) * settings.tokens_per_step
    return result


def resumable_state(checkpoints: Checkpoints, resume: bool, settings: RouterTrainSettings,
                    train_blocks: Tensor) -> TrainingState | None:
    """The checkpoint's state to continue from (`resume`), or None for a fresh start; one :class:`ConfigError` for
    a missing, unreadable or mismatched checkpoint, or for a fresh start over an unfinished run's checkpoint."""
    if not resume:
        if checkpoints.exists():
            raise ConfigError(f"{checkpoints.folder} holds an unfinished run: continue it with --resume, or delete "
                              "that folder to start again")
        return None
    state = checkpoints.load()
    check_resumable(state, settings, blocks_digest(train_blocks), checkpoints.path)
    return state


def open_teacher_cache(settings: RouterTrainSettings, model: nn.Module, config: SkipConfig) -> TeacherCache | None:
    """The teacher cache the settings name (None: ``--teacher-cache none``)."""
    root = resolve_cache_root(settings.teacher_cache)
    if root is None:
        return None
    return TeacherCache.open(root, model, config.model.source, settings.teacher_topk)


def starting_point(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, train_blocks: Tensor,
                   settings: RouterTrainSettings, rate: float,
                   state: TrainingState | None) -> tuple[Routers, StandIns | None, Substitutes]:
    """The routers and stand-ins training starts from, and the substitutes a skipped FFN adds: the closed-form
    fits on the first training blocks, or (resuming) modules of the same shape that the checkpoint fills."""
    init_blocks = train_blocks[: settings.init_blocks]
    if state is not None:
        standins = fresh_standins(model, config, settings)
    else:
        standins = initial_standins(model, adapter, config, init_blocks, settings)
    if standins is not None:
        substitutes: Substitutes = standins.by_layer()
    else:
        substitutes = load_standins(config).by_layer() if config.standin is not None else None
    if state is not None:
        routers = Routers(config.model.hidden_size, config.skippable_layers, settings.router)
    else:
        labels_from = substitutes if settings.router_init == "recoverable" else None
        routers = fit_initial_routers(model, adapter, config, init_blocks, rate, kind=settings.router,
                                      substitutes=labels_from)
    return routers.to(model_device(model)), standins, substitutes


def fresh_standins(model: nn.Module, config: SkipConfig, settings: RouterTrainSettings) -> StandIns | None:
    """Stand-ins of the settings' kind and size (weights to be loaded), or None without a stand-in spec."""
    spec = settings.standin
    if spec is None:
        return None
    return StandIns(int(model.config.hidden_size), spec.known_size, config.skippable_layers, spec.kind,
                    int(model.config.intermediate_size)).to(model_device(model))


def heldout_figures(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers,
                    heldout_blocks: Tensor, settings: RouterTrainSettings,
                    substitutes: Substitutes) -> tuple[HeldOut, float]:
    """The threshold (refitted to the target, or the settings' own) with its held-out figures, and the dense NLL."""
    dense = NeverSkip(config.model.num_layers, config.skippable_layers, config.warmup)
    _, dense_nll, _ = measure(model, adapter, dense, heldout_blocks, settings.batch_size)
    if settings.threshold is None:
        heldout = refit_threshold(model, adapter, config, routers, heldout_blocks, settings.target_skip,
                                  batch_size=settings.batch_size, substitutes=substitutes)
    else:
        policy = router_policy(config, routers, settings.threshold)
        ratio, nll, _ = measure(model, adapter, policy, heldout_blocks, settings.batch_size, None, substitutes)
        heldout = HeldOut(settings.threshold, ratio, nll)
    return heldout, dense_nll


def write_outputs(model: nn.Module, adapter: ArchAdapter, config: SkipConfig, routers: Routers,
                  standins: StandIns | None, heldout: HeldOut, dense_nll: float, history: list[dict[str, float]],
                  settings: RouterTrainSettings, out_dir: str | Path, data: DataSpec | None,
                  num_blocks: int) -> RouterTrainResult:
    """Write the routers, the trained stand-ins and the router config into `out_dir`, together or not at all."""
    cost = router_cost(routers, model, adapter)
    if standins is not None:
        cost["standin"] = standins.cost(int(model.config.intermediate_size))
    standin_ref = (ArtifactRef(TRAINED_STANDIN_FILENAME, standins.rank_, standins.kind) if standins is not None
                   else _absolute(config, config.standin))
    with atomic_directory(out_dir) as tmp:
        routers.cpu().save(tmp / ROUTER_FILENAME)
        if standins is not None:
            standins.cpu().save(tmp / TRAINED_STANDIN_FILENAME)
        new_config = _router_config(config, settings, heldout, history, tmp, data, num_blocks, standin_ref)
        new_config.save_with_artifacts(tmp)  # a base config's fixed stand-ins are copied beside it
    out = Path(out_dir).resolve()
    new_config = new_config.evolve(base_dir=out, standin=None if new_config.standin is None else
                                   replace(new_config.standin, path=Path(new_config.standin.path).name))
    standin_path = out / TRAINED_STANDIN_FILENAME if standins is not None else None
    return RouterTrainResult(new_config, out / CONFIG_FILENAME, out / ROUTER_FILENAME, standin_path, heldout,
                             dense_nll, cost, history)


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


def _absolute(config: SkipConfig, ref: ArtifactRef | None) -> ArtifactRef | None:
    return None if ref is None else replace(ref, path=str(config.resolve(ref.path).resolve()))


def _router_config(config: SkipConfig, settings: RouterTrainSettings, heldout: HeldOut,
                   history: list[dict[str, float]], out_dir: Path, data: DataSpec | None,
                   num_blocks: int, standin: ArtifactRef | None) -> SkipConfig:
    training = {"target_skip": settings.target_skip, "tokens": settings.steps * settings.tokens_per_step,
                "steps": settings.steps, "lr": settings.lr, "seq_len": settings.seq_len,
                "batch_size": settings.batch_size, "estimator": settings.estimator,
                "temperature": str(settings.temperature), "router": settings.router,
                "router_init": settings.router_init, "teacher_topk": settings.teacher_topk,
                "penalty": settings.penalty, "heldout_skip_ratio": heldout.skip_ratio,
                "heldout_perplexity": heldout.perplexity, "from_policy": config.policy.kind,
                "final_kl": history[-1]["kl"] if history else None,
                "standin": str(settings.standin) if settings.standin is not None else None,
                "standin_init": settings.standin_init if settings.standin is not None else None}
    return config.evolve(
        policy=PolicySpec("router", {"threshold": heldout.threshold}), target_skip=settings.target_skip,
        router=ArtifactRef(ROUTER_FILENAME, kind=settings.router), standin=standin,
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
                     settings: RouterTrainSettings = RouterTrainSettings(), on_step: StepCallback | None = None,
                     resume: bool = False) -> RouterTrainResult:
    """The `train-router` command: load the model, the base config (or a dense one) and the data, then train."""
    from ..config import dense_config, load_config
    from ..data import token_blocks
    from ..models import load_model

    from ..accelerators import check_device
    from ..policies import check_policy

    check_device(settings.device)
    check_output_dir(out_dir)
    resolve_cache_root(settings.teacher_cache)  # a bad cache folder fails before the model loads
    base = load_config(config_path) if config_path is not None else None
    if base is not None:
        check_policy(base)
    lm = load_model(model_source, device=settings.device)
    config = base if base is not None else dense_config(lm.model, source=model_source)
    config.check_matches(lm.model)
    blocks = token_blocks(lm.tokenizer, data, settings.seq_len)
    return train_router(lm.model, lm.adapter, config, blocks, out_dir, settings, on_step, data, resume)


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
    return router_policy(config, routers, held.threshold), substitutes
