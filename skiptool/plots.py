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
    """``layer_stats.json`` -> ``layer_stats.png`` (:func:`layer_stats_figure`)."""
    return _save(layer_stats_figure(stats), path)


def layer_stats_figure(stats: dict[str, Any]) -> Any:
    """Per layer, cold regions shaded: saturation with thresholds, FFN/stream norm ratio with the realised skip
    ratio, and the two DiffSkip signals (attention/FFN delta cosine, probe AUC) each on its own axis."""
    plt = _pyplot()
    rows = stats["layers"]
    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True, height_ratios=(3, 2, 2, 2), layout="constrained")
    _saturation_panel(axes[0], rows)
    _ratio_panel(axes[1], rows)
    cos = axes[2]
    cos.plot(layers, [r["attn_ffn_cos"]["mean"] for r in rows], "o-", color="tab:green",
             label="mean cos(attention delta, FFN delta)")
    cos.axhline(0.0, color="grey", lw=0.5)
    cos.set_ylabel("cosine")
    auc = axes[3]
    auc.plot(layers, [r["probe_auc"] for r in rows], "s-", color="tab:purple",
             label="probe AUC: attention delta -> small FFN delta")
    auc.axhline(0.5, color="grey", lw=0.8, ls="--", label="0.5 = no signal")
    auc.set_ylim(min(0.4, min(r["probe_auc"] for r in rows) - 0.03), 1.0)
    auc.set_ylabel("AUC")
    auc.set_xlabel("layer")
    for ax in axes:
        _shade_cold(ax, stats, len(layers))
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2], axes[3]):  # axes[1] has its own legend, with its second axis's bars
        ax.legend(loc="best", fontsize=7)
    target = stats.get("target_skip")
    fig.suptitle(f"Layer statistics ({stats.get('num_blocks')} x {stats.get('seq_len')} tokens, warm-up "
                 f"{stats.get('warmup')})" + (f"; target skip {target:.0%}, realised {stats['skip_ratio']:.1%}"
                                              if target is not None and "skip_ratio" in stats else ""))
    return fig


def _saturation_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Mean saturation with its 5-95 % band and the thresholds, scaled to the skippable layers; a layer whose
    mean lies below that scale (a cold layer that rewrites the stream) is a marker on the bottom edge with its value
    written beside it, so every layer's value shows."""
    layers = [r["layer"] for r in rows]
    means = [r["saturation"]["mean"] for r in rows]
    ax.fill_between(layers, [r["saturation"]["q05"] for r in rows], [r["saturation"]["q95"] for r in rows],
                    alpha=0.25, color="tab:orange", label="5-95% of tokens")
    ax.plot(layers, means, "o-", color="tab:orange", label="mean cos(h, h + FFN(h))")
    th = [(r["layer"], r["threshold"]) for r in rows if r.get("threshold") is not None]
    if th:
        ax.plot(*zip(*th), "x", color="black", label="threshold")
    warm = [r["saturation"]["q05"] for r in rows if not r.get("cold")] or [r["saturation"]["q05"] for r in rows]
    bottom = max(0.0, min(warm) - 0.25 * (1.0 - min(warm)) - 1e-4)
    ax.set_ylim(bottom, 1.0)
    below = [(layer, mean) for layer, mean in zip(layers, means) if mean < bottom]
    if below:
        ax.plot([layer for layer, _ in below], [bottom] * len(below), "v", color="tab:red", ms=9, clip_on=False,
                zorder=4, label="mean below the scale (value written)")
        for layer, mean in below:
            ax.annotate(f"{mean:.2f}", (layer, bottom), xytext=(6, 6), textcoords="offset points", fontsize=8,
                        color="tab:red")
    ax.set_ylabel("saturation cos(h, h + FFN(h))")


def _ratio_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """FFN/stream norm ratio (a log scale when it spans over 10x) and, on a second axis, the realised skip ratio; one legend for both."""
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["ffn_ratio"]["mean"] for r in rows], "o-", color="tab:blue", label="mean ||FFN(h)|| / ||h||")
    _log_scale_if_wide(ax, [r["ffn_ratio"]["mean"] for r in rows], 10)
    ax.set_ylabel("FFN / stream norm")
    handles, labels = ax.get_legend_handles_labels()
    if any("skip_ratio" in r for r in rows):
        twin = ax.twinx()
        twin.bar(layers, [r.get("skip_ratio", 0.0) for r in rows], alpha=0.3, color="tab:red",
                 label="realised skip ratio")
        twin.set_ylabel("realised skip ratio")
        twin.set_ylim(0, 1)
        more, names = twin.get_legend_handles_labels()
        handles, labels = handles + more, labels + names
    ax.legend(handles, labels, loc="best", fontsize=7)


def _log_scale_if_wide(ax: Any, values: list[float], factor: float) -> None:
    """A log y-axis when `values` span more than `factor` (else linear), its ticks plain numbers (0.05, 20, 300)
    rather than powers of ten; the minor ticks are labelled too while the span is within a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = min(values), max(values)
    if low <= 0 or high <= factor * low:
        return
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def _shade_cold(ax: Any, stats: dict[str, Any], num_layers: int) -> None:
    start, end = stats.get("cold_start", 0), stats.get("cold_end", 0)
    if start:
        ax.axvspan(-0.5, start - 0.5, color="tab:gray", alpha=0.15, label="cold (never skips)")
    if end:
        ax.axvspan(num_layers - end - 0.5, num_layers - 0.5, color="tab:gray", alpha=0.15,
                   label=None if start else "cold (never skips)")


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    """``sweep.json`` -> ``sweep.png`` (:func:`sweep_figure`)."""
    return _save(sweep_figure(sweep), path)


MARKERS = "osD^v<>pP*"  # with the colour cycle, tells up to 10 x 10 curves apart


def sweep_figure(sweep: dict[str, Any]) -> Any:
    """Perplexity vs realised skip ratio, one line per curve (its colour and marker in the legend), dense as a dashed
    line; a log y-axis when the perplexities span more than a factor of 2."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [sweep["ppl_dense"]]
    for n, (name, points) in enumerate(sweep["curves"].items()):
        done = sorted((p["skip_ratio"], p["ppl"]) for p in points if p.get("ppl") is not None)
        if done:
            ax.plot(*zip(*done), marker=MARKERS[n % len(MARKERS)], label=name)
            values += [ppl for _, ppl in done]
    ax.axhline(sweep["ppl_dense"], color="black", ls="--", lw=1, label=f"dense ({sweep['ppl_dense']:.2f})")
    _log_scale_if_wide(ax, values, 2)
    ax.set_xlabel("realised FFN skip ratio (all layers, all positions)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Quality vs skip ratio ({sweep.get('blocks')} x {sweep.get('seq_len')} tokens, "
                 f"warm-up {sweep.get('warmup')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig
