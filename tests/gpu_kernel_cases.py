"""Run the Triton FFN kernels on the CPU under ``TRITON_INTERPRET=1`` and compare them with the reference.

Run as a script by ``tests/test_gpu_path.py`` in a subprocess (the variable must be set before Triton builds the
kernels, and must not leak into other tests). Prints one JSON object: case name -> its measured error or flag.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from skiptool.gpu.kernels import reference_skippable_ffn  # noqa: E402
from skiptool.gpu.triton_ffn import Tiles, launches, triton_skippable_ffn  # noqa: E402
from skiptool.gpu.weights import FFNWeights, SubstituteWeights  # noqa: E402

HIDDEN, INTERMEDIATE, RANK, CORE = 64, 96, 8, 40
# Tiles wider than the matrices: every column and K loop ends in a masked tail.
RAGGED = Tiles(block_m=16, block_n_gate_up=64, block_k_gate_up=128, block_n_down=128, block_k_down=64,
               block_k_substitute=64)


def weights(dtype: torch.dtype, seed: int, standin: str | None) -> tuple[FFNWeights, SubstituteWeights | None]:
    """A random FFN and stand-in: ``"linear"`` (rank RANK), ``"core"`` (CORE neurons, two column tiles of 16 and a
    masked tail), or None."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    ffn = FFNWeights(draw(INTERMEDIATE, HIDDEN), draw(INTERMEDIATE, HIDDEN), draw(HIDDEN, INTERMEDIATE))
    if standin == "linear":
        return ffn, SubstituteWeights(draw(RANK, HIDDEN), draw(HIDDEN, RANK), draw(HIDDEN))
    if standin == "core":
        return ffn, SubstituteWeights(draw(CORE, HIDDEN), draw(HIDDEN, CORE), draw(HIDDEN), draw(CORE, HIDDEN))
    return ffn, None


def _float(weights: tuple | None) -> tuple | None:
    return None if weights is None else type(weights)(*(w if w is None else w.float() for w in weights))


def relative_error(decisions: torch.Tensor, rows: int, standin: str | None = "linear",
                   dtype: torch.dtype = torch.float32, tiles: Tiles | None = None) -> float:
    """‖triton − reference‖ / ‖reference‖ (reference in fp32 from the same rounded weights)."""
    ffn, sub = weights(dtype, seed=rows, standin=standin)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows + 1)).to(dtype)
    got = triton_skippable_ffn(x, ffn, decisions, sub, tiles).float()
    ref = reference_skippable_ffn(x.float(), _float(ffn), decisions, _float(sub))
    scale = ref.norm().item() or 1.0  # all-skip with zeros: an absolute error
    return (got - ref).norm().item() / scale


def untouched_after(decisions: torch.Tensor, buffer: str, standin: str = "linear") -> bool:
    """Whether the launches left an internal buffer (poisoned with NaN) unwritten: ``h_ptr`` is the FFN's
    intermediate, ``t_ptr`` the stand-in's inner step."""
    ffn, sub = weights(torch.float32, seed=7, standin=standin)
    x = torch.randn(decisions.numel(), HIDDEN)
    planned, out = launches(x, ffn, decisions, sub)
    poisoned = planned[0].args[buffer].fill_(float("nan"))
    for launch in planned:
        launch.kernel[launch.grid](**launch.args, **launch.options)
    expected = reference_skippable_ffn(x, ffn, decisions, sub)
    return bool(poisoned.isnan().all()) and torch.allclose(out, expected, atol=1e-6)


def mixed(rows: int) -> torch.Tensor:
    return torch.arange(rows) % 3 == 1


def cases() -> dict[str, float | bool]:
    ones, zeros = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    return {
        "skip_all_zero": relative_error(ones, 4, standin=None),
        "skip_all_standin": relative_error(ones, 4),
        "compute_all_zero": relative_error(zeros, 4, standin=None),
        "compute_all_standin": relative_error(zeros, 4),
        "mixed_zero": relative_error(mixed(5), 5, standin=None),
        "mixed_standin": relative_error(mixed(5), 5),
        "one_row_computes": relative_error(torch.zeros(1, dtype=torch.bool), 1),
        "layer_flag_skips_every_row": relative_error(torch.tensor(True), 3),
        "integer_decisions": relative_error(torch.tensor([0, 1, 1, 0], dtype=torch.int64), 4),
        "two_row_blocks_mixed": relative_error(mixed(70), 70),
        "masked_tails_mixed": relative_error(mixed(5), 5, tiles=RAGGED),
        "skip_all_core": relative_error(ones, 4, standin="core"),
        "mixed_core": relative_error(mixed(5), 5, standin="core"),
        "two_row_blocks_mixed_core": relative_error(mixed(70), 70, standin="core"),
        "masked_tails_mixed_core": relative_error(mixed(5), 5, standin="core", tiles=RAGGED),
        "fp16_mixed_standin": relative_error(mixed(6), 6, dtype=torch.float16),
        "fp16_mixed_core": relative_error(mixed(6), 6, standin="core", dtype=torch.float16),
        "all_skip_leaves_ffn_intermediate_unwritten": untouched_after(ones, "h_ptr"),
        "no_skip_leaves_standin_bottleneck_unwritten": untouched_after(zeros, "t_ptr"),
        "no_skip_leaves_core_inner_unwritten": untouched_after(zeros, "t_ptr", standin="core"),
    }


if __name__ == "__main__":
    json.dump(cases(), sys.stdout)
