"""What a policy's decisions and the ``If`` nodes cost per decode step in an ``export --format ort`` graph.

    python benchmarks/decision_cost.py EXPORT [EXPORT ...] --baseline GENAI_DIR [--threads 2] [--spin off] [--json OUT]

For each folder (and the ``--baseline``, e.g. onnxruntime-genai's own dense graph of the same precision):

- nodes per skippable layer that the policy added, in the saved graph and after ONNX Runtime's optimiser (which
  fuses, e.g., the router's RMS norm into one ``SimplifiedLayerNormalization``);
- a KV-cache decode in skiptool's own ONNX Runtime session (:class:`skiptool.ort.GraphSession`: IOBinding, the
  session options every skiptool run uses; batch 1, 32-token prompt, ``--steps`` steps, nothing skipped: the
  ``skip_mask`` override computes every FFN, so the decisions are computed and ignored), timed without profiling
  (median step, interleaved over the folders) and once with ONNX Runtime's profiler, which attributes kernel time
  per node: the policy's nodes, each ``If``'s own overhead (its time minus its branch's nodes), and what the
  compute branch adds to the MLP (the substitute for rows that skip, and the ``Where`` choosing it).

Time per layer = the per-step figure over the skippable layers. The profiler adds its own cost to every node, so
its per-node figures are upper bounds that say where the time goes; the step times (no profiler) are the
measurement. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from skiptool.contract import MODEL_FILE, GraphIO
from skiptool.exporters.ort_policy import policy_nodes_by_layer
from skiptool.fileio import write_json_atomic
from skiptool.onnx_graph import iter_nodes
from skiptool.ort import Diagnostics, GraphSession, KvCursor

PROMPT = 32
COMPUTE_EXTRA = ("/mlp/compute/", "/mlp/Where", "/mlp/skip_rows")  # what an If's compute branch adds to the MLP


class Decoder:
    """One folder's graph in a skiptool ONNX Runtime session (CPU), fed its own KV cache."""

    def __init__(self, folder: Path, scratch: Path, threads: int, profile: bool = False, spin: bool = False) -> None:
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        io = GraphIO(config["num_hidden_layers"])
        self.optimised = Path(tempfile.mkdtemp(dir=scratch)) / "optimised.onnx"
        diagnostics = Diagnostics(scratch / "profile" if profile else None, self.optimised)
        self.graph = GraphSession(folder / MODEL_FILE, io, config["num_key_value_heads"], config["head_size"],
                                  providers=["CPUExecutionProvider"], threads=threads, spin=spin,
                                  diagnostics=diagnostics)
        self.compute_all = np.full(io.num_layers, -1, np.int64)  # the skip_mask override: every FFN computes

    def decode(self, steps: int) -> list[float]:
        """Seconds per decode step (prefill excluded)."""
        cursor, times = KvCursor(self.graph), []
        out = cursor(np.arange(10, 10 + PROMPT, dtype=np.int64)[None], self.compute_all)
        for _ in range(steps):
            ids = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = cursor(ids, self.compute_all)
            times.append(time.perf_counter() - start)
        return times


