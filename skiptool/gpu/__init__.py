"""The GPU decode path: skippable-FFN kernels that read their decisions on the device, a static-KV-cache decode
engine whose step is one CUDA graph, the decode backend over it, and decode-speed measurements.

What ``generate --device cuda`` and ``bench --device cuda`` run is :class:`EngineBackend` (batch 1, the
:class:`~skiptool.backends.base.DecodeBackend` protocol). The engine itself, for any batch size::

    from skiptool.accelerators import check_device
    from skiptool.gpu import DecodeEngine
    check_device("cuda")                         # one clear SkipToolError without a GPU
    engine = DecodeEngine(model, adapter, policy, batch_size=1, max_len=prompt_len + new_tokens, mode="device")
    logits = engine.prefill(prompt_ids)          # eager
    engine.capture()                             # the decode step as one CUDA graph (False on a CPU)
    for _ in range(new_tokens):
        logits = engine.step()                   # greedy; or step(token_ids)
    engine.skip_summary()                        # counters, read from the device once

Triton is optional: only :mod:`.triton_ffn` imports it, when a CUDA tensor reaches :func:`skippable_ffn`.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "EngineBackend": "skiptool.gpu.backend",
    "DecodeEngine": "skiptool.gpu.decoder",
    "FFN_MODES": "skiptool.gpu.decoder",
    "StaticKVCache": "skiptool.gpu.decoder",
    "FFNWeights": "skiptool.gpu.weights",
    "SubstituteWeights": "skiptool.gpu.weights",
    "skippable_ffn": "skiptool.gpu.kernels",
    "reference_skippable_ffn": "skiptool.gpu.kernels",
    "gathered_skippable_ffn": "skiptool.gpu.kernels",
    "kernel_backend": "skiptool.gpu.kernels",
    "triton_available": "skiptool.gpu.kernels",
    "DecodeTiming": "skiptool.gpu.measure",
    "time_decode": "skiptool.gpu.measure",
    "decode_basis": "skiptool.gpu.measure",
    "achieved_bandwidth": "skiptool.gpu.measure",
    "copy_bandwidth": "skiptool.gpu.measure",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
