"""Report checks on hand-built records: the right flags on bad runs, none on a good one."""

from __future__ import annotations

import copy

import pytest

from cascade_bench.experiment import checks as checks_module
from cascade_bench.experiment.checks import format_checks
from cascade_bench.experiment.records import Record


def run_checks(rows):
    """The checks over hand-built rows (dicts, easy to edit in a test), read as the store reads them."""
    return checks_module.run_checks([Record.from_dict(row) for row in rows])


def _stage(stage, epochs, best, reason, cap=40):
    return {
        "stage": stage,
        "epochs": epochs,
        "best_epoch": best,
        "stop_reason": reason,
        "max_epochs": cap,
        "patience": 1,
        "max_steps_per_epoch": None,
        "best_val_ppl": 100.0,
    }


def _point(point_id, method, ppl, hard_ratio=None, **extra):
    return {
        "point_id": point_id,
        "method": method,
        "ppl": ppl,
        "hard_ratio": hard_ratio,
        "flops": extra.pop("flops", None),
        "flops_analytic": extra.pop("flops_analytic", 1000),
        **extra,
    }


def good_records():
    training = {"protocol": "ashem", "stages": [_stage(0, 12, 11, "early stopping"), _stage(1, 9, 6, "early stopping")]}
    conditions = {"training": training}
    records = [
        _point("full", "full", 150.0, flops=2000, flops_analytic=2000),
        _point("prefix-0", "prefix", 180.0, stages=1, flops=1200, flops_analytic=1200),
        _point("dense", "dense", 140.0, flops=2000, flops_analytic=2000),
        _point("routed@0.3", "routed", 165.0, 0.3, hard_ppl_stage0=500.0, hard_ppl=400.0, tokens_exited=[700, 300]),
        _point("masked@0.3", "masked", 165.1, 0.3, tokens_exited=[700, 300]),
        _point(
            "routed@0.5",
            "routed",
            158.0,
            0.5,
            hard_ppl_stage0=420.0,
            hard_ppl=330.0,
            tokens_exited=[500, 500],
            flops=1500,
            flops_analytic=1500,
        ),
        _point("masked@0.5", "masked", 158.2, 0.5, tokens_exited=[500, 500], flops=2400, flops_analytic=2400),
        _point("oracle", "oracle", 120.0),
    ]
    for record in records:
        record["conditions"] = conditions
    records[2]["conditions"] = {**conditions, "dense_training": _stage(0, 14, 13, "early stopping")}
    return records


def _flags(records):
    return {check.name for check in run_checks(records) if check.flagged}


def test_a_good_run_raises_no_flag():
    checks = run_checks(good_records())
    assert [c.flagged for c in checks] == [False] * 8
    text = format_checks(checks)
    assert "stage 0 alone 180.0 -> full cascade 150.0" in text
    assert "at hard ratio 0.5: 420.0 at stage 0 -> 330.0 after (-21.4%)" in text
    assert "stage 0: 12 epochs, best 11, early stopping" in text and "dense: 14 epochs" in text
    assert "equal at all 5 counted points" in text and text.count("[FLAG]") == 0
    assert text.count("[ok]") + text.count("[n/a]") == 8


def test_a_full_cascade_worse_than_its_prefix_is_flagged_with_its_figures():
    records = good_records()
    records[0]["ppl"] = 621.3  # the inverted headline of issue 13
    checks = {c.name: c for c in run_checks(records)}
    check = checks["each later stage improves on the prefix before it"]
    assert check.flagged and check.detail == "full cascade PPL 621.3 > stage 0 alone 180.0"


def test_a_stage_cut_by_the_epoch_cap_is_flagged():
    records = good_records()
    cut = copy.deepcopy(records[0]["conditions"])
    cut["training"]["stages"][1] = _stage(1, 4, 4, "epoch cap", cap=4)
    for record in records:
        record["conditions"] = {**record["conditions"], "training": cut["training"]}
    check = next(
        c for c in run_checks(records) if c.name == "every trained part stopped by early stopping on whole epochs"
    )
    assert check.flagged and check.detail == "stage 1 stopped at the epoch cap (4 of 4 epochs, best epoch 4)"
    records[2]["conditions"]["dense_training"]["max_steps_per_epoch"] = 10
    check = next(
        c for c in run_checks(records) if c.name == "every trained part stopped by early stopping on whole epochs"
    )
    assert "dense ran partial epochs (max_steps_per_epoch 10)" in check.detail


@pytest.mark.parametrize(
    "change, flag",
    [
        (lambda r: r[2].update(ppl=190.0), "the dense model beats stage 0 alone"),
        (lambda r: r[5].update(hard_ppl=430.0), "hard tokens improve after the later stages"),
        (lambda r: r[7].update(ppl=3.2), "every PPL within [5, 1000]"),
        (lambda r: r[1].update(ppl=1450.0), "every PPL within [5, 1000]"),
        (
            lambda r: r[4].update(tokens_exited=[699, 301]),
            "routed and masked early exit make the same stage-0 decisions",
        ),
        (lambda r: r[5].update(flops=1501), "counted FLOPs equal the analytic count"),
    ],
)
def test_each_implausible_figure_raises_its_own_flag(change, flag):
    records = good_records()
    change(records)
    assert _flags(records) == {flag}
    # a flag is named by what passing means and says what it suggests doing; a pass says nothing more
    lines = format_checks(run_checks(records)).splitlines()
    flagged = [line for line in lines if line.startswith("- [FLAG]")]
    assert len(flagged) == 1 and flagged[0].startswith(f"- [FLAG] {flag}: ") and "; suggests: " in flagged[0]
    assert not any("suggests" in line for line in lines if line.startswith("- [ok]"))


def test_flag_details_name_the_figures():
    records = good_records()
    records[5]["hard_ppl"] = 430.0
    records[4]["tokens_exited"] = [699, 301]
    records[7]["ppl"] = 3.2
    details = {c.name: c.detail for c in run_checks(records)}
    assert details["hard tokens improve after the later stages"].startswith(
        "hard-token PPL did not improve at hard ratio 0.5 (420.0 -> 430.0)"
    )
    assert (
        details["routed and masked early exit make the same stage-0 decisions"]
        == "hard 0.3: routed 700 vs masked 699 tokens exit at stage 0"
    )
    assert details["every PPL within [5, 1000]"].startswith("oracle 3.2")


def test_checks_that_do_not_apply_say_so():
    records = [
        _point("full", "full", 30.0),
        _point("routed@0.5", "routed", 31.0, 0.5, hard_ppl_stage0=float("nan"), hard_ppl=40.0, tokens_exited=[5, 5]),
    ]
    details = {c.name: (c.flagged, c.detail) for c in run_checks(records)}
    assert details["each later stage improves on the prefix before it"] == (False, "n/a: no full and prefix points")
    assert details["every trained part stopped by early stopping on whole epochs"] == (
        False,
        "n/a: nothing was trained in this run",
    )
    assert details["hard tokens improve after the later stages"][1].startswith("n/a")
    # a check with nothing to check is not reported as passed: its name states what passing means
    lines = format_checks(run_checks(records)).splitlines()
    assert "- [n/a] each later stage improves on the prefix before it: n/a: no full and prefix points" in lines
    assert not any(line.startswith("- [ok]") and ": n/a" in line for line in lines)
    with pytest.raises(ValueError, match="no records"):
        run_checks([])


def _risk_point(rule, realised, delta=0.1):
    control = {"risk": "disagreement", "delta": delta, "epsilon": 0.1, "hard_ratio": 0.4}
    return _point(
        f"risk[{rule}]", "risk_controlled", 160.0, 0.4, exit_rule=rule, risk_control=control, realised_risk=realised
    )


def test_a_risk_controlled_point_above_its_delta_is_flagged():
    records = good_records() + [_risk_point("max_prob", 0.08), _risk_point("cos_sim", 0.13)]
    check = {c.name: c for c in run_checks(records)}["every risk-controlled point within its delta on the scored split"]
    assert check.flagged
    assert check.detail == "cos_sim: disagreement 0.130 on test (delta 0.1, epsilon 0.1, hard ratio 0.4)"
    records[-1]["realised_risk"] = 0.1  # at delta is within it
    assert not {c.name: c for c in run_checks(records)}[
        "every risk-controlled point within its delta on the scored split"
    ].flagged


def test_realised_risk_on_the_batches_risk_control_used_is_labelled_as_no_test():
    point = _risk_point("max_prob", 0.05)
    point["conditions"] = {**point.get("conditions", {}), "split": "validation"}
    point["risk_control"]["calibration"] = "shared: the validation batches that also early-stopped training"
    check = {c.name: c for c in run_checks(good_records() + [point])}[
        "every risk-controlled point within its delta on the scored split"
    ]
    assert check.detail == (
        "max_prob: disagreement 0.050 on validation (the batches it calibrated on: not an "
        "independent test) (delta 0.1, epsilon 0.1, hard ratio 0.4)"
    )
    point["risk_control"]["calibration"] = "held out: the last 4 validation batches"
    check = {c.name: c for c in run_checks(good_records() + [point])}[
        "every risk-controlled point within its delta on the scored split"
    ]
    assert check.detail.startswith("max_prob: disagreement 0.050 on validation (delta")


def test_sweep_checks_read_only_the_trained_with_rule():
    records = good_records()
    for record in records:
        record["conditions"] = {**record["conditions"], "config": {"exit_rule": "max_prob"}}
    # another rule's routed point with hard tokens worse after the later stages and no masked twin
    records.append(
        _point(
            "routed[cos_sim]@0.5",
            "routed",
            158.0,
            0.5,
            exit_rule="cos_sim",
            hard_ppl_stage0=300.0,
            hard_ppl=330.0,
            tokens_exited=[100, 900],
        )
    )
    assert _flags(records) == set()
