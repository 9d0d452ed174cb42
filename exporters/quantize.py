"""Weight quantization of an exported graph with ONNX Runtime's quantizers, ``If`` branches included.

Both schemes are ONNX Runtime's block-wise weight quantizer (``MatMulNBits``, symmetric, block 32,
``accuracy_level`` 4: activations quantized to int8 per block at run time on CPU), which walks the ``If``
branches as they are:

- ``int8``: 8-bit block weights. Measured on the demo model (SmolLM2-135M, WikiText-2 test, 2 x 256
  tokens): perplexity 1.01x the fp32 export's, top-1 token agreement with fp32 96 %.
- ``int4``: 4-bit block weights: perplexity 1.29x fp32, top-1 agreement 66 % (same slice).

Why not ``quantize_dynamic`` (``MatMulInteger``) for int8: it quantizes each activation per tensor, and the
input of ``down_proj`` (SiLU(gate) * up) has outlier channels that such a single scale cannot hold: on the
demo it gave perplexity 1.78x fp32 (1.06x with every ``down_proj`` left in fp32); per-channel weights
without ``reduce_range`` were unusable on AVX2 CPUs without VNNI (u8 x s8 products saturate). Block-wise
scales keep the outliers to their own block.

The quantizer returns the number of quantized ops inside ``If`` branches, and refuses a result where the
branches' MatMuls were left unquantized or quantized to another bit width.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from skiptool.errors import SkipToolError

from skiptool.onnx_graph import EXTERNAL_DATA_OVER, count_ops, iter_nodes

QUANTIZED_OP = {"int8": "MatMulNBits", "int4": "MatMulNBits"}
BITS = {"int8": 8, "int4": 4}
BLOCK = 32
ACCURACY_LEVEL = 4  # int8 activations per block (MLAS's fast CPU kernels)
# Quality of each scheme relative to the fp32 export (perplexity ratio), as measured on the demo model
# (see the module docstring); the integration test checks int8 against its bound.
PERPLEXITY_RATIO_BOUND = {"int8": 1.05, "int4": 1.5}


def quantize_graph(source: Path, target: Path, scheme: str) -> int:
    """Quantize `source` into `target`; return how many quantized ops sit inside ``If`` branches."""
    if scheme not in QUANTIZED_OP:
        raise SkipToolError(f"unknown quantization {scheme!r} (expected int8 or int4)")
    external = _weight_bytes(source) > EXTERNAL_DATA_OVER
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        _block_weights(source, target, BITS[scheme], external)
    except SkipToolError:
        raise
    except Exception as exc:  # noqa: BLE001 - quantizer failures become one line
        raise SkipToolError(f"{scheme} quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return check_quantized(onnx.load(str(target), load_external_data=False), scheme)


def check_quantized(model: onnx.ModelProto, scheme: str) -> int:
    """Count the quantized ops inside ``If`` branches; fail if any branch MatMul stayed in float or has
    another bit width than `scheme`'s."""
    quantized = count_ops(model, QUANTIZED_OP[scheme], in_branches_only=True)
    left = count_ops(model, "MatMul", in_branches_only=True)
    if left:
        raise SkipToolError(f"{scheme} quantization left {left} MatMul ops inside If branches unquantized")
    widths = {_bits(node) for node, inside in iter_nodes(model.graph) if inside and node.op_type == "MatMulNBits"}
    if widths - {BITS[scheme]}:
        raise SkipToolError(f"{scheme} quantization wrote {sorted(widths)}-bit weights inside If branches")
    return quantized


def _bits(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def _weight_bytes(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def _block_weights(source: Path, target: Path, bits: int, external: bool) -> None:
    quantizer = _quantizer(onnx.load(str(source)), bits)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)


def _quantizer(model: onnx.ModelProto, bits: int) -> Any:
    """ONNX Runtime's block-wise quantizer run over `model` (every MatMul weight, ``If`` branches included)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer


def quantize_model(model: onnx.ModelProto, scheme: str) -> onnx.ModelProto:
    """A small in-memory graph (e.g. a stand-in) quantized with the same scheme as whole exports."""
    if scheme not in BITS:
        raise SkipToolError(f"unknown quantization {scheme!r} (expected int8 or int4)")
    return _quantizer(model, BITS[scheme]).model.model
