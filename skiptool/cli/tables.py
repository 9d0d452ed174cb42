"""The rich tables the commands print. Each fits 80 columns (a terminal or a log); the full figures are in the
JSON each command writes."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def key_value(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def info_table(model: str, data: dict[str, Any]) -> Table:
    rows = [(key.replace("_", " "), str(data[key])) for key in ("num_layers", "hidden_size", "intermediate_size",
                                                                 "num_attention_heads", "num_key_value_heads",
                                                                 "vocab_size", "dtype")]
    rows += [("parameters", f"{data['parameters'] / 1e6:.1f} M"),
             ("weight bytes read / token", f"{data['weight_bytes_per_token'] / 2**20:.1f} MiB"),
             ("FFN share of those bytes", f"{data['ffn_weight_share']:.1%}")]
    rows += [(f"ideal decode speedup, {float(r):.0%} FFN skip", f"{s:.3f}x") for r, s in data["ideal_speedup"].items()]
    return key_value(f"{model} ({data['architecture']})", rows)


def layer_stats_table(stats: dict[str, Any]) -> Table:
    """calibrate: per layer, mean saturation and its 5 % quantile, FFN/stream norm, probe AUC, threshold, skip."""
    table = Table(title=f"layer statistics ({stats['num_blocks']} x {stats['seq_len']} tokens, after warm-up "
                        f"{stats['warmup']})", title_justify="left")
    for col in ("layer", "cos", "cos q05", "FFN/h", "attn~FFN", "AUC", "threshold", "skip"):
        table.add_column(col, justify="right", overflow="fold")
    for r in stats["layers"]:
        table.add_row(str(r["layer"]), f"{r['saturation']['mean']:.4f}", f"{r['saturation']['q05']:.4f}",
                      f"{r['ffn_ratio']['mean']:.3f}", f"{r['attn_ffn_cos']['mean']:+.3f}", f"{r['probe_auc']:.3f}",
                      "cold" if r["cold"] else f"{r['threshold']:.4f}", f"{r['skip_ratio']:.1%}")
    return table


def eval_table(result: Any) -> Table:
    d = result.data
    rows = [("perplexity dense", f"{result.ppl_dense:.3f}"),
            ("perplexity skipping", f"{result.ppl_skip:.3f} ({result.ppl_increase:+.1%})"),
            ("realised FFN skip ratio", f"{result.skip_ratio:.2%} (all layers, all positions)")]
    if result.ffn_saved is not None:
        ideal = f", ideal decode speedup {result.ideal_speedup:.3f}x" if result.ideal_speedup else ""
        rows.append(("FFN weight bytes saved", f"{result.ffn_saved:.2%}{ideal}"))
    if result.greedy_agreement is not None:
        rows.append(("greedy agreement with dense", f"{result.greedy_agreement:.1%} of decode steps"))
    rows.append(("per layer", " ".join(f"{r:.0%}" for r in result.per_layer)))
    return key_value(f"{result.policy} policy: {result.blocks} x {result.seq_len} tokens of {d['source']} (part "
                     f"{d['part'][0]:g}:{d['part'][1]:g})", rows)


SWEEP_TARGETS_PER_TABLE = 5  # a curve name and five "23.4@25%" cells fit 80 columns


def sweep_table(sweep: dict[str, Any]) -> Group:
    """eval --sweep: one row per curve, one column per target skip ratio (five targets a table, so any number of
    curves and targets fits 80 columns); a cell is the perplexity @ the skip ratio realised on the evaluation tokens
    (curves are compared at equal realised ratios, not targets); – = target out of the curve's reach."""
    targets = sweep["targets"]
    parts = [range(i, min(i + SWEEP_TARGETS_PER_TABLE, len(targets)))
             for i in range(0, len(targets), SWEEP_TARGETS_PER_TABLE)]
    title = f"sweep: perplexity @ realised skip ratio, by target skip ratio (dense {_ppl(sweep['ppl_dense'])})"
    return Group(*(_sweep_part(sweep, part, title if n == 0 else None) for n, part in enumerate(parts)))


def _sweep_part(sweep: dict[str, Any], indices: range, title: str | None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("curve \\ target", overflow="fold")
    for i in indices:
        table.add_column(f"{sweep['targets'][i]:.0%}", justify="right", overflow="fold")
    for name, points in sweep["curves"].items():
        table.add_row(name, *(_sweep_cell(points[i]) for i in indices))
    return table


def _sweep_cell(point: dict[str, Any]) -> str:
    if point.get("ppl") is None:
        return "–"
    return f"{_ppl(point['ppl'])}@{point['skip_ratio']:.0%}"


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def export_table(report: Any) -> Table:
    m = report.manifest
    rows = [("target / precision", f"{m.target} / {m.precision}"), ("policy", f"{m.policy} ({m.mode})"),
            ("If nodes", f"{m.if_count} (skippable layers {len(m.skippable_layers)})"),
            ("runs in", ", ".join(m.runtimes))]
    rows += [(k.replace("_bytes", "").replace("_", " "), _detail(k, v)) for k, v in report.details.items()]
    for name, check in m.checks.items():
        rows.append((f"parity vs PyTorch ({name})",
                     f"logits {check['max_abs_logits']:.1e}, KV {check['max_abs_present']:.1e}, decisions "
                     f"{check['decision_agreement']:.1%}, top-1 {check['top1_agreement']:.0%} (ok); skip "
                     f"{check['skip_ratio_ort']:.1%} over {check['steps']} steps"))
    rows.append(("export time", f"{report.seconds:.1f} s"))
    return key_value(f"export: {report.out_dir}", rows)


def _detail(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if key.endswith("_bytes"):
        return f"{value / 2**20:.1f} MiB"
    return str(value)


def router_table(result: Any, target_skip: float) -> Table:
    d, cost = result.to_dict(), result.cost
    rows = [("router weights", str(result.router_path))]
    if result.standin_path is not None:
        sc = cost["standin"]
        rows.append(("stand-in weights (trained)", f"{result.standin_path}"))
        rows.append(("stand-in params / layer", f"{sc['standin_params']:,} ({sc['fraction_of_ffn']:.2%} of the FFN)"))
    rows += [("threshold (probability)", f"{d['threshold']:.4f}"),
             ("held-out skip ratio", f"{d['heldout_skip_ratio']:.1%} (target {target_skip:.0%})"),
             ("held-out perplexity", f"{d['dense_heldout_perplexity']:.2f} dense, {d['heldout_perplexity']:.2f} "
                                     f"skipping ({d['perplexity_ratio']:.3f}x)"),
             ("router params / layer", f"{cost['router_params_per_layer']:,} {cost['router_kind']} "
                                       f"({cost['param_share']:.3%} of the FFN)"),
             ("training", f"{result.tokens:,} tokens at {result.tokens_per_s:.0f} tok/s; {result.seconds:.0f} s "
                          "in all")]
    return key_value(f"routers: {result.config_path}", rows)
