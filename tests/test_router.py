"""DiffSkip router training (LLM frozen), its skip-rate control, its weights file and the train-router command."""

from __future__ import annotations

import json
import math

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

from router_helpers import LAYERS, random_blocks, random_routers, text_file, tiny_config, tiny_settings, train_cli


def test_routers_attach_only_to_skippable_layers(tiny_model, tmp_path):
    config = tiny_config(tiny_model, cold=1)
    result = rt.train_router(tiny_model, adapter_for(tiny_model), config, random_blocks(), tmp_path,
                             tiny_settings(steps=1))
    policy = build_policy(load_config(tmp_path))
    assert isinstance(policy, RouterPolicy)
    assert policy.routers.layers == config.skippable_layers == [1, 2, 3, 4]
    assert sorted(int(k) for k in policy.routers.nets) == [1, 2, 3, 4]
    with skipping(tiny_model, adapter_for(tiny_model), policy) as runtime:
        policy.threshold = 1e-6  # skip wherever allowed
        tiny_model(random_blocks(1))
        per_layer = runtime.stats.per_layer()
    assert per_layer[0] == 0.0 and per_layer[-1] == 0.0 and all(per_layer[i] > 0 for i in (1, 2, 3, 4))
    assert result.cost["router_params_per_layer"] == 33


def test_a_training_step_changes_only_router_parameters(tiny_model):
    config = tiny_config(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    routers = random_routers(config.skippable_layers)
    routers_before = {k: v.clone() for k, v in routers.state_dict().items()}
    rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, random_blocks(), tiny_settings(steps=1))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in tiny_model.parameters())
    changed = [k for k, v in routers.state_dict().items() if not torch.equal(v, routers_before[k])]
    assert len(changed) == len(routers_before)


def test_joint_training_changes_routers_and_stand_ins_but_not_the_model(tiny_model):
    config = tiny_config(tiny_model, warmup=0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    routers = random_routers(config.skippable_layers)
    standins = initial_standins(tiny_model, adapter_for(tiny_model), config, random_blocks(2),
                                   tiny_settings(standin=StandInSpec("linear", 4)))
    standins_before = {k: v.clone() for k, v in standins.state_dict().items()}
    rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, random_blocks(),
                     tiny_settings(steps=2, standin=StandInSpec("linear", 4)), standins=standins)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    changed = [k for k, v in standins.state_dict().items() if not torch.equal(v, standins_before[k])]
    assert changed and all(k.endswith(("down.weight", "up.weight", "up.bias")) for k in changed)
    assert not any(p.requires_grad for p in (*standins.parameters(), *routers.parameters()))


@pytest.mark.parametrize("init", ["closed-form", "zero"])
def test_joint_stand_ins_start_from_the_closed_form_fit_or_from_zero(tiny_model, init):
    from skiptool.calibration.standin_fit import fit_standins

    config = tiny_config(tiny_model, warmup=4)
    blocks = random_blocks(2)
    standins = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                                   tiny_settings(standin=StandInSpec("linear", 4), standin_init=init))
    x = torch.randn(3, 32)
    if init == "zero":
        assert all(torch.equal(m(x), torch.zeros_like(x)) for m in standins.by_layer().values())
    else:
        fitted = fit_standins(tiny_model, adapter_for(tiny_model), blocks, config.skippable_layers, 4, 4)
        for i, m in standins.by_layer().items():
            torch.testing.assert_close(m(x), fitted.by_layer()[i](x))
    assert initial_standins(tiny_model, adapter_for(tiny_model), config, blocks, tiny_settings(standin=None)) is None


def test_train_router_writes_trained_stand_ins_that_the_runtime_loads(tiny_model, tmp_path):
    from skiptool.runtime import load_standins, open_runtime
    from skiptool.standins import StandInSpec, LowRankStandIn

    config = tiny_config(tiny_model)
    result = rt.train_router(tiny_model, adapter_for(tiny_model), config, random_blocks(), tmp_path,
                             tiny_settings(steps=2, standin=StandInSpec("linear", 4)))
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
    start = initial_standins(tiny_model, adapter_for(tiny_model), config, random_blocks()[:2],
                             tiny_settings(standin=StandInSpec("linear", 4)))
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(),
                                                      load_standins(saved).state_dict().values()))  # trained


