"""Model loading and the architecture registry."""

from __future__ import annotations

import pytest

from skiptool.adapters import adapter_for, adapter_for_model_type, supported_model_types
from skiptool.errors import ModelLoadError
from skiptool.info import ideal_speedup, model_info
from skiptool.models import load_model

from conftest import save_tiny_model_dir, tiny_llama


def test_local_directory_loads_with_its_adapter_and_frozen_weights(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert lm.adapter.family == "llama"
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id is not None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_each_supported_family_exposes_attention_norm_and_mlp(model_type):
    model = tiny_llama(model_type=model_type)
    adapter = adapter_for(model)
    layer = adapter.decoder_layers(model)[0]
    assert adapter.attention_of(layer) is not None
    assert adapter.post_attention_norm_of(layer) is not None
    assert adapter.mlp_parameter_count(layer) == 3 * 32 * 64


def test_unsupported_family_is_refused_by_name(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="llama"):
        adapter_for_model_type("gpt2")
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())


@pytest.mark.parametrize("source, message", [
    ("/does/not/exist", "model not found"),
    ("./missing-dir", "model not found"),
    ("nothere.gguf", "model file not found"),
])
def test_missing_models_are_clear_errors(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_corrupt_files_are_clear_errors(tmp_path):
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_model(str(bad_gguf))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot read model config"):
        load_model(str(tmp_path / "d"))


def test_directory_without_weights_is_a_clear_error(tmp_path):
    save_tiny_model_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path))


def test_info_reports_the_ffn_share_and_amdahl_speedups(tiny_model):
    info = model_info(tiny_model, adapter_for(tiny_model))
    h, f, layers, vocab = 32, 64, 6, 128
    ffn = 3 * h * f * layers
    attn = layers * (h * h * 2 + 2 * h * 16)  # q, o full; k, v with 2 of 4 heads (head_dim 8)
    norms = layers * 2 * h + h
    total = ffn + attn + norms + vocab * h  # untied LM head; the embedding lookup is excluded
    assert info["ffn_weight_share"] == pytest.approx(ffn / total)
    assert info["ideal_speedup"]["0.25"] == pytest.approx(1 / (1 - 0.25 * ffn / total))
    assert ideal_speedup(0.5, 0.6) == pytest.approx(1 / 0.7)
