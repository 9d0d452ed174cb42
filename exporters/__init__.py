"""``skiptool.exporters``: export targets, each registered by name in :data:`EXPORT_TARGETS`.

- ``onnx`` (:mod:`.onnx`): standard ONNX ops, an ``If`` per skippable FFN, traced from the PyTorch runtime;
- ``ort`` (:mod:`.ort_target`): onnxruntime-genai's fused graph with an ``If`` per skippable FFN;
- ``tensorrt`` (:mod:`.tensorrt`): the ``onnx`` graph plus a TensorRT engine.

Shared parts: :mod:`.validate` (parity with the PyTorch runtime, enforced), :mod:`.quantize` (int8/int4
weights, ``If`` branches included). A new target is one module that registers an :class:`ExportTarget`, plus
its import line here.
"""

from .target import EXPORT_TARGETS, ExportReport, ExportRequest, ExportTarget, run_export

from . import onnx, ort_target, tensorrt  # noqa: E402,F401,I001 - the built-in targets register themselves

__all__ = ["EXPORT_TARGETS", "ExportReport", "ExportRequest", "ExportTarget", "run_export"]