def test_without_trained_stand_ins_a_base_configs_own_are_copied_beside_the_router(tiny_model, tmp_path):
    from skiptool.config import ArtifactRef

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    config = tiny_config(tiny_model)
    fitted = initial_standins(tiny_model, adapter_for(tiny_model), config, random_blocks(2),
                              tiny_settings(standin=StandInSpec("linear", 4)))
    fitted.save(base_dir / "standin.safetensors")
    config = config.evolve(standin=ArtifactRef("standin.safetensors", 4), base_dir=base_dir)
    rt.train_router(tiny_model, adapter_for(tiny_model), config, random_blocks(), tmp_path / "out",
                    tiny_settings(steps=1, standin=None))
    saved = load_config(tmp_path / "out")
    assert saved.standin == ArtifactRef("standin.safetensors", 4)
    assert (tmp_path / "out" / "standin.safetensors").read_bytes() == (base_dir / "standin.safetensors").read_bytes()


def test_a_stand_in_rank_above_the_hidden_size_or_a_block_inside_the_warm_up_is_one_config_error(tiny_model,
                                                                                                 tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        rt.train_router(tiny_model, adapter_for(tiny_model), tiny_config(tiny_model), random_blocks(), tmp_path,
                        tiny_settings(standin=StandInSpec("linear", 64)))
    with pytest.raises(ConfigError):
        rt.train_router(tiny_model, adapter_for(tiny_model), tiny_config(tiny_model, warmup=32), random_blocks(),
                        tmp_path,
                        tiny_settings(standin=StandInSpec("linear", 4)))
    assert not (tmp_path / "skip_config.json").exists()


def test_training_decisions_are_hard_in_the_forward_pass_with_a_gradient(tiny_model):
    config = tiny_config(tiny_model, warmup=0)
    routers = random_routers(config.skippable_layers)
    policy = RouterPolicy(LAYERS, config.skippable_layers, 0, routers)
    ids = random_blocks(1)
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
    config = tiny_config(tiny_model, warmup=4)
    routers = random_routers(config.skippable_layers)
    for lin in routers.nets.values():  # start far below the target: almost nothing skips
        lin.weight.data *= 0.1
        lin.bias.data.fill_(-2.0)
    target = 0.3
    history = rt.train_routers(tiny_model, adapter_for(tiny_model), config, routers, random_blocks(),
                               tiny_settings(target_skip=target, steps=40, lr=0.05, penalty=100.0))
    first = history[0]["skip_ratio"]
    late = sum(h["skip_ratio"] for h in history[-15:]) / 15  # one batch's rate is noisy on a tiny model
    assert first < 0.05
    assert abs(late - target) < 0.05


def test_the_refitted_threshold_meets_the_target_realised_ratio(tiny_model):
    config = tiny_config(tiny_model, warmup=4)
    routers = random_routers(config.skippable_layers)
    held = refit_threshold(tiny_model, adapter_for(tiny_model), config, routers, random_blocks(4, seed=5), 0.2)
    assert 0 < held.threshold < 1
    assert held.skip_ratio == pytest.approx(0.2, abs=0.02)
    policy = RouterPolicy(LAYERS, config.skippable_layers, 4, routers, held.threshold)
    with skipping(tiny_model, adapter_for(tiny_model), policy) as runtime, torch.no_grad():
        for batch in random_blocks(4, seed=5).split(2):
            tiny_model(batch)
        assert runtime.stats.skip_ratio == pytest.approx(held.skip_ratio)


def test_inner_rate_counts_cold_layers_and_warmup(tiny_model):
    config = tiny_config(tiny_model, warmup=8, cold=1)  # 4 of 6 layers, 24 of 32 positions may skip
    assert inner_rate(config, 0.25, 32) == pytest.approx(0.25 / (4 / 6 * 24 / 32))
    with pytest.raises(ConfigError, match="out of reach"):
        inner_rate(config, 0.6, 32)


def test_save_load_round_trips_exactly(tmp_path):
    routers = random_routers([2, 3, 5], hidden=32)
    loaded = Routers.load(routers.save(tmp_path / "r.safetensors"), 32, [2, 3, 5])
    original, back = routers.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("hidden, layers, match", [(64, [2, 3, 5], "do not match"), (32, [2, 3], "do not match"),
                                                   (32, [2, 3, 4], "do not match")])
def test_mismatched_router_files_are_refused(tmp_path, hidden, layers, match):
    path = random_routers([2, 3, 5]).save(tmp_path / "r.safetensors")
    with pytest.raises(ConfigError, match=match):
        Routers.load(path, hidden, layers)


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("router-cli")
    result = train_cli(tiny_model_dir, root / "out", text_file(root / "text.txt"))
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
        random_routers([1, 2, 3]).save(bad / "router.safetensors")
    elif damage == "wrong_hidden":
        random_routers(config.skippable_layers, hidden=16).save(bad / "router.safetensors")
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), "--config", str(bad), "-p", "w1 w2",
                                      "--raw", "-n", "2"])
    assert result.exit_code == 1
    expected = "not found" if damage == "missing" else "do not match"
    assert expected in result.output and "Traceback" not in result.output


