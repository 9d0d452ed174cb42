"""Weight quantization of an exported graph with ONNX Runtime's quantizers, ``If`` branches included.

- ``int8``: dynamic quantization (``MatMulInteger``); ONNX Runtime leaves subgraphs in fp32 unless told
  ``EnableSubgraph``, so it is.
- ``int4``: 4-bit block weights (``MatMulNBits``, symmetric, block 32, int8 activations on CPU).

Each returns the number of quantized ops inside ``If`` branches, and refuses a result where the
branches' MatMuls were left unquantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from skiptool.errors import SkipToolError

from .onnx import EXTERNAL_DATA_OVER, count_ops

QUANTIZED_OP = {"int8": "MatMulInteger", "int4": "MatMulNBits"}
INT4_BLOCK = 32


def quantize_graph(source: Path, target: Path, scheme: str) -> int:
    """Quantize `source` into `target`; return how many quantized ops sit inside ``If`` branches."""
    if scheme not in QUANTIZED_OP:
        raise SkipToolError(f"unknown quantization {scheme!r} (expected int8 or int4)")
    external = _weight_bytes(source) > EXTERNAL_DATA_OVER
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        (_int8 if scheme == "int8" else _int4)(source, target, external)
    except SkipToolError:
        raise
    except Exception as exc:  # noqa: BLE001 - quantizer failures become one line
        raise SkipToolError(f"{scheme} quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return check_quantized(onnx.load(str(target), load_external_data=False), scheme)


def check_quantized(model: onnx.ModelProto, scheme: str) -> int:
    """Count the quantized ops inside ``If`` branches; fail if any branch MatMul stayed in float."""
    quantized = count_ops(model, QUANTIZED_OP[scheme], in_branches_only=True)
    left = count_ops(model, "MatMul", in_branches_only=True)
    if left:
        raise SkipToolError(f"{scheme} quantization left {left} MatMul ops inside If branches unquantized")
    return quantized


def _weight_bytes(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def _int8(source: Path, target: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=external,
                     extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})


def _int4(source: Path, target: Path, external: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
