"""Text tables of a CostRecord (formatting only)."""

from __future__ import annotations

from typing import Optional

from ..data.markdown import markdown_table
from .measurement import CostRecord


def _g(flops: Optional[float]) -> str:
    return "not counted" if flops is None else f"{flops / 1e9:.4g}"


def format_cost(record: CostRecord) -> str:
    """Markdown: a summary, the per-stage FLOP breakdown, and the span times."""
    q = record.quality
    fv = (
        "n/a"
        if record.flops_fvcore is None
        else f"{_g(record.flops_fvcore)} (matmul classes {_g(record.flops_fvcore_matmul)})"
    )
    syncs = "n/a on CPU" if record.host_syncs_per_forward is None else f"{record.host_syncs_per_forward:g}"
    measures = [
        ("GFLOPs counted (FlopCounterMode, 2/MAC)", _g(record.flops)),
        ("GMACs counted", "not counted" if record.macs is None else f"{record.macs / 1e9:,.3f}"),
        ("GFLOPs analytic", _g(record.flops_analytic)),
        ("GFLOPs fvcore x2", fv),
        ("wall time, median (IQR)", f"{record.time_median_s * 1e3:.2f} ms ({record.time_iqr_s * 1e3:.2f})"),
        ("tokens/s", f"{record.tokens_per_s:,.0f}"),
        ("wall time with span timers", f"{record.spans_wall_median_s * 1e3:.2f} ms"),
        ("one counted pass", f"{record.counted_pass_s * 1e3:.2f} ms ({record.counting_overhead:.2f}x uncounted)"),
        (f"peak memory ({record.memory_measure})", f"{record.peak_memory_bytes / 2**20:.2f} MiB"),
        ("process peak RSS", f"{record.peak_rss_bytes / 2**20:.1f} MiB"),
        ("host-device syncs per forward", syncs),
    ]
    stage_columns = (
        "stage, layers, tokens in, slots, head tokens, GFLOPs, layers, of which attention, exit head, exit fn, other, "
        "padding (analytic), analytic"
    ).split(", ")
    stages = (
        [s.stage, s.layers_in_stage, s.tokens_entered, s.slots_computed, s.head_tokens]
        + [_g(f) for f in (s.flops, s.layers_flops, s.attention_flops, s.exit_head_flops, s.exit_rule_flops)]
        + [_g(s.other_flops), _g(s.padding_flops), _g(s.analytic_flops)]
        for s in record.stages
    )
    spans = ([name, f"{seconds * 1e3:.3f}"] for name, seconds in record.spans_median_s.items())
    lines = [
        f"method {record.method}: PPL {q.ppl:.3f}, accuracy {q.accuracy:.4f}, exit ratios "
        f"{', '.join(f'{r:.3f}' for r in q.exit_ratios)}, layer cost {q.layer_cost:.4f}, {q.routed_tokens} tokens",
        "",
        markdown_table(["measure", "value"], measures),
        "",
        markdown_table(stage_columns, stages),
        "",
        markdown_table(["span", "median ms"], spans),
    ]
    if record.fvcore_unsupported:
        lines += ["", "fvcore skipped: " + ", ".join(f"{op} x{n}" for op, n in record.fvcore_unsupported.items())]
    return "\n".join(lines)
