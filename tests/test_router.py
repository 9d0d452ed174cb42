"""DiffSkip router training (LLM frozen), its skip-rate control, its weights file and the train-router command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from skiptool.adapters import adapter_for
from skiptool.calibration import router_train as rt
from skiptool.calibration.router_init import initial_standins
from skiptool.calibration.router_settings import inner_rate
from skiptool.calibration.router_threshold import refit_threshold
from skiptool.cli import app
from skiptool.config import dense_config, load_config
from skiptool.errors import ConfigError
from skiptool.policies import RouterPolicy, Routers, build_policy
from skiptool.runtime import skipping
from skiptool.standins import StandInSpec

from conftest import tiny_llama

LAYERS = 6


def _config(model, warmup: int = 4, cold: int = 1):
    return dense_config(model, source="tiny", cold_start=cold, cold_end=cold, warmup=warmup)


def _blocks(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _settings(steps: int = 3, **kw) -> rt.RouterTrainSettings:
    """Settings for the tiny model: `steps` steps of 2 blocks of 32 tokens."""
    base = dict(target_skip=0.3, tokens=steps * 2 * 32, lr=1e-2, seq_len=32, batch_size=2, init_blocks=2,
                heldout_blocks=2)
    return rt.RouterTrainSettings(**{**base, **kw})


def _random_routers(layers: list[int], hidden: int = 32, seed: int = 0) -> Routers:
    routers = Routers(hidden, layers)
    g = torch.Generator().manual_seed(seed)
    for lin in routers.nets.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=g)
        lin.bias.data = torch.randn(lin.bias.shape, generator=g)
    return routers


def test_routers_attach_only_to_skippable_layers(tiny_model, tmp_path):
    config = _config(tiny_model, cold=1)
    result = rt.train_router(tiny_model, adapter_for(tiny_model), config, _blocks(), tmp_path, _settings(steps=1))
    policy = build_policy(load_config(tmp_path))
    assert isinstance(policy, RouterPolicy)
    assert policy.routers.layers == config.skippable_layers == [1, 2, 3, 4]
    assert sorted(int(k) for k in policy.routers.nets) == [1, 2, 3, 4]
    with skipping(tiny_model, adapter_for(tiny_model), policy) as runtime:
        policy.threshold = 1e-6  # skip wherever allowed
        tiny_model(_blocks(1))
        per_layer = runtime.stats.per_layer()
    assert per_layer[0] == 0.0 and per_layer[-1] == 0.0 and all(per_layer[i] > 0 for i in (1, 2, 3, 4))
    assert result.cost["router_params_per_layer"] == 33


def test_a_training_step_changes_only_router_parameters(tiny_model):
    config = _config(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    routers = _random_routers(config.skippable_layers)
    routers_before = {k: v.clone() for k, v in routers.state_dict().items()}
    rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, _blocks(), _settings(steps=1))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in tiny_model.parameters())
    changed = [k for k, v in routers.state_dict().items() if not torch.equal(v, routers_before[k])]
    assert len(changed) == len(routers_before)


def test_joint_training_changes_routers_and_stand_ins_but_not_the_model(tiny_model):
    config = _config(tiny_model, warmup=0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    routers = _random_routers(config.skippable_layers)
    standins = initial_standins(tiny_model, adapter_for(tiny_model), config, _blocks(2),
                                   _settings(standin=StandInSpec("linear", 4)))
    standins_before = {k: v.clone() for k, v in standins.state_dict().items()}
    rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, _blocks(),
                     _settings(steps=2, standin=StandInSpec("linear", 4)), standins=standins)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    changed = [k for k, v in standins.state_dict().items() if not torch.equal(v, standins_before[k])]
    assert changed and all(k.endswith(("down.weight", "up.weight", "up.bias")) for k in changed)
    assert not any(p.requires_grad for p in (*standins.parameters(), *routers.parameters()))


@pytest.mark.parametrize("init", ["closed-form", "zero"])
def test_joint_stand_ins_start_from_the_closed_form_fit_or_from_zero(tiny_model, init):
    from skiptool.calibration.standin_fit import fit_standins

    config = _config(tiny_model, warmup=4)
    blocks = _blocks(2)
    standins = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                                   _settings(standin=StandInSpec("linear", 4), standin_init=init))
    x = torch.randn(3, 32)
    if init == "zero":
        assert all(torch.equal(m(x), torch.zeros_like(x)) for m in standins.by_layer().values())
    else:
        fitted = fit_standins(tiny_model, adapter_for(tiny_model), blocks, config.skippable_layers, 4, 4)
        for i, m in standins.by_layer().items():
            torch.testing.assert_close(m(x), fitted.by_layer()[i](x))
    assert initial_standins(tiny_model, adapter_for(tiny_model), config, blocks, _settings(standin=None)) is None


def test_train_router_writes_trained_stand_ins_that_the_runtime_loads(tiny_model, tmp_path):
    from skiptool.runtime import load_standins, open_runtime
    from skiptool.standins import StandInSpec, LowRankStandIn

    config = _config(tiny_model)
    result = rt.train_router(tiny_model, adapter_for(tiny_model), config, _blocks(), tmp_path,
                             _settings(steps=2, standin=StandInSpec("linear", 4)))
    saved = load_config(tmp_path)
    assert saved.standin is not None and saved.standin.rank == 4
    assert result.standin_path == tmp_path / rt.TRAINED_STANDIN_FILENAME and result.standin_path.is_file()
    assert saved.metadata["router_training"]["standin_init"] == "closed-form"
    assert result.cost["standin"]["standin_params"] == 2 * 32 * 4 + 32
    runtime = open_runtime(tiny_model, adapter_for(tiny_model), saved)
    try:
        subs = [layer.substitute for layer in runtime.layers if layer.skippable]
        assert len(subs) == 4 and all(isinstance(s, LowRankStandIn) and s.rank == 4 for s in subs)
    finally:
        runtime.remove()
    start = initial_standins(tiny_model, adapter_for(tiny_model), config, _blocks()[:2], _settings(standin=StandInSpec("linear", 4)))
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(),
                                                      load_standins(saved).state_dict().values()))  # trained


def test_without_trained_stand_ins_a_base_configs_own_are_copied_beside_the_router(tiny_model, tmp_path):
    from skiptool.config import ArtifactRef

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    config = _config(tiny_model)
    fitted = initial_standins(tiny_model, adapter_for(tiny_model), config, _blocks(2), _settings(standin=StandInSpec("linear", 4)))
    fitted.save(base_dir / "standin.safetensors")
    config = config.evolve(standin=ArtifactRef("standin.safetensors", 4), base_dir=base_dir)
    rt.train_router(tiny_model, adapter_for(tiny_model), config, _blocks(), tmp_path / "out",
                    _settings(steps=1, standin=None))
    saved = load_config(tmp_path / "out")
    assert saved.standin == ArtifactRef("standin.safetensors", 4)
    assert (tmp_path / "out" / "standin.safetensors").read_bytes() == (base_dir / "standin.safetensors").read_bytes()


def test_a_stand_in_rank_above_the_hidden_size_or_a_block_inside_the_warm_up_is_one_config_error(tiny_model,
                                                                                                 tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        rt.train_router(tiny_model, adapter_for(tiny_model), _config(tiny_model), _blocks(), tmp_path,
                        _settings(standin=StandInSpec("linear", 64)))
    with pytest.raises(ConfigError):
        rt.train_router(tiny_model, adapter_for(tiny_model), _config(tiny_model, warmup=32), _blocks(), tmp_path,
                        _settings(standin=StandInSpec("linear", 4)))
    assert not (tmp_path / "skip_config.json").exists()


def test_training_decisions_are_hard_in_the_forward_pass_with_a_gradient(tiny_model):
    config = _config(tiny_model, warmup=0)
    routers = _random_routers(config.skippable_layers)
    policy = RouterPolicy(LAYERS, config.skippable_layers, 0, routers)
    ids = _blocks(1)
    with skipping(tiny_model, adapter_for(tiny_model), policy) as runtime:
        with runtime.recording() as hard:
            inference_logits = tiny_model(ids).logits
            hard = {i: d.clone() for i, d in hard.items()}
        policy.train_decisions("ste")
        with torch.enable_grad():
            training_logits = tiny_model(ids).logits
            soft = policy.soft_decisions
            assert all(d.requires_grad for d in soft.values())
            assert all(torch.equal(soft[i].detach().bool(), hard[i]) for i in soft)
            training_logits.sum().backward()
    torch.testing.assert_close(training_logits.detach(), inference_logits, rtol=0, atol=1e-5)
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in routers.nets.values())


def test_the_skip_rate_penalty_drives_the_realised_rate_to_the_target(tiny_model):
    config = _config(tiny_model, warmup=4)
    routers = _random_routers(config.skippable_layers)
    for lin in routers.nets.values():  # start far below the target: almost nothing skips
        lin.weight.data *= 0.1
        lin.bias.data.fill_(-2.0)
    target = 0.3
    history = rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, _blocks(),
                               _settings(target_skip=target, steps=40, lr=0.05, penalty=100.0))
    first = history[0]["skip_ratio"]
    late = sum(h["skip_ratio"] for h in history[-15:]) / 15  # one batch's rate is noisy on a tiny model
    assert first < 0.05
    assert abs(late - target) < 0.05


def test_the_refitted_threshold_meets_the_target_realised_ratio(tiny_model):
    config = _config(tiny_model, warmup=4)
    routers = _random_routers(config.skippable_layers)
    held = refit_threshold(tiny_model, adapter_for(tiny_model), config, routers, _blocks(4, seed=5), 0.2)
    assert 0 < held.threshold < 1
    assert held.skip_ratio == pytest.approx(0.2, abs=0.02)
    policy = RouterPolicy(LAYERS, config.skippable_layers, 4, routers, held.threshold)
    with skipping(tiny_model, adapter_for(tiny_model), policy) as runtime, torch.no_grad():
        for batch in _blocks(4, seed=5).split(2):
            tiny_model(batch)
        assert runtime.stats.skip_ratio == pytest.approx(held.skip_ratio)


def test_inner_rate_counts_cold_layers_and_warmup(tiny_model):
    config = _config(tiny_model, warmup=8, cold=1)  # 4 of 6 layers, 24 of 32 positions may skip
    assert inner_rate(config, 0.25, 32) == pytest.approx(0.25 / (4 / 6 * 24 / 32))
    with pytest.raises(ConfigError, match="out of reach"):
        inner_rate(config, 0.6, 32)


def test_save_load_round_trips_exactly(tmp_path):
    routers = _random_routers([2, 3, 5], hidden=32)
    loaded = Routers.load(routers.save(tmp_path / "r.safetensors"), 32, [2, 3, 5])
    original, back = routers.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("hidden, layers, match", [(64, [2, 3, 5], "do not match"), (32, [2, 3], "do not match"),
                                                   (32, [2, 3, 4], "do not match")])
def test_mismatched_router_files_are_refused(tmp_path, hidden, layers, match):
    path = _random_routers([2, 3, 5]).save(tmp_path / "r.safetensors")
    with pytest.raises(ConfigError, match=match):
        Routers.load(path, hidden, layers)


# -- the command line ------------------------------------------------------------------------------------
def _text_file(path: Path, words: int = 3000) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(f"w{rng.randrange(120)}" for _ in range(words)), encoding="utf-8")
    return path


def _train_cli(model_dir: Path, out: Path, text: Path, *extra: str):
    base = out.parent / "base.json"
    if not base.exists():
        model = tiny_llama()
        _config(model).save(base)
    args = ["train-router", str(model_dir), "--config", str(base), "-o", str(out), "--data", str(text),
            "--part", "0:1", "--seq-len", "32", "--tokens", "64", "--target-skip", "0.2", "--json", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("router-cli")
    result = _train_cli(tiny_model_dir, root / "out", _text_file(root / "text.txt"))
    assert result.exit_code == 0, result.output
    return root / "out", json.loads(result.stdout)


def test_train_router_cli_writes_a_router_config(trained):
    out, report = trained
    config = load_config(out)
    assert config.policy.kind == "router" and config.router is not None
    assert config.policy.params["threshold"] == pytest.approx(report["threshold"])
    assert (out / "router.safetensors").is_file()
    assert config.warmup == 4 and config.cold_start == 1 and config.target_skip == 0.2
    cost = report["cost"]  # a tiny model's FFN is small: the < 1% share is checked on the demo model
    assert cost["ffn_params_per_layer"] == 3 * 32 * 64 and cost["router_params_per_layer"] == 33
    assert cost["flop_share"] == pytest.approx(cost["router_flops_per_token"] / cost["ffn_flops_per_token"])
    assert math.isfinite(report["heldout_perplexity"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_generate_runs_with_a_trained_router_config(trained, tiny_model_dir):
    out, _ = trained
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), "--config", str(out), "-p",
                                      " ".join(f"w{i}" for i in range(10)), "--raw", "-n", "4",
                                      "--router-threshold", "0.01"])
    assert result.exit_code == 0, result.output
    assert "policy router" in result.output


def test_eval_sweep_adds_the_router_curve_for_a_router_config(trained, tiny_model_dir, tmp_path):
    out, _ = trained
    text = out.parent / "text.txt"
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--config", str(out), "--data", str(text),
                                      "--part", "0:1", "--samples", "3", "--seq-len", "32", "--sweep",
                                      "--targets", "0.1,0.2", "--curves", "router,random", "-o", str(tmp_path),
                                      "--json", "--allow-overlap"])
    assert result.exit_code == 0, result.output
    points = json.loads(result.stdout)["sweep"]["curves"]["router"]
    assert [p["target"] for p in points] == [0.1, 0.2]
    # the threshold is refitted on the calibration blocks; a tiny random model's router logits shift a lot
    # between blocks, so only the order and a non-zero ratio are checked here
    assert 0 < points[0]["skip_ratio"] < points[1]["skip_ratio"]


@pytest.mark.parametrize("damage", ["missing", "wrong_layers", "wrong_hidden"])
def test_a_config_with_a_missing_or_mismatched_router_file_is_one_error_line(trained, tiny_model_dir, tmp_path,
                                                                          damage):
    out, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    config = load_config(out)
    config.save(bad)
    if damage == "wrong_layers":
        _random_routers([1, 2, 3]).save(bad / "router.safetensors")
    elif damage == "wrong_hidden":
        _random_routers(config.skippable_layers, hidden=16).save(bad / "router.safetensors")
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), "--config", str(bad), "-p", "w1 w2",
                                      "--raw", "-n", "2"])
    assert result.exit_code == 1
    expected = "not found" if damage == "missing" else "do not match"
    assert expected in result.output and "Traceback" not in result.output


def test_train_router_cli_refuses_an_unreachable_target(tiny_model_dir, tmp_path):
    result = _train_cli(tiny_model_dir, tmp_path / "out", _text_file(tmp_path / "t.txt"), "--target-skip", "0.9")
    assert result.exit_code == 1
    assert "out of reach" in result.output
    assert not (tmp_path / "out" / "skip_config.json").exists()


# -- the demo model --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_brief_training_on_the_demo_model_meets_the_ratio_and_evaluates(demo, tmp_path):
    from skiptool.data import DataSpec, token_blocks
    from skiptool.runtime import open_runtime

    config = dense_config(demo.model, source="smollm2-135m", warmup=32)
    blocks = token_blocks(demo.tokenizer, DataSpec(part=(0.0, 0.5)), 128, 10)
    settings = rt.RouterTrainSettings(target_skip=0.1, tokens=256, seq_len=128, batch_size=1, init_blocks=1,
                                      heldout_blocks=2)
    result = rt.train_router(demo.model, demo.adapter, config, blocks, tmp_path, settings)
    assert result.heldout.skip_ratio == pytest.approx(0.1, abs=0.02)
    assert result.cost["flop_share"] < 0.01
    eval_ids = token_blocks(demo.tokenizer, DataSpec(part=(0.5, 1.0)), 128, 1)
    runtime = open_runtime(demo.model, demo.adapter, load_config(tmp_path))
    try:
        with torch.no_grad():
            loss = demo.model(eval_ids, labels=eval_ids).loss.item()
        assert runtime.stats.skip_ratio > 0.0
    finally:
        runtime.remove()
    with torch.no_grad():
        dense_loss = demo.model(eval_ids, labels=eval_ids).loss.item()
    assert math.isfinite(loss) and loss < dense_loss + 1.0


# -- the token budget and the epochs -----------------------------------------------------------------------
@pytest.mark.parametrize("tokens, batch, seq, steps", [(65_536, 1, 512, 128), (1000, 1, 512, 2), (1024, 2, 512, 1),
                                                       (2_000_000, 1, 512, 3907)])
def test_the_token_budget_sets_the_steps_rounding_up(tokens, batch, seq, steps):
    assert rt.steps_for_tokens(tokens, batch, seq) == steps
    assert rt.RouterTrainSettings(tokens=tokens, batch_size=batch, seq_len=seq).steps == steps


def test_a_token_budget_below_one_is_refused():
    with pytest.raises(ConfigError, match="--tokens must be at least 1"):
        rt.RouterTrainSettings(tokens=0)


def test_the_cli_default_budget_is_the_settings_default():
    import inspect

    from skiptool.cli.pipeline_cmds import train_router as command

    defaults = {name: p.default.default for name, p in inspect.signature(command).parameters.items()}
    settings = rt.RouterTrainSettings()
    assert (defaults["tokens"], defaults["teacher_topk"], defaults["checkpoint_every"]) == \
        (settings.tokens, settings.teacher_topk, settings.checkpoint_every)
    assert (defaults["router"], defaults["router_init"], defaults["estimator"]) == \
        (settings.router, settings.router_init, settings.estimator)


def test_epochs_visit_every_block_once_in_a_seeded_order_that_changes_per_epoch():
    from skiptool.calibration.router_loop import step_rows

    blocks, batch = 6, 2
    order = torch.cat([step_rows(step, batch, blocks, seed=7) for step in range(6)])  # two epochs
    first, second = order[:blocks], order[blocks:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(blocks))
    assert not torch.equal(first, second)
    assert torch.equal(order, torch.cat([step_rows(step, batch, blocks, seed=7) for step in range(6)]))
    assert not torch.equal(order, torch.cat([step_rows(step, batch, blocks, seed=8) for step in range(6)]))


# -- the temperature schedule ---------------------------------------------------------------------------------
def test_the_annealed_temperature_starts_and_ends_at_its_endpoints_geometrically():
    schedule = rt.TemperatureSchedule.parse("2:0.3")
    assert schedule.at(0, 10) == pytest.approx(2.0) and schedule.at(9, 10) == pytest.approx(0.3)
    assert schedule.at(3, 7) == pytest.approx(math.sqrt(2.0 * 0.3))  # the middle step: the geometric mean
    assert rt.TemperatureSchedule.parse("0.5").at(5, 10) == 0.5 and str(schedule) == "2:0.3"


def test_training_follows_the_temperature_schedule(tiny_model):
    config = _config(tiny_model)
    settings = _settings(steps=4, estimator="gumbel", temperature=rt.TemperatureSchedule(2.0, 0.5))
    history = rt.train_routers(tiny_model, adapter_for(tiny_model), config, _random_routers(config.skippable_layers),
                               _blocks(), settings)
    expected = [2.0 * 0.25 ** (step / 3) for step in range(4)]  # 2.0 -> 0.5 geometrically over 4 steps
    assert [h["temperature"] for h in history] == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0", "-1", "2:0", "a:b", "1:2:3", ""])
def test_a_bad_temperature_is_one_config_error(text):
    with pytest.raises(ConfigError, match="--temperature"):
        rt.TemperatureSchedule.parse(text)


# -- the teacher: top-k targets and their cache -----------------------------------------------------------------
def test_the_topk_kl_equals_the_full_kl_when_k_covers_the_vocabulary():
    from skiptool.calibration.teacher import TeacherTargets, full_kl, teacher_targets, topk_kl

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(20, 128, generator=g) * 3, torch.randn(20, 128, generator=g) * 3
    logp = torch.log_softmax(teacher, -1)
    exact = TeacherTargets(*logp.sort(-1, descending=True), rest=torch.full((20,), float("-inf")))
    assert topk_kl(exact, student).item() == pytest.approx(full_kl(teacher, student).item(), rel=1e-6)
    stored = teacher_targets(teacher, 128)  # the same, rounded to float16 as the cache stores it
    assert topk_kl(stored, student).item() == pytest.approx(full_kl(teacher, student).item(), rel=1e-3)


def test_the_topk_kl_is_a_lower_bound_that_tightens_with_k():
    from skiptool.calibration.teacher import full_kl, teacher_targets, topk_kl

    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(20, 128, generator=g) * 3, torch.randn(20, 128, generator=g) * 3
    values = [topk_kl(teacher_targets(teacher, k), student).item() for k in (4, 16, 64)]
    assert values[0] <= values[1] <= values[2] <= full_kl(teacher, student).item() * (1 + 1e-3)


def test_the_topk_kl_gives_the_student_a_gradient():
    from skiptool.calibration.teacher import teacher_targets, topk_kl

    student = torch.randn(5, 128, requires_grad=True)
    topk_kl(teacher_targets(torch.randn(5, 128), 8), student).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


class _CountingTeacher:
    """Counts the blocks the dense model runs on (teacher passes) through monkeypatching ``dense_targets``."""

    def __init__(self, monkeypatch):
        from skiptool.calibration import teacher

        self.blocks = 0
        original = teacher.dense_targets

        def counted(rt_, ids, k):
            self.blocks += ids.shape[0]
            return original(rt_, ids, k)

        monkeypatch.setattr(teacher, "dense_targets", counted)


def _cached_run(model, tmp_path, blocks, cache_dir, **kw):
    from skiptool.calibration.teacher import TeacherCache

    config = _config(model)
    cache = TeacherCache.open(cache_dir, model, "tiny", 16) if cache_dir is not None else None
    return rt.train_routers(model, adapter_for(model), config, _random_routers(config.skippable_layers), blocks,
                            _settings(steps=4, teacher_topk=16, **kw), cache=cache)


def test_the_teacher_runs_once_per_block_and_later_epochs_and_runs_read_the_cache(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    blocks = _blocks(4)  # 4 steps of 2 blocks: two epochs
    first = _cached_run(tiny_model, tmp_path, blocks, tmp_path / "cache", estimator="gumbel")
    assert counter.blocks == 4  # the second epoch read the cache
    second = _cached_run(tiny_model, tmp_path, blocks, tmp_path / "cache", estimator="gumbel")
    assert counter.blocks == 4  # the second run did not run the teacher at all
    uncached = _cached_run(tiny_model, tmp_path, blocks, None, estimator="gumbel")
    assert counter.blocks == 4 + 8
    assert first == second == uncached  # the same run whether the targets are cached or fresh (noise included)


def test_the_teacher_cache_is_rebuilt_when_the_data_or_the_model_changes(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    _cached_run(tiny_model, tmp_path, _blocks(4), tmp_path / "cache")
    assert counter.blocks == 4
    _cached_run(tiny_model, tmp_path, _blocks(4, seed=1), tmp_path / "cache")  # other data
    assert counter.blocks == 8
    _cached_run(tiny_model, tmp_path, _blocks(4, seq=24), tmp_path / "cache", seq_len=24)  # another length
    assert counter.blocks == 12
    _cached_run(tiny_llama(seed=1), tmp_path, _blocks(4), tmp_path / "cache")  # another model
    assert counter.blocks == 16
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # one folder per model


def test_an_unreadable_cache_entry_is_computed_again(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    _cached_run(tiny_model, tmp_path, _blocks(4), tmp_path / "cache")
    entry = next((tmp_path / "cache").glob("*/*.safetensors"))
    entry.write_bytes(b"not safetensors")
    _cached_run(tiny_model, tmp_path, _blocks(4), tmp_path / "cache")
    assert counter.blocks == 5
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()]  # no temporary files left


# -- checkpoints and --resume ------------------------------------------------------------------------------------
def _interrupt_at(monkeypatch, step: int) -> None:
    """Make the run raise KeyboardInterrupt (as Ctrl-C would) during the loss of 1-based step `step`."""
    from skiptool.calibration import router_loop

    calls = {"n": 0}
    original = router_loop.topk_kl

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(router_loop, "topk_kl", interrupting)


def test_resuming_after_an_interruption_ends_where_an_uninterrupted_run_ends(tiny_model, tmp_path, monkeypatch):
    config, blocks = _config(tiny_model), _blocks(6)
    settings = _settings(steps=6, estimator="gumbel", temperature=rt.TemperatureSchedule(2.0, 0.5),
                         standin=StandInSpec("linear", 4), checkpoint_every=2)
    whole = rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path / "whole", settings)
    _interrupt_at(monkeypatch, 4)  # after the checkpoint of step 2, during step 4: the state after step 3 is saved
    with pytest.raises(KeyboardInterrupt, match="after step 3 of 6"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path / "parts", settings)
    assert (tmp_path / "parts" / ".checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "parts" / "skip_config.json").exists()
    monkeypatch.undo()
    resumed = rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path / "parts", settings,
                              resume=True)
    assert resumed.history == whole.history
    for name in ("router.safetensors", "router_standin.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "parts" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not (tmp_path / "parts" / ".checkpoint").exists()  # removed after the successful run


def test_a_checkpoint_made_with_other_settings_or_data_is_refused(tiny_model, tmp_path, monkeypatch):
    config, blocks = _config(tiny_model), _blocks(6)
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, _settings(steps=4))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="other settings: lr"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, _settings(steps=4, lr=0.5),
                        resume=True)
    with pytest.raises(ConfigError, match="other training data"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, _blocks(6, seed=3), tmp_path,
                        _settings(steps=4), resume=True)
    with pytest.raises(ConfigError, match="unfinished run"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, _settings(steps=4))


# -- router initialisation ------------------------------------------------------------------------------------
def test_the_recoverable_init_labels_stand_in_errors_and_equals_the_contribution_init_with_zeros(tiny_model):
    from skiptool.calibration.router_init import fit_initial_routers

    config, blocks = _config(tiny_model), _blocks(2)
    fit = lambda **kw: fit_initial_routers(tiny_model, adapter_for(tiny_model), config, blocks, 0.4, **kw)  # noqa: E731
    zeros = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                             _settings(standin=StandInSpec("linear", 4), standin_init="zero"))
    fitted = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                              _settings(standin=StandInSpec("linear", 4)))
    contribution = fit().state_dict()
    with_zeros = fit(substitutes=zeros.by_layer()).state_dict()
    recoverable = fit(substitutes=fitted.by_layer()).state_dict()
    assert all(torch.allclose(contribution[k], with_zeros[k], atol=1e-5) for k in contribution)
    assert any(not torch.allclose(contribution[k], recoverable[k], atol=1e-3) for k in contribution)


@pytest.mark.parametrize("kind", ["linear", "bottleneck"])
def test_the_initial_routers_skip_about_the_rate_on_their_own_blocks(tiny_model, kind):
    from skiptool.calibration.router_init import fit_initial_routers

    config, blocks = _config(tiny_model, warmup=0), _blocks(4)
    routers = fit_initial_routers(tiny_model, adapter_for(tiny_model), config, blocks, 0.3, kind=kind)
    assert routers.kind == kind
    with skipping(tiny_model, adapter_for(tiny_model), RouterPolicy(LAYERS, config.skippable_layers, 0, routers)) \
            as runtime, torch.no_grad():
        tiny_model(blocks)
        skipped = [runtime.stats.per_layer()[i] for i in config.skippable_layers]
    assert all(0.1 < r < 0.5 for r in skipped)  # later layers see skipped inputs: about, not exactly, the rate


# -- router kinds ---------------------------------------------------------------------------------------------
def test_bottleneck_routers_save_and_load_with_their_kind(tmp_path):
    routers = Routers(32, [1, 2], "bottleneck")
    for p in routers.parameters():
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    loaded = Routers.load(routers.save(tmp_path / "r.safetensors"), 32, [1, 2], "bottleneck")
    assert loaded.kind == "bottleneck" and loaded.nets["1"].down.out_features == 2
    features = torch.randn(3, 32)
    assert torch.equal(loaded.logit(1, features), routers.logit(1, features))
    assert Routers.load(tmp_path / "r.safetensors", 32, [1, 2]).kind == "bottleneck"  # the file says its kind


def test_a_router_file_of_another_kind_than_the_config_names_is_one_clear_error(tmp_path):
    path = Routers(32, [1, 2], "bottleneck").save(tmp_path / "r.safetensors")
    with pytest.raises(ConfigError, match="hold bottleneck routers, but the skip config names linear"):
        Routers.load(path, 32, [1, 2], "linear")
    old_style = _random_routers([1, 2]).save(tmp_path / "old.safetensors")  # files before kinds: linear
    with pytest.raises(ConfigError, match="hold linear routers, but the skip config names bottleneck"):
        Routers.load(old_style, 32, [1, 2], "bottleneck")


def test_a_trained_bottleneck_router_config_names_its_kind_and_its_cost(tiny_model, tmp_path):
    result = rt.train_router(tiny_model, adapter_for(tiny_model), _config(tiny_model), _blocks(), tmp_path,
                             _settings(steps=1, router="bottleneck"))
    config = load_config(tmp_path)
    assert config.router.kind == "bottleneck" and build_policy(config).routers.kind == "bottleneck"
    assert result.cost["router_params_per_layer"] == 32 * 2 + 2 + 2 + 1
    assert config.metadata["router_training"]["router"] == "bottleneck"


# -- the command line: budget, cache, checkpoints, kinds ---------------------------------------------------------
def test_the_progress_line_reports_loss_skip_ratio_and_tokens_per_second(tiny_model_dir, tmp_path):
    _config(tiny_llama()).save(tmp_path / "base.json")
    args = ["train-router", str(tiny_model_dir), "-c", str(tmp_path / "base.json"), "-o", str(tmp_path / "out"),
            "--data", str(_text_file(tmp_path / "t.txt")), "--part", "0:1", "--seq-len", "32", "--tokens", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if "train routers" in ln]
    assert lines and all("loss " in ln and "skip " in ln and "tok/s" in ln for ln in lines)
    assert "tokens at" in result.output  # the summary table's training row


@pytest.mark.parametrize("extra, fragment", [
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--resume"], "no checkpoint"),
    (["--teacher-cache", "{file}"], "is a file, not a folder"),
    (["--router", "mlp"], "--router must be one of linear, bottleneck"),
    (["--temperature", "2:-1"], "--temperature"),
])
def test_bad_training_options_are_one_error_line(tiny_model_dir, tmp_path, extra, fragment):
    from conftest import one_line_error

    (tmp_path / "file").write_text("x")
    extra = [e.replace("{file}", str(tmp_path / "file")) for e in extra]
    result = _train_cli(tiny_model_dir, tmp_path / "out", _text_file(tmp_path / "t.txt"), *extra)
    one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_one_error_line(tiny_model_dir, tmp_path):
    from conftest import one_line_error

    (tmp_path / "out" / ".checkpoint").mkdir(parents=True)
    (tmp_path / "out" / ".checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = _train_cli(tiny_model_dir, tmp_path / "out", _text_file(tmp_path / "t.txt"), "--resume")
    one_line_error(result, "cannot read the checkpoint")


def test_ctrl_c_keeps_a_checkpoint_that_resume_finishes(tiny_model_dir, tmp_path, monkeypatch):
    text = _text_file(tmp_path / "t.txt")
    _interrupt_at(monkeypatch, 2)
    result = _train_cli(tiny_model_dir, tmp_path / "out", text, "--tokens", "96", "--checkpoint-every", "0")
    assert result.exit_code == 130
    assert "error: interrupted after step 1 of 3" in result.output and "--resume" in result.output
    assert not (tmp_path / "out" / "skip_config.json").exists()
    monkeypatch.undo()
    result = _train_cli(tiny_model_dir, tmp_path / "out", text, "--tokens", "96", "--checkpoint-every", "0",
                        "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == 96 and load_config(tmp_path / "out").policy.kind == "router"
    assert not (tmp_path / "out" / ".checkpoint").exists()


def test_a_bottleneck_router_config_exports_with_parity(tiny_model_dir, tmp_path):
    from skiptool.exporters import ExportRequest, run_export

    result = _train_cli(tiny_model_dir, tmp_path / "out", _text_file(tmp_path / "t.txt"), "--router", "bottleneck",
                        "--stand-in", "none")
    assert result.exit_code == 0, result.output
    report = run_export("onnx", ExportRequest(str(tiny_model_dir), tmp_path / "export", tmp_path / "out",
                                              parity_steps=4))
    exported = load_config(tmp_path / "export")
    assert exported.router.kind == "bottleneck" and (tmp_path / "export" / exported.router.path).is_file()
    assert report.manifest.checks  # run_export refuses an export whose decisions or logits differ
