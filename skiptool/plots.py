"""PNG plots drawn from the JSON the commands write (never from live objects); matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MissingDependencyError
from .fileio import atomic_path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_layer_stats(stats: dict[str, Any], path: str | Path) -> Path:
    """``layer_stats.json`` -> saturation, FFN/stream norm ratio and DiffSkip signals per layer, cold regions shaded."""
    plt = _pyplot()
    rows = stats["layers"]
    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    sat = axes[0]
    sat.fill_between(layers, [r["saturation"]["q05"] for r in rows], [r["saturation"]["q95"] for r in rows],
                     alpha=0.25, label="5-95% of tokens")
    sat.plot(layers, [r["saturation"]["mean"] for r in rows], "o-", label="mean cos(h, h + FFN(h))")
    th = [(r["layer"], r["threshold"]) for r in rows if r.get("threshold") is not None]
    if th:
        sat.plot(*zip(*th), "x", color="black", label="threshold")
    sat.set_ylim(max(0.0, min(r["saturation"]["q05"] for r in rows if not r.get("cold")) - 0.05), 1.0)
    sat.set_ylabel("saturation")
    ratio = axes[1]
    ratio.plot(layers, [r["ffn_ratio"]["mean"] for r in rows], "o-", label="mean ||FFN(h)|| / ||h||")
    ratio.set_yscale("log")
    ratio.set_ylabel("FFN / stream norm")
    if any("skip_ratio" in r for r in rows):
        twin = ratio.twinx()
        twin.bar(layers, [r.get("skip_ratio", 0.0) for r in rows], alpha=0.3, color="tab:red", label="skip ratio")
        twin.set_ylabel("realised skip ratio")
        twin.set_ylim(0, 1)
    diff = axes[2]
    diff.plot(layers, [r["attn_ffn_cos"]["mean"] for r in rows], "o-", label="cos(attention delta, FFN delta)")
    diff.plot(layers, [r["probe_auc"] for r in rows], "s-", label="probe AUC: attention delta -> small FFN delta")
    diff.axhline(0.5, color="grey", lw=0.5)
    diff.set_xlabel("layer")
    for ax in axes:
        _shade_cold(ax, stats, len(layers))
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
    target = stats.get("target_skip")
    fig.suptitle(f"Layer statistics ({stats.get('num_blocks')} x {stats.get('seq_len')} tokens, warm-up "
                 f"{stats.get('warmup')})" + (f"; target skip {target:.0%}, realised {stats['skip_ratio']:.1%}"
                                              if target is not None and "skip_ratio" in stats else ""))
    return _save(fig, path)


def _shade_cold(ax: Any, stats: dict[str, Any], num_layers: int) -> None:
    start, end = stats.get("cold_start", 0), stats.get("cold_end", 0)
    if start:
        ax.axvspan(-0.5, start - 0.5, color="tab:blue", alpha=0.1, label="cold")
    if end:
        ax.axvspan(num_layers - end - 0.5, num_layers - 0.5, color="tab:blue", alpha=0.1,
                   label=None if start else "cold")


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    """``sweep.json`` -> perplexity vs realised skip ratio, one line per curve, dense as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sweep["curves"].items():
        done = sorted((p["skip_ratio"], p["ppl"]) for p in points if p.get("ppl") is not None)
        if done:
            ax.plot(*zip(*done), "o-", label=name)
    ax.axhline(sweep["ppl_dense"], color="black", ls="--", lw=1, label=f"dense ({sweep['ppl_dense']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("realised FFN skip ratio (all layers, all positions)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Quality vs skip ratio ({sweep.get('blocks')} x {sweep.get('seq_len')} tokens, "
                 f"warm-up {sweep.get('warmup')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