def test_train_router_cli_refuses_an_unreachable_target(tiny_model_dir, tmp_path):
    result = train_cli(tiny_model_dir, tmp_path / "out", text_file(tmp_path / "t.txt"), "--target-skip", "0.9")
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


# -- router initialisation ------------------------------------------------------------------------------------
def test_the_recoverable_init_labels_stand_in_errors_and_equals_the_contribution_init_with_zeros(tiny_model):
    from skiptool.calibration.router_init import fit_initial_routers

    config, blocks = tiny_config(tiny_model), random_blocks(2)
    fit = lambda **kw: fit_initial_routers(tiny_model, adapter_for(tiny_model), config, blocks, 0.4, **kw)  # noqa: E731
    zeros = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                             tiny_settings(standin=StandInSpec("linear", 4), standin_init="zero"))
    fitted = initial_standins(tiny_model, adapter_for(tiny_model), config, blocks,
                              tiny_settings(standin=StandInSpec("linear", 4)))
    contribution = fit().state_dict()
    with_zeros = fit(substitutes=zeros.by_layer()).state_dict()
    recoverable = fit(substitutes=fitted.by_layer()).state_dict()
    assert all(torch.allclose(contribution[k], with_zeros[k], atol=1e-5) for k in contribution)
    assert any(not torch.allclose(contribution[k], recoverable[k], atol=1e-3) for k in contribution)


@pytest.mark.parametrize("kind", ["linear", "bottleneck"])
def test_the_initial_routers_skip_about_the_rate_on_their_own_blocks(tiny_model, kind):
    from skiptool.calibration.router_init import fit_initial_routers

    config, blocks = tiny_config(tiny_model, warmup=0), random_blocks(4)
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
    old_style = random_routers([1, 2]).save(tmp_path / "old.safetensors")  # files before kinds: linear
    with pytest.raises(ConfigError, match="hold linear routers, but the skip config names bottleneck"):
        Routers.load(old_style, 32, [1, 2], "bottleneck")


def test_a_trained_bottleneck_router_config_names_its_kind_and_its_cost(tiny_model, tmp_path):
    result = rt.train_router(tiny_model, adapter_for(tiny_model), tiny_config(tiny_model), random_blocks(), tmp_path,
                             tiny_settings(steps=1, router="bottleneck"))
    config = load_config(tmp_path)
    assert config.router.kind == "bottleneck" and build_policy(config).routers.kind == "bottleneck"
    assert result.cost["router_params_per_layer"] == 32 * 2 + 2 + 2 + 1
    assert config.metadata["router_training"]["router"] == "bottleneck"


def test_a_bottleneck_router_config_exports_with_parity(tiny_model_dir, tmp_path):
    from skiptool.exporters import ExportRequest, run_export

    result = train_cli(tiny_model_dir, tmp_path / "out", text_file(tmp_path / "t.txt"), "--router", "bottleneck",
                        "--stand-in", "none")
    assert result.exit_code == 0, result.output
    report = run_export("onnx", ExportRequest(str(tiny_model_dir), tmp_path / "export", tmp_path / "out",
                                              parity_steps=4))
    exported = load_config(tmp_path / "export")
    assert exported.router.kind == "bottleneck" and (tmp_path / "export" / exported.router.path).is_file()
    assert report.manifest.checks  # run_export refuses an export whose decisions or logits differ
