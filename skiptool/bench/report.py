"""From measurements to what people read: :func:`summarise` (one JSON-ready row per run with medians,
percentiles, speedup and fraction of ideal), the rich table, the PNG plot and the README's Markdown table.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .harness import RunResult
from ..ideal import fraction_of_ideal, median_min_max, percentile


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One JSON-ready row per run: medians with min–max, percentiles, skip ratio, speedup, fraction of ideal."""
    rows = [_row(r) for r in results]
    dense = {(r["backend"], r["precision"]): r for r in rows if r["mode"] == "dense" and r["tokens_per_s"]}
    for row, result in zip(rows, results):
        base = dense.get((row["backend"], row["precision"]))
        if row["mode"] != "skip" or base is None or not row["tokens_per_s"]:
            continue
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        if row["cpu_ms_per_token"] and base["cpu_ms_per_token"]:
            row["cpu_speedup"] = base["cpu_ms_per_token"] / row["cpu_ms_per_token"]
        if result.ideal_basis is not None and row["skip_ratio"] is not None and not math.isnan(row["skip_ratio"]):
            row["ideal_speedup"] = result.ideal_basis.speedup(row["skip_ratio"])
            row["fraction_of_ideal"] = fraction_of_ideal(row["speedup"], row["ideal_speedup"])
            if row["cpu_speedup"] is not None:
                row["cpu_fraction_of_ideal"] = fraction_of_ideal(row["cpu_speedup"], row["ideal_speedup"])
            row["ideal_tokens_per_s"] = base["tokens_per_s"] * row["ideal_speedup"]
    return rows


def _row(r: RunResult) -> dict[str, Any]:
    s = r.spec
    status = "ok" if r.error is None and s.skipped is None else (s.skipped or r.error)
    tps, tps_min, tps_max = median_min_max(r.tokens_per_s)
    skip = statistics.fmean(r.skip_ratios) if r.skip_ratios and not any(map(math.isnan, r.skip_ratios)) else None
    row: dict[str, Any] = {
        "label": s.label, "backend": s.backend, "mode": s.mode, "precision": s.precision, "policy": s.policy,
        "status": status, "forced_ratio": s.forced_ratio,
        "tokens_per_s": None if math.isnan(tps) else tps,
        "tokens_per_s_min": None if math.isnan(tps_min) else tps_min,
        "tokens_per_s_max": None if math.isnan(tps_max) else tps_max,
        "tokens_per_s_runs": list(r.tokens_per_s),
        "latency_ms_p50": _ms(percentile(r.step_s, 50)), "latency_ms_p90": _ms(percentile(r.step_s, 90)),
        "prefill_ms": _ms(median_min_max(r.prefill_s)[0]),
        "skip_ratio": 0.0 if s.mode == "dense" and r.tokens_per_s else skip,
        "per_layer_skip": r.per_layer_skip,
        "ffn_calls": r.ffn_calls, "ffn_calls_avoided": r.ffn_calls_avoided,
        "speedup": None, "ideal_speedup": None, "fraction_of_ideal": None, "ideal_tokens_per_s": None,
        # process CPU time per generated token (prefill included): less sensitive to other processes than
        # wall time when nothing spins (ORT with --spin off, one thread); with spinning it counts the spin
        "cpu_ms_per_token": _nan_none(median_min_max(r.cpu_ms_per_token)[0]),
        "cpu_speedup": None, "cpu_fraction_of_ideal": None,
        "memory": {"rss_load_mib": r.rss_load_mib, "rss_after_mib": r.rss_after_mib},
        "perplexity": r.perplexity,
        "ideal_basis": r.ideal_basis.to_dict() if r.ideal_basis is not None else None,
        "settings": dict(s.settings),
    }
    return row


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1000.0


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of decode tokens/s per run (:func:`bench_figure`)."""
    import matplotlib.pyplot as plt

    from ..fileio import atomic_path

    fig = bench_figure(report)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")  # "tight": the legend below the axes too
    plt.close(fig)
    return Path(path)


RUN_COLOURS = {"skip": ("tab:orange", "skipping run (speedup over the dense run of its backend and precision)"),
               "dense": ("tab:blue", "dense run (the baseline of its backend and precision)"),
               "peer": ("tab:gray", "peer runtime, dense (onnxruntime-genai's own graph, llama.cpp)")}


def bench_figure(report: dict[str, Any]) -> Any:
    """Decode tokens/s per run that ran (median bar, min–max whiskers; colour = skipping, dense or peer run, in the
    legend) with each skipping run's ideal marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    runs = [r for r in report["runs"] if r["tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(runs) + 2.2), layout="constrained")
    y = np.arange(len(runs))[::-1]
    err = [[r["tokens_per_s"] - r["tokens_per_s_min"] for r in runs],
           [r["tokens_per_s_max"] - r["tokens_per_s"] for r in runs]]
    kinds = [_run_kind(r) for r in runs]
    ax.barh(y, [r["tokens_per_s"] for r in runs], xerr=err, color=[RUN_COLOURS[k][0] for k in kinds], capsize=3)
    handles: list[Any] = [Patch(color=RUN_COLOURS[k][0], label=RUN_COLOURS[k][1]) for k in RUN_COLOURS if k in kinds]
    ideal = [(yy, r["ideal_tokens_per_s"]) for yy, r in zip(y, runs) if r.get("ideal_tokens_per_s")]
    if ideal:
        handles.append(ax.scatter([v for _, v in ideal], [yy for yy, _ in ideal], marker="D", s=36, color="crimson",
                                  zorder=3, label="ideal at the realised skip ratio (dense tok/s × weight-byte ratio)"))
    fig.legend(handles=handles, loc="outside lower center", frameon=False, fontsize=8)
    ax.set_yticks(y, [r["label"] for r in runs])
    ax.set_xlabel("decode tokens/s (median, whiskers min–max)")
    ax.set_ylabel("run")
    s = report["settings"]
    ax.set_title(f"{report['model']}: {s['new_tokens']} new tokens, {s['threads']} threads, "
                 f"spinning {s['intra_op_spinning']}", fontsize=10)
    return fig


def write_front(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the quality-vs-speed front (:func:`front_figure`); needs runs measured with ``--quality``."""
    import matplotlib.pyplot as plt

    from ..fileio import atomic_path

    fig = front_figure(report)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def scored_runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs with both a decode speed and a perplexity."""
    return [r for r in report["runs"] if r["tokens_per_s"] and r.get("perplexity") is not None]


SAME_PERPLEXITY = 1e-3  # relative: perplexities closer than this differ only by float arithmetic (same weights)


def pareto_front(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs no other run beats on both speed (higher tok/s) and quality (lower perplexity, within
    :data:`SAME_PERPLEXITY`), fastest last."""
    def beats(o: dict[str, Any], r: dict[str, Any]) -> bool:
        no_worse = o["perplexity"] <= r["perplexity"] * (1 + SAME_PERPLEXITY)
        same = o["tokens_per_s"] == r["tokens_per_s"] and abs(o["perplexity"] - r["perplexity"]) <= \
            SAME_PERPLEXITY * r["perplexity"]
        return o is not r and o["tokens_per_s"] >= r["tokens_per_s"] and no_worse and not same

    return sorted([r for r in runs if not any(beats(o, r) for o in runs)], key=lambda r: r["tokens_per_s"])


def front_figure(report: dict[str, Any]) -> Any:
    """Decode tokens/s against perplexity for every scored run (colour = skipping, dense or peer run), each point
    labelled, the Pareto front (faster and better: down and right) joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = scored_runs(report)
    fig, ax = plt.subplots(figsize=(9, 6), layout="constrained")
    for kind, (colour, label) in RUN_COLOURS.items():
        mine = [r for r in runs if _run_kind(r) == kind]
        if mine:
            ax.scatter([r["tokens_per_s"] for r in mine], [r["perplexity"] for r in mine], color=colour, s=40,
                       zorder=3, label=label)
    for r, lift in zip(runs, _label_lifts(runs)):
        ax.annotate(_short_label(r), (r["tokens_per_s"], r["perplexity"]), textcoords="offset points",
                    xytext=(5, 4 + 9 * lift), fontsize=7)
    front = pareto_front(runs)
    if len(front) > 1:
        ax.plot([r["tokens_per_s"] for r in front], [r["perplexity"] for r in front], color="black", lw=1,
                ls="--", zorder=2, label="front: no run is both faster and better")
    ax.set_xlabel("decode tokens/s (median; higher is faster)")
    ax.set_ylabel("perplexity on the held-out slice (lower is better)")
    s = report["settings"]
    ax.set_title(f"{report['model']}: quality vs speed, {s['quality_tokens']} held-out tokens, "
                 f"{s['threads']} threads", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", frameon=False, fontsize=8)
    return fig


def _label_lifts(runs: Sequence[dict[str, Any]], near_x: float = 0.15, near_y: float = 0.06) -> list[int]:
    """Lines to lift each point's label by so labels of points close together (within `near_x` / `near_y` of
    the plotted ranges: a label runs to the right of its point) stack instead of overwriting one another."""
    xs, ys = [r["tokens_per_s"] for r in runs], [r["perplexity"] for r in runs]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    lifts: list[int] = []
    for i in range(len(runs)):
        close = [j for j in range(i) if abs(xs[i] - xs[j]) < near_x * dx and abs(ys[i] - ys[j]) < near_y * dy]
        lifts.append(max((lifts[j] for j in close), default=-1) + 1)
    return lifts


def _run_kind(run: dict[str, Any]) -> str:
    if run["mode"] == "skip":
        return "skip"
    return "peer" if run["backend"] in PEER_NAMES else "dense"


PEER_NAMES = ("onnxruntime-genai", "llama.cpp")


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def bench_table(report: dict[str, Any], wide: bool = False) -> Any:
    """The report as a rich table (one row per run that ran) followed by the runs that could not run.

    The default columns fit 80 characters: run, tok/s, skip, speedup, ideal, of ideal. `wide` adds min–max,
    p50/p90 latency, prefill, the memory a run added when it loaded, and perplexity (with ``--quality``).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = report["settings"]
    ran = [r for r in report["runs"] if r["tokens_per_s"]]
    quality = any(r.get("perplexity") is not None for r in ran)
    columns = ["run", "tok/s"] + (["min–max", "p50/p90 ms", "prefill ms"] if wide else []) + \
        ["skip", "speedup", "ideal", "of ideal"] + (["+RSS MiB"] if wide else []) + (["ppl"] if quality else [])
    table = Table(title=f"{report['model']}: {s['new_tokens']} new tokens, median of {s['repeats']}, "
                        f"{s['threads']} threads, spinning {s['intra_op_spinning']}", title_justify="left")
    for name in columns:
        table.add_column(name, justify="left" if name == "run" else "right", overflow="fold")
    for r in ran:
        cells = {"run": _short_label(r), "tok/s": _fmt(r["tokens_per_s"], "{:.1f}"),
                 "min–max": f"{_fmt(r['tokens_per_s_min'], '{:.1f}')}–{_fmt(r['tokens_per_s_max'], '{:.1f}')}",
                 "p50/p90 ms": f"{_fmt(r['latency_ms_p50'], '{:.1f}')}/{_fmt(r['latency_ms_p90'], '{:.1f}')}",
                 "prefill ms": _fmt(r["prefill_ms"], "{:.0f}"), "skip": _fmt(r["skip_ratio"], "{:.1%}"),
                 "speedup": _fmt(r["speedup"], "{:.3f}"), "ideal": _fmt(r["ideal_speedup"], "{:.3f}"),
                 "of ideal": _fmt(r["fraction_of_ideal"], "{:.2f}"),
                 "+RSS MiB": _fmt(r["memory"]["rss_load_mib"], "{:.0f}"), "ppl": _fmt(r.get("perplexity"), "{:.2f}")}
        table.add_row(*(cells[c] for c in columns))
    notes = [Text(f"{r['label']}: {r['status']}", style="dim") for r in report["runs"] if not r["tokens_per_s"]]
    return Group(table, *notes)


_SHORT = {"onnxruntime": "ort", "onnxruntime-genai": "genai"}


def _short_label(r: dict[str, Any]) -> str:
    mode = r["mode"] if r["forced_ratio"] is None else f"skip {r['forced_ratio']:.0%}"
    if r["mode"] == "skip" and r["forced_ratio"] is None:
        mode = f"skip {r['policy']}"
    return f"{_SHORT.get(r['backend'], r['backend'])} {r['precision']} {mode}"


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what the README's performance section shows); perplexity with ``--quality``."""
    s = report["settings"]
    quality = bool(scored_runs(report))
    head = ["run", "tok/s", "min–max", "p50 / p90 ms", "skip", "speedup", "ideal", "of ideal"] + \
        (["perplexity"] if quality else [])
    lines = [f"{report['model']}, batch 1, {s['prompt_tokens'][0]}-token prompt, {s['new_tokens']} new tokens, "
             f"{s['threads']} threads, ONNX Runtime intra-op spinning {s['intra_op_spinning']}; median of "
             f"{s['repeats']} interleaved runs (min–max), warm-up dropped"
             + (f"; perplexity on {s['quality_tokens']} held-out tokens, the same for every run." if quality else "."),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["runs"]:
        if not r["tokens_per_s"]:
            lines.append(f"| {r['label']} | {r['status']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["label"], _fmt(r["tokens_per_s"], "{:.1f}"),
                 f"{_fmt(r['tokens_per_s_min'], '{:.1f}')}–{_fmt(r['tokens_per_s_max'], '{:.1f}')}",
                 f"{_fmt(r['latency_ms_p50'], '{:.1f}')} / {_fmt(r['latency_ms_p90'], '{:.1f}')}",
                 _fmt(r["skip_ratio"], "{:.1%}"), _fmt(r["speedup"], "{:.3f}×"), _fmt(r["ideal_speedup"], "{:.3f}×"),
                 _fmt(r["fraction_of_ideal"], "{:.2f}")] + ([_fmt(r.get("perplexity"), "{:.2f}")] if quality else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
