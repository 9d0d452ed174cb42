"""The I/O contract of exported graphs, in one place.

Names follow Hugging Face Optimum and onnxruntime-genai so existing tools recognise the model:
``input_ids``, ``attention_mask``, ``position_ids`` (int64), ``past_key_values.{i}.key/.value``
(``[batch, kv_heads, past_len, head_dim]``) in; ``logits`` and ``present.{i}.key/.value`` out.
skiptool adds an optional ``skip_mask`` input (int64 ``[num_layers]``: 1 force skip, -1 force compute,
0 follow the policy; an initializer of zeros backs it, so it may be omitted) and a ``skip_decisions``
output (bool ``[num_layers, batch, seq]``: which FFNs were skipped, per token; cold layers all false).
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
SKIP_MASK = "skip_mask"
LOGITS = "logits"
SKIP_DECISIONS = "skip_decisions"

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
PRESENT = "present_sequence_length"


@dataclass(frozen=True)
class GraphIO:
    """Names and dynamic axes of a decoder graph with `num_layers` layers."""

    num_layers: int

    def past_names(self) -> list[str]:
        """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
        return [n % i for i in range(self.num_layers) for n in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [n % i for i in range(self.num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]

    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.past_names(), SKIP_MASK]

    def output_names(self) -> list[str]:
        return [LOGITS, *self.present_names(), SKIP_DECISIONS]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Optimum-style dynamic axes of every input and output (``skip_mask`` has none)."""
        axes: dict[str, dict[int, str]] = {
            INPUT_IDS: {0: BATCH, 1: SEQUENCE},
            ATTENTION_MASK: {0: BATCH, 1: TOTAL},
            POSITION_IDS: {0: BATCH, 1: SEQUENCE},
            LOGITS: {0: BATCH, 1: SEQUENCE},
            SKIP_DECISIONS: {1: BATCH, 2: SEQUENCE},
        }
        axes.update({name: {0: BATCH, 2: PAST} for name in self.past_names()})
        axes.update({name: {0: BATCH, 2: PRESENT} for name in self.present_names()})
        return axes


def genai_io() -> dict[str, dict[str, str]]:
    """The ``inputs`` / ``outputs`` sections of onnxruntime-genai's ``genai_config.json``."""
    return {
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }
