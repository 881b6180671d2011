"""What early exit buys inside one model: blocks vs the unsplit model, per exit rule.

For each exit rule and each per-block hard ratio h (the fraction of the tokens reaching a
non-last block that continue: with 3 blocks, 1-h exit after block 0, h(1-h) after block 1, h^2
reach the last), thresholds are calibrated on a separate batch, then the routed pass and the
unsplit model (``method="full"`` on the same blocks: every layer on every token, one lm_head at
the end; the tests prove it equals the Hugging Face model) are timed in alternation on the
measured batch. FLOPs are counted on the real pass and split into layers and exit heads, so the
cost of the heads themselves shows: a max_prob exit needs the vocabulary projection for every
token reaching a block, a cos_sim exit only for the tokens leaving there.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.corpus import EMBEDDED_BYTES, embedded_byte_windows
from ..data.markdown import markdown_table
from ..data.storage import write_json_atomic
from ..measure.environment import environment_conditions
from ..measure.flops import count_pass_flops
from ..measure.timing import back_to_back_times
from ..routing.calibration import calibrate_thresholds
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.exits import resolve_exit_rule


@dataclass(frozen=True)
class BlockBenchRow:
    """One exit rule at one hard ratio; ratios are against the unsplit model in the same run.

    exit_ratios: per block, fraction of tokens exiting there. flops / flops_unsplit: counted.
    head_flops: FLOPs of all exit heads (final norm + lm_head projections and their NLL/argmax;
    the confidence is elementwise and counts 0). wall_ratio: median over repeats of routed time /
    unsplit time, the two timed back to back."""

    exit_rule: str
    hard_ratio: float
    exit_ratios: tuple[float, ...]
    layer_cost: float
    flops: int
    flops_unsplit: int
    head_flops: int
    head_flops_unsplit: int
    median_s: float
    median_s_unsplit: float
    wall_ratio: float

    @property
    def flop_ratio(self) -> float:
        return self.flops / self.flops_unsplit

    @property
    def head_share(self) -> float:
        """Fraction of the routed pass's FLOPs spent in exit heads."""
        return self.head_flops / self.flops


def bench_blocks(
    ensemble: Ensemble,
    input_ids: torch.Tensor,
    calibration_ids: torch.Tensor,
    hard_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    exit_rules: Sequence[str] = ("max_prob", "cos_sim"),
    warmup: int = 1,
    repeats: int = 5,
    batching: str = "bucketed",
) -> list[BlockBenchRow]:
    """Measure the routed pass against the unsplit model (see module docstring). The blocks'
    exit rules and thresholds are restored afterwards."""
    saved = [(stage.exit_rule, stage.threshold) for stage in ensemble]
    num_stages = len(ensemble)
    rows = []
    try:
        with evaluation_mode(ensemble), torch.inference_mode():

            def unsplit(probe=None):
                kwargs = {} if probe is None else {"probe": probe}
                return forward_cascade(ensemble, input_ids, method="full", **kwargs)

            unsplit_flops, _ = count_pass_flops(unsplit, num_stages)
            for name in exit_rules:
                for stage in ensemble:
                    stage.exit_rule = resolve_exit_rule(name)
                for ratio in hard_ratios:
                    if ratio >= 1.0:
                        thresholds = [math.inf] * (num_stages - 1)
                    else:
                        thresholds = list(calibrate_thresholds(ensemble, [calibration_ids], ratio))

                    def routed(probe=None, thresholds=thresholds):
                        kwargs = {} if probe is None else {"probe": probe}
                        return forward_cascade(ensemble, input_ids, thresholds=thresholds, batching=batching, **kwargs)

                    counted, out = count_pass_flops(routed, num_stages)
                    mine, theirs = back_to_back_times(routed, unsplit, repeats, input_ids.device, warmup=warmup)
                    rows.append(
                        BlockBenchRow(
                            exit_rule=name,
                            hard_ratio=ratio,
                            exit_ratios=out.exit_ratios,
                            layer_cost=out.layer_cost,
                            flops=counted.total,
                            flops_unsplit=unsplit_flops.total,
                            head_flops=sum(s.exit_head + s.exit_rule for s in counted.stages),
                            head_flops_unsplit=sum(s.exit_head + s.exit_rule for s in unsplit_flops.stages),
                            median_s=statistics.median(mine),
                            median_s_unsplit=statistics.median(theirs),
                            wall_ratio=statistics.median(a / b for a, b in zip(mine, theirs)),
                        )
                    )
    finally:
        for stage, (fn, threshold) in zip(ensemble, saved):
            stage.exit_rule, stage.threshold = fn, threshold
    return rows


def format_block_table(rows: Sequence[BlockBenchRow]) -> str:
    """Markdown table of the rows."""
    header = (
        "exit rule, hard ratio per block, exits per block, layer cost, GFLOPs, FLOP ratio, exit-head GFLOPs, "
        "heads' share, routed ms, unsplit ms, wall ratio"
    ).split(", ")
    cells = (
        [
            r.exit_rule,
            f"{r.hard_ratio:g}",
            " / ".join(f"{e:.0%}" for e in r.exit_ratios),
            f"{r.layer_cost:.3f}",
            f"{r.flops / 1e9:.2f}",
            f"{r.flop_ratio:.3f}",
            f"{r.head_flops / 1e9:.2f}",
            f"{r.head_share:.1%}",
            f"{r.median_s * 1e3:.1f}",
            f"{r.median_s_unsplit * 1e3:.1f}",
            f"{r.wall_ratio:.3f}",
        ]
        for r in rows
    )
    return markdown_table(header, cells)


def write_block_bench(rows: Sequence[BlockBenchRow], conditions: dict, path: "Path | str") -> None:
    """Rows and conditions as JSON, written atomically."""
    write_json_atomic(
        Path(path),
        {
            "conditions": conditions,
            "rows": [{**asdict(r), "flop_ratio": r.flop_ratio, "head_share": r.head_share} for r in rows],
        },
    )


def run_block_bench(
    ensemble: Ensemble,
    origin: str,
    *,
    batch_size: int = 8,
    seq_len: int = 512,
    hard_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    exit_rules: Sequence[str] = ("max_prob", "cos_sim"),
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    json_path: "Path | str | None" = None,
) -> tuple[list[BlockBenchRow], dict]:
    """The ``bench-blocks`` job on the embedded text (one batch measured, the next calibrates):
    (rows, conditions), written to ``json_path``."""
    windows = embedded_byte_windows(2 * batch_size, seq_len).to(ensemble.device)
    measured, calibration = windows[:batch_size], windows[batch_size:]
    rows = bench_blocks(ensemble, measured, calibration, hard_ratios, exit_rules, warmup=warmup, repeats=repeats)
    conditions = {
        **environment_conditions(ensemble.device, ensemble.dtype),
        "model": origin,
        "layers_per_block": list(ensemble.layers_per_stage),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "data": f"{EMBEDDED_BYTES}; thresholds calibrated on the next batch of windows",
        "note": "untrained weights unless --model: exit ratios are "
        "forced by calibration, costs do not depend on what the weights predict",
    }
    if json_path is not None:
        write_block_bench(rows, conditions, json_path)
    return rows, conditions
