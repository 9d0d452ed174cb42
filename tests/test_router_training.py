"""Router training at scale: the token budget and epochs, the temperature schedule, the teacher's top-k targets and
their cache, checkpoints and --resume, and what the train-router command shows and refuses about them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from skiptool.adapters import adapter_for
from skiptool.calibration import router_train as rt
from skiptool.cli import app
from skiptool.config import load_config
from skiptool.errors import ConfigError
from skiptool.standins import StandInSpec

from conftest import tiny_llama
from router_helpers import interrupt_at, random_blocks, random_routers, text_file, tiny_config, tiny_settings, train_cli


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
    config = tiny_config(tiny_model)
    settings = tiny_settings(steps=4, estimator="gumbel", temperature=rt.TemperatureSchedule(2.0, 0.5))
    history = rt.train_routers(tiny_model, adapter_for(tiny_model), config, random_routers(config.skippable_layers),
                               random_blocks(), settings)
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

    config = tiny_config(model)
    cache = TeacherCache.open(cache_dir, model, "tiny", 16) if cache_dir is not None else None
    return rt.train_routers(model, adapter_for(model), config, random_routers(config.skippable_layers), blocks,
                            tiny_settings(steps=4, teacher_topk=16, **kw), cache=cache)


def test_the_teacher_runs_once_per_block_and_later_epochs_and_runs_read_the_cache(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    blocks = random_blocks(4)  # 4 steps of 2 blocks: two epochs
    first = _cached_run(tiny_model, tmp_path, blocks, tmp_path / "cache", estimator="gumbel")
    assert counter.blocks == 4  # the second epoch read the cache
    second = _cached_run(tiny_model, tmp_path, blocks, tmp_path / "cache", estimator="gumbel")
    assert counter.blocks == 4  # the second run did not run the teacher at all
    uncached = _cached_run(tiny_model, tmp_path, blocks, None, estimator="gumbel")
    assert counter.blocks == 4 + 8
    assert first == second == uncached  # the same run whether the targets are cached or fresh (noise included)


def test_the_teacher_cache_is_rebuilt_when_the_data_or_the_model_changes(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    _cached_run(tiny_model, tmp_path, random_blocks(4), tmp_path / "cache")
    assert counter.blocks == 4
    _cached_run(tiny_model, tmp_path, random_blocks(4, seed=1), tmp_path / "cache")  # other data
    assert counter.blocks == 8
    _cached_run(tiny_model, tmp_path, random_blocks(4, seq=24), tmp_path / "cache", seq_len=24)  # another length
    assert counter.blocks == 12
    _cached_run(tiny_llama(seed=1), tmp_path, random_blocks(4), tmp_path / "cache")  # another model
    assert counter.blocks == 16
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # one folder per model


def test_an_unreadable_cache_entry_is_computed_again(tiny_model, tmp_path, monkeypatch):
    counter = _CountingTeacher(monkeypatch)
    _cached_run(tiny_model, tmp_path, random_blocks(4), tmp_path / "cache")
    entry = next((tmp_path / "cache").glob("*/*.safetensors"))
    entry.write_bytes(b"not safetensors")
    _cached_run(tiny_model, tmp_path, random_blocks(4), tmp_path / "cache")
    assert counter.blocks == 5
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()]  # no temporary files left


# -- checkpoints and --resume ------------------------------------------------------------------------------------
def test_resuming_after_an_interruption_ends_where_an_uninterrupted_run_ends(tiny_model, tmp_path, monkeypatch):
    config, blocks = tiny_config(tiny_model), random_blocks(6)
    settings = tiny_settings(steps=6, estimator="gumbel", temperature=rt.TemperatureSchedule(2.0, 0.5),
                         standin=StandInSpec("linear", 4), checkpoint_every=2)
    whole = rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path / "whole", settings)
    interrupt_at(monkeypatch, 4)  # after the checkpoint of step 2, during step 4: the state after step 3 is saved
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
    config, blocks = tiny_config(tiny_model), random_blocks(6)
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, tiny_settings(steps=4))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="other settings: lr"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, tiny_settings(steps=4, lr=0.5),
                        resume=True)
    with pytest.raises(ConfigError, match="other training data"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, random_blocks(6, seed=3), tmp_path,
                        tiny_settings(steps=4), resume=True)
    with pytest.raises(ConfigError, match="unfinished run"):
        rt.train_router(tiny_model, adapter_for(tiny_model), config, blocks, tmp_path, tiny_settings(steps=4))


# -- the command line: budget, cache, checkpoints, kinds ---------------------------------------------------------
def test_the_progress_line_reports_loss_skip_ratio_and_tokens_per_second(tiny_model_dir, tmp_path):
    tiny_config(tiny_llama()).save(tmp_path / "base.json")
    args = ["train-router", str(tiny_model_dir), "-c", str(tmp_path / "base.json"), "-o", str(tmp_path / "out"),
            "--data", str(text_file(tmp_path / "t.txt")), "--part", "0:1", "--seq-len", "32", "--tokens", "64"]
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
    result = train_cli(tiny_model_dir, tmp_path / "out", text_file(tmp_path / "t.txt"), *extra)
    one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_one_error_line(tiny_model_dir, tmp_path):
    from conftest import one_line_error

    (tmp_path / "out" / ".checkpoint").mkdir(parents=True)
    (tmp_path / "out" / ".checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = train_cli(tiny_model_dir, tmp_path / "out", text_file(tmp_path / "t.txt"), "--resume")
    one_line_error(result, "cannot read the checkpoint")


def test_ctrl_c_keeps_a_checkpoint_that_resume_finishes(tiny_model_dir, tmp_path, monkeypatch):
    text = text_file(tmp_path / "t.txt")
    interrupt_at(monkeypatch, 2)
    result = train_cli(tiny_model_dir, tmp_path / "out", text, "--tokens", "96", "--checkpoint-every", "0")
    assert result.exit_code == 130
    assert "error: interrupted after step 1 of 3" in result.output and "--resume" in result.output
    assert not (tmp_path / "out" / "skip_config.json").exists()
    monkeypatch.undo()
    result = train_cli(tiny_model_dir, tmp_path / "out", text, "--tokens", "96", "--checkpoint-every", "0",
                        "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == 96 and load_config(tmp_path / "out").policy.kind == "router"
    assert not (tmp_path / "out" / ".checkpoint").exists()
