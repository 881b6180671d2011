"""The sweep as data: the points a config plans, the record each writes, and how two runs' records
are compared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cascade_bench.experiment.config import make_config
from cascade_bench.experiment.point_measures import METHODS
from cascade_bench.experiment.points import Point, anchor_ratio, plan_points
from cascade_bench.experiment.records import Method, Record, record_differences
from cascade_bench.experiment.results_store import SCHEMA_VERSION, ResultsStore
from cascade_bench.routing.passes import forward_cascade
from tests.experiment.test_experiment import TINY
from tests.helpers import tiny_ensemble

PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "results"


def test_the_plan_lists_every_point_in_measuring_order():
    config = make_config({**TINY, "hard_ratios": (0.3, 0.6)})
    points = plan_points(config, num_stages=3)
    rules = ["cos_sim", "classifier", "lowrank:32"]
    assert [p.id for p in points] == [
        "full",
        "prefix-0",
        "prefix-1",
        "dense",
        "routed@0.3",
        "masked@0.3",
        "routed@0.6",
        "masked@0.6",
        *[f"routed[{rule}]@{r}" for rule in rules for r in ("0.3", "0.6")],
        *[f"risk[{rule}]" for rule in ["max_prob", *rules]],
        *[f"kv[{policy}]@0.6" for policy in ("absent", "propagate", "recompute")],
        "oracle",
    ]
    by_id = {p.id: p for p in points}
    assert by_id["prefix-1"].stages == 2 and by_id["prefix-0"].stages == 1
    assert by_id["routed[cos_sim]@0.3"] == Point(
        "routed[cos_sim]@0.3", "routed", "cos_sim", hard_ratio=0.3, batching="bucketed", count_flops=False, timed=True
    )
    assert by_id["kv[absent]@0.6"].batching == "padded" and by_id["kv[absent]@0.6"].exit_rule == "max_prob"
    assert by_id["risk[classifier]"].hard_ratio is None and not by_id["risk[classifier]"].count_flops


def test_only_the_anchor_is_counted_and_timed_unless_asked():
    config = make_config({**TINY, "hard_ratios": (0.2, 0.4, 0.7), "timing_points": "anchors", "risk": ""})
    assert anchor_ratio(config) == 0.4  # |0.4 - 0.5| < |0.7 - 0.5|
    swept = [p for p in plan_points(config, 2) if p.hard_ratio is not None and p.method in ("routed", "masked")]
    assert {p.id for p in swept if p.count_flops} == {
        "routed@0.4",
        "masked@0.4",
        *(f"routed[{r}]@0.4" for r in config.exit_rules[1:]),
    }
    assert {p.id for p in swept if p.timed} == {p.id for p in swept if p.count_flops}
    every = make_config({**TINY, "count_flops": "all", "timing_points": "all"})
    assert all(p.count_flops and p.timed for p in plan_points(every, 2) if p.method in ("routed", "masked"))


def test_blocks_have_no_dense_point_and_memory_layers_no_kv_points():
    config = make_config(TINY)
    ids = [p.id for p in plan_points(config, 2, dense=False, kv_policies=False)]
    assert "dense" not in ids and not any(i.startswith("kv[") for i in ids) and ids[-1] == "oracle"


def _record(**fields) -> Record:
    base = dict(point_id="routed@0.5", method="routed", hard_ratio=0.5, ppl=12.5, tokens=10, time_median_s=0.1)
    return Record(**{**base, **fields})


def test_the_oracle_writes_no_pass_fields_and_a_pass_writes_all_of_them():
    oracle = Record(point_id="oracle", method="oracle", ppl=3.0, layers_per_stage=[1, 1], tokens=4)
    assert "thresholds" not in oracle.as_dict() and oracle.as_dict()["accuracy"] is None
    routed = Record(point_id="routed@0.5", method="routed", hard_ratio=0.5, thresholds=[0.9, math.inf])
    written = routed.as_dict()
    assert written["thresholds"] == [0.9, math.inf] and written["hard_ppl"] is None  # a pass field, even when null
    assert "kv_policy" not in written and "stages" not in written  # extras only when set
    assert Record.from_dict({"schema_version": SCHEMA_VERSION, **written}) == routed
    with pytest.raises(ValueError, match="'speedup'"):
        Record.from_dict({**written, "speedup": 2.0})


def test_the_store_takes_records_only(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    with pytest.raises(TypeError, match="takes a Record, got dict"):
        store.append({"point_id": "full"})
    store.append(Record(point_id="full", method="full", ppl=2.0))
    assert json.loads((tmp_path / "r.jsonl").read_text())["schema_version"] == SCHEMA_VERSION


def test_record_differences_ignore_the_clock_and_name_every_other_field():
    a = [_record(conditions={"config": {"out": "x", "seed": 0}, "seed": 0}, rule_training=[{"seconds": 1.0}])]
    b = [
        _record(
            time_median_s=0.3,
            wall_ratio_interleaved=1.1,
            conditions={"config": {"out": "y", "seed": 0}, "seed": 0, "hostname": "elsewhere"},
            rule_training=[{"seconds": 2.0}],
        )
    ]
    assert record_differences(a, b) == []
    assert record_differences(a, [_record(ppl=12.5000001, conditions=a[0].conditions)]) == [
        "routed@0.5: ppl 12.5 != 12.5000001",
        "routed@0.5: rule_training [{'seconds': 1.0}] != None",
    ]
    assert record_differences([_record()], [_record(ppl=12.5000001)], rel=1e-6) == []
    assert record_differences([_record()], [_record(conditions={"seed": 1})]) == [
        "routed@0.5: conditions.seed None != 1"
    ]
    assert record_differences([_record()], []) == ["routed@0.5: only in the first run"]


def test_across_cpus_counts_are_compared_to_the_tolerance_and_every_field_s_drift_is_named():
    """Runs on two CPUs: a few tokens exit elsewhere (counts and FLOPs move a little), PPL in the last
    digits; bit-equal comparison names them, the counts mode accepts them within the tolerance, and the
    drift per field is the largest relative difference over the points (by hand)."""
    from cascade_bench.experiment.records import field_drift

    a = [_record(tokens_entered=[1000, 500], ppl=20.0, exit_ratios=[0.5, 0.5]), _record(point_id="full", ppl=19.0)]
    b = [_record(tokens_entered=[1000, 510], ppl=20.1, exit_ratios=[0.52, 0.48]), _record(point_id="full", ppl=19.0)]
    assert record_differences(a, b, rel=0.05) == [  # counts bit-equal by default
        "routed@0.5: tokens_entered [1000, 500] != [1000, 510]"
    ]
    assert record_differences(a, b, rel=0.05, counts=True) == []
    assert record_differences(a, b, rel=0.025, counts=True) == ["routed@0.5: exit_ratios [0.5, 0.5] != [0.52, 0.48]"]
    # what says what was measured stays exact: another number of scored tokens is another experiment
    assert record_differences(
        a,
        [_record(tokens=11, **{k: getattr(b[0], k) for k in ("tokens_entered", "ppl", "exit_ratios")}), b[1]],
        rel=0.5,
        counts=True,
    ) == ["routed@0.5: tokens 10 != 11"]
    drift = field_drift(a, b)
    assert drift["exit_ratios"] == pytest.approx(0.02 / 0.5)
    assert drift["tokens_entered"] == pytest.approx(10 / 510)
    assert drift["ppl"] == pytest.approx(0.1 / 20.1)
    assert drift["method"] == 0.0 and list(drift)[0] == "exit_ratios"  # largest first
    assert field_drift(a, [_record(method="masked")])["method"] == math.inf
    assert field_drift([_record(ppl=math.inf)], [_record(ppl=812.0)])["ppl"] == math.inf  # not 0
    # how a rule trained (its epochs) is shown across CPUs, not compared; bit-equal mode still compares it
    trained = ([_record(rule_training=[{"epochs": 13}])], [_record(rule_training=[{"epochs": 11}])])
    assert record_differences(*trained, rel=0.15, counts=True) == []
    assert record_differences(*trained) == ["routed@0.5: rule_training [{'epochs': 13}] != [{'epochs': 11}]"]


@pytest.mark.parametrize("path", sorted(PUBLISHED.glob("*.jsonl")), ids=lambda p: p.name)
def test_every_published_record_reads_as_a_record(path):
    records = list(ResultsStore(path))
    assert records and all(isinstance(r, Record) and Record.from_dict(r.as_dict()) == r for r in records)


def test_a_point_reruns_its_pass_at_the_thresholds_its_record_holds():
    cascade = tiny_ensemble("gpt2-tiny")
    ids = torch.randint(0, cascade[0].config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        confidence = forward_cascade(cascade, ids, None, ids, thresholds=[math.inf, math.inf]).stage_confidence[0]
    thresholds = [float(confidence.median()), math.inf]  # about half the tokens exit at stage 0
    batch = {"input_ids": ids, "targets": ids}
    point = Point("routed@0.5", "routed", "max_prob", hard_ratio=0.5, batching="padded")
    record = Record(point_id=point.id, method="routed", thresholds=thresholds)
    arguments = METHODS[point.method].pass_arguments(point, record)
    with torch.no_grad():
        rerun = forward_cascade(cascade, batch["input_ids"], None, batch["targets"], **arguments)
        direct = forward_cascade(cascade, ids, None, ids, thresholds=thresholds, batching="padded")
    assert 0 < rerun.tokens_exited[0] < ids.numel()
    assert rerun.tokens_exited == direct.tokens_exited and torch.equal(rerun.exit_stage, direct.exit_stage)
    assert METHODS[Method.ORACLE].pass_arguments is None
    assert set(METHODS) == set(Method)


def test_the_back_to_back_wall_ratio_synchronises_on_the_cascade_s_device(text, monkeypatch):
    """Every clock read of a point's wall ratio synchronises the cascade's device (on CUDA the reads
    would otherwise see queued kernels, not finished ones); before, the sweep timed it with no device."""
    from cascade_bench.experiment.sweep import Sweep
    from cascade_bench.measure import timing
    from cascade_bench.measure.distributed import ONE_PROCESS
    from tests.helpers import token_batch

    synchronised = []
    monkeypatch.setattr(timing, "synchronize", lambda device=None: synchronised.append(device))
    config = make_config({**TINY, "hard_ratios": (0.5,), "timing_repeats": 1})
    cascade = tiny_ensemble("gpt2-tiny")
    batches = [{"input_ids": token_batch(text, 2, 16, offset=300 * k)} for k in range(2)]
    sweep = Sweep(
        config,
        cascade,
        train=[],
        validation=batches,
        test=batches,
        risk_calibration=[],
        conditions={},
        ranks=ONE_PROCESS,
        dense_model=lambda: None,
        timing_batches=1,
    )
    point = next(p for p in plan_points(config, 2) if p.id == "routed@0.5")
    record = sweep.measure(point)
    assert record.wall_ratio_interleaved > 0
    assert synchronised and all(device == cascade.device for device in synchronised)
