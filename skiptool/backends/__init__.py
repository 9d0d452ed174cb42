"""Decode backends behind one protocol (:class:`~.base.DecodeBackend`), and the runtimes that open export folders.

A runtime is one module with a backend class plus one registration in :data:`RUNTIMES` (name -> how to open an
export folder with it, and why it cannot run here). The export manifest (:mod:`skiptool.contract`) names the
runtimes that can run a folder; :func:`open_export` opens one with the default or a chosen runtime. Benchmark
peers (runtimes users would pick instead) register in :data:`~.peers.PEERS`.
"""

from .base import DecisionCounter, DecodeBackend, parse_skip_mask
from .registry import RUNTIMES, RunOptions, Runtime, open_export

from . import onnxruntime, peers, tensorrt_backend  # noqa: E402,F401,I001 - the built-in runtimes register themselves

__all__ = ["DecisionCounter", "DecodeBackend", "RUNTIMES", "RunOptions", "Runtime", "open_export", "parse_skip_mask"]