def profiled_split(folder: Path, scratch: Path, threads: int, steps: int, spin: bool) -> dict[str, float]:
    """µs per decode step in the policy's nodes and in the ``If`` nodes' own overhead (profiler, kernel time)."""
    dec = Decoder(folder, scratch, threads, profile=True, spin=spin)
    dec.decode(steps)
    events = json.loads(Path(dec.graph.session.end_profiling()).read_text())
    model = onnx.load(str(dec.optimised), load_external_data=False)
    top = {n.name: n.op_type for n in model.graph.node}
    branch = {n.name for n, in_branch in iter_nodes(model.graph) if in_branch}
    sums = {"policy": 0.0, "if": 0.0, "branch": 0.0, "all": 0.0, "compute_extra": 0.0}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name, dur = e["name"][: -len("_kernel_time")], float(e["dur"])
        if name in branch:
            sums["branch"] += dur
            sums["compute_extra"] += dur if any(k in name for k in COMPUTE_EXTRA) else 0.0
        elif name in top:
            sums["all"] += dur
            sums["policy"] += dur if "/skip_policy" in name else 0.0
            sums["if"] += dur if top[name] == "If" else 0.0
    runs = steps + 1  # the prefill is profiled too: close enough for per-node kernel time at batch 1
    return {"policy_us": sums["policy"] / runs, "if_overhead_us": (sums["if"] - sums["branch"]) / runs,
            "compute_extra_us": sums["compute_extra"] / runs, "kernel_us": sums["all"] / runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", type=Path, nargs="+")
    parser.add_argument("--baseline", type=Path, required=True, help="a dense graph folder of the same precision")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin", choices=("on", "off"), default="off", help="ONNX Runtime intra-op spinning")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    problem = bad_input(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure([args.baseline, *args.exports], Path(scratch), args)
    print_rows(rows)
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


def bad_input(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, in one line (None: nothing)."""
    for name in ("steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1 (got {getattr(args, name)})"
    for folder in [args.baseline, *args.exports]:
        if not (folder / "genai_config.json").is_file() or not (folder / MODEL_FILE).is_file():
            return f"{folder}: not an onnxruntime-genai graph folder (needs genai_config.json and {MODEL_FILE})"
    if args.json is not None and not args.json.parent.is_dir():
        return f"--json {args.json}: the folder {args.json.parent} does not exist"
    return None


def measure(folders: list[Path], scratch: Path, args: argparse.Namespace) -> list[dict]:
    """Each folder's step time (interleaved medians), node counts and profiled split; the first is the baseline."""
    spin = args.spin == "on"
    decoders = [Decoder(f, scratch, args.threads, spin=spin) for f in folders]
    medians: list[list[float]] = [[] for _ in folders]
    for _ in range(args.repeats + 1):  # interleaved; the first round is a warm-up
        for i, dec in enumerate(decoders):
            medians[i].append(statistics.median(dec.decode(args.steps)))
    rows = []
    for folder, dec, m in zip(folders, decoders, medians):
        saved = per_layer(onnx.load(str(folder / MODEL_FILE), load_external_data=False))
        optimised = per_layer(onnx.load(str(dec.optimised), load_external_data=False))
        step = statistics.median(m[1:]) * 1e6
        rows.append({"folder": str(folder), "step_us": step, "nodes_per_layer_saved": max(saved.values(), default=0),
                     "nodes_per_layer_optimised": max(optimised.values(), default=0),
                     "skippable_layers": len(saved), **profiled_split(folder, scratch, args.threads, args.steps, spin)})
    for r in rows:
        r["vs_baseline"] = r["step_us"] / rows[0]["step_us"]
    return rows


def per_layer(model: onnx.ModelProto) -> dict[int, int]:
    """The policy's nodes by skippable layer (its shared nodes left out)."""
    return {layer: n for layer, n in policy_nodes_by_layer(model).items() if layer is not None}


def print_rows(rows: list[dict]) -> None:
    print(f"{'folder':<28} {'step µs':>8} {'vs base':>8} {'nodes/layer':>12} {'policy µs/layer':>16} "
          f"{'If µs/layer':>12} {'branch extra µs/layer':>22}")
    for r in rows:
        layers = max(r["skippable_layers"], 1)
        print(f"{Path(r['folder']).name[:28]:<28} {r['step_us']:8.0f} {r['vs_baseline']:7.3f}× "
              f"{r['nodes_per_layer_saved']:>5} → {r['nodes_per_layer_optimised']:<4} "
              f"{r['policy_us'] / layers:16.1f} {r['if_overhead_us'] / layers:12.1f} "
              f"{r['compute_extra_us'] / layers:22.1f}")


if __name__ == "__main__":
    sys.exit(main())
