"""The skip config file: round trip, validation, and matching against a model."""

from __future__ import annotations

import json

import pytest

from skiptool.config import SCHEMA_VERSION, ArtifactRef, ModelIdentity, PolicySpec, SkipConfig, dense_config, load_config
from skiptool.errors import ConfigError

IDENTITY = ModelIdentity("llama", 6, 32, 64, "tiny")


def _cosine(**kw) -> SkipConfig:
    return SkipConfig(IDENTITY, PolicySpec("cosine", {"thresholds": [None, .9, .9, .9, .9, None], "greedy_k": 2}),
                      target_skip=0.25, **kw)


def test_save_then_load_round_trips(tmp_path):
    cfg = _cosine(standin=ArtifactRef("standin.safetensors", rank=16), metadata={"note": "x"})
    path = cfg.save(tmp_path)
    loaded = load_config(path)
    assert loaded == cfg
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert loaded.resolve("standin.safetensors") == tmp_path.resolve() / "standin.safetensors"


def test_skippable_layers_exclude_the_cold_regions():
    assert SkipConfig(IDENTITY, cold_start=1, cold_end=2).skippable_layers == [1, 2, 3]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.update(bogus=1), "unknown skip config keys"),
    (lambda d: d.pop("model"), "'model'"),
    (lambda d: d["policy"].update(kind=""), "policy.kind"),
    (lambda d: d["policy"].update(params=[1]), "policy.params"),
    (lambda d: d.update(metadata=[1, 2]), "metadata must be an object"),
    (lambda d: d.update(cold_start=3, cold_end=3), "no skippable layer"),
    (lambda d: d.update(warmup=-1), "warmup"),
    (lambda d: d.update(target_skip=1.5), "target_skip"),
    (lambda d: d["model"].update(num_layers="six"), "num_layers"),
    (lambda d: d["model"].update(extra=1), "malformed"),
])
def test_malformed_configs_are_refused_with_a_clear_message(tmp_path, mutate, message):
    data = _cosine().to_dict()
    mutate(data)
    (tmp_path / "skip_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "skip_config.json")


def test_invalid_json_and_missing_file_are_config_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_a_config_for_another_model_does_not_match(tiny_model):
    dense_config(tiny_model).check_matches(tiny_model)
    other = SkipConfig(ModelIdentity("llama", 30, 576, 1536))
    with pytest.raises(ConfigError, match="num_layers 30 .config. vs 6 .model."):
        other.check_matches(tiny_model)
