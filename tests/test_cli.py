"""The command line: help texts, the foundation commands, and one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from skiptool.cli import app
from skiptool.config import ModelIdentity, SkipConfig

runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def _assert_one_line_error(result, fragment: str) -> None:
    one_line_error(result, fragment)


def test_every_command_has_help():
    assert {"info", "generate"} <= set(_commands())
    for name in _commands():
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_info_json_has_the_documented_keys(tiny_model_dir):
    result = runner.invoke(app, ["info", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_layers"] == 6
    assert 0 < data["ffn_weight_share"] < 1
    assert set(data["ideal_speedup"]) == {"0.10", "0.25", "0.50"}


def test_generate_with_a_static_config_reports_the_skip_ratio(tiny_model_dir, tmp_path):
    from skiptool.models import load_model

    model = load_model(str(tiny_model_dir)).model
    cfg = SkipConfig(ModelIdentity.of(model), warmup=0).with_policy("static", skip_layers=[2, 3])
    cfg.save(tmp_path)
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "--prompt", "w1 w2 w3", "--raw", "-n", "5",
                                 "--config", str(tmp_path / "skip_config.json")])
    assert result.exit_code == 0, result.output
    assert "policy static" in result.output
    assert "FFN skip ratio 33.3%" in result.output  # 2 of 6 layers, every decoded token


def test_missing_model_is_one_line_error():
    _assert_one_line_error(runner.invoke(app, ["info", "/no/such/model"]), "model not found")


def test_mismatched_config_is_one_line_error(tiny_model_dir, tmp_path):
    SkipConfig(ModelIdentity("llama", 30, 576, 1536)).save(tmp_path)
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "-p", "w1", "--raw",
                                 "--config", str(tmp_path / "skip_config.json")])
    _assert_one_line_error(result, "does not match the model")


def test_malformed_config_is_one_line_error(tiny_model_dir, tmp_path):
    (tmp_path / "c.json").write_text('{"schema_version": 1}')
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "-p", "w1", "--config", str(tmp_path / "c.json")])
    _assert_one_line_error(result, "model")


def test_the_console_script_exits_non_zero_without_traceback():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "skiptool.cli", "info", "/no/such/model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "model not found" in proc.stderr


@pytest.mark.integration
def test_demo_model_answers_paris(demo):
    from skiptool.generate import generate

    result = generate(demo, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in result.text


@pytest.mark.integration
def test_demo_model_info_through_the_cli(demo):
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_layers"] == 30 and data["hidden_size"] == 576
    assert 0.55 < data["ffn_weight_share"] < 0.65


@pytest.mark.integration
def test_demo_model_generates_with_a_static_skip_config(demo, tmp_path):
    cfg = SkipConfig(ModelIdentity.of(demo.model), warmup=4).with_policy("static", skip_layers=[10, 20])
    cfg.save(tmp_path)
    result = runner.invoke(app, ["generate", "-p", "What is the capital of France?", "-n", "12",
                                 "--config", str(tmp_path / "skip_config.json")])
    assert result.exit_code == 0, result.output
    assert "policy static" in result.output and "FFN skip ratio 0.0%" not in result.output
