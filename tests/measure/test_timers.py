"""Span timers: spans nest and add up to the wall time of the pass."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.measure.timing import SpanTimer, time_spans, wall_time_once
from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.routing.passes import forward_cascade
from tests.helpers import tiny_ensemble, token_batch

CHILDREN = ("gather", "layers", "exit", "scatter")


def _check_nesting(spans: dict, num_stages: int) -> None:
    for k in range(num_stages):
        parent = spans[f"stage{k}"]
        children = sum(spans.get(f"stage{k}.{c}", 0.0) for c in CHILDREN)
        assert 0 < children <= parent
        assert spans[f"stage{k}.layers"] > 0
        inner = spans.get(f"stage{k}.exit_head", 0.0) + spans.get(f"stage{k}.exit_rule", 0.0)
        assert inner <= spans[f"stage{k}.exit"]


@pytest.mark.parametrize("batching", ["padded", "bucketed"])
@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_cpu_spans_nest_and_sum_to_the_wall_time(batching, exit_rule, text):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(2, 2, 2), exit_rule=exit_rule)
    ids = token_batch(text, 8, 96)
    calibrate_thresholds(ensemble, [ids], 0.5)  # half continue at each stage: all three do work
    with torch.inference_mode():
        forward_cascade(ensemble, ids)  # warm-up
        timer = SpanTimer("cpu")
        wall = wall_time_once(lambda: forward_cascade(ensemble, ids, batching=batching, probe=timer))
    spans = timer.results()
    _check_nesting(spans, 3)
    covered = sum(spans[f"stage{k}"] for k in range(3))
    # The stage spans cover the pass except batch validation and result assembly (a few percent here).
    assert 0.75 * wall <= covered <= wall


def test_time_spans_reports_every_repeat(text):
    ensemble = tiny_ensemble("llama-tiny")
    ids = token_batch(text, 2, 16)
    with torch.inference_mode():
        wall, spans = time_spans(
            lambda probe: forward_cascade(ensemble, ids, thresholds=[0.0], probe=probe), warmup=1, repeats=3
        )
    assert len(wall.samples) == 3 and all(len(s.samples) == 3 for s in spans.values())
    assert {"stage0", "stage0.layers", "stage0.exit", "stage0.exit_head", "stage0.exit_rule"} <= set(spans)
    assert "stage1" not in spans  # threshold 0: everyone exits at stage 0, stage 1 does nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_spans_nest_and_sum_to_the_wall_time(text):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(2, 2, 2)).cuda()
    ids = token_batch(text, 8, 96).cuda()
    calibrate_thresholds(ensemble, [ids], 0.5)
    with torch.inference_mode():
        forward_cascade(ensemble, ids)
        timer = SpanTimer("cuda")
        wall = wall_time_once(lambda: forward_cascade(ensemble, ids, probe=timer), torch.device("cuda"))
    spans = timer.results()
    print({name: round(seconds * 1e3, 3) for name, seconds in spans.items()}, "wall ms", round(wall * 1e3, 3))
    _check_nesting(spans, 3)
    assert sum(spans[f"stage{k}"] for k in range(3)) <= wall * 1.01
