"""The ``skiptool`` command line: each command parses its options, calls one library function, prints.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands so ``--help`` is fast. Every user
error prints one ``error:`` line and exits 1 (:mod:`.app`).
"""

from .app import app

from . import export_cmds, pipeline_cmds, run_cmds  # noqa: E402,F401,I001 - the commands register themselves


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "main"]
