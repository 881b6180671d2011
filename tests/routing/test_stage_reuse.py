"""Stage reuse: a pass that reads kept stage work gives the same bits as one that computes it all."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cascade_bench.measure.probes import Probe
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.routing.stage_reuse import StageReuse
from tests.helpers import tiny_ensemble, token_batch

TEXT = (
    "The quick brown fox jumps over the lazy dog. Early exit lets easy tokens leave after the first "
    "stage while the hard ones go on; the later stages see only the tokens that reach them. "
) * 4


def _assert_same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            same = torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0))
            assert x.shape == y.shape and same, f.name
        else:
            assert x == y, f.name


def _thresholds(ensemble, ids, ratio: float) -> list[float]:
    out = forward_cascade(ensemble, ids, method="masked", thresholds=[math.inf] * len(ensemble))
    kept = []
    for k in range(len(ensemble) - 1):
        confidence = out.stage_confidence[k][out.scored]
        kept.append(float(torch.quantile(confidence, ratio)))
    return kept


@pytest.mark.parametrize("kind", ["llm", "block"])
@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_passes_with_reuse_equal_passes_without_it_field_for_field(kind, exit_rule):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1), exit_rule=exit_rule, kind=kind)
    batches = [token_batch(TEXT, 4, 24, offset=o) for o in (0, 50)]
    mask = torch.ones_like(batches[1])
    mask[1, 17:] = 0  # one short row: the bucketed layout differs from the padded one
    reuse = StageReuse().for_rule(exit_rule)
    runs = [
        dict(method="full"),
        dict(method="masked", thresholds=None),
        dict(method="routed", batching="padded"),
        dict(method="routed", batching="bucketed"),
        dict(method="routed", batching="bucketed", positions="original"),
        dict(method="routed", batching="padded", num_stages=2),
    ]
    with torch.inference_mode():
        for ratio in (0.0, 0.3, 0.7, 1.0):
            for index, ids in enumerate(batches):
                attention = mask if index == 1 else None
                thresholds = _thresholds(ensemble, ids, ratio)
                for arguments in runs:
                    arguments = {**arguments}
                    if arguments["method"] != "full":
                        arguments["thresholds"] = thresholds[: (arguments.get("num_stages") or 3) - 1]
                    plain = forward_cascade(ensemble, ids, attention, **arguments)
                    kept = forward_cascade(ensemble, ids, attention, reuse=reuse.batch(index), **arguments)
                    _assert_same(plain, kept)
    summary = reuse.owner.summary()
    assert summary["reused_calls"] > summary["computed_calls"] > 0  # it did serve most of the stage work
    assert summary["refused_bytes"] == 0 and summary["kept_bytes"] > 0


def test_nothing_is_kept_past_the_memory_bound_and_the_results_stay_the_same():
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1))
    ids = token_batch(TEXT, 2, 16)
    reuse = StageReuse(limit_bytes=0)
    with torch.inference_mode():
        plain = forward_cascade(ensemble, ids, method="masked", thresholds=[0.2])
        for _ in range(2):
            kept = forward_cascade(ensemble, ids, method="masked", thresholds=[0.2], reuse=reuse.batch("r", 0))
            _assert_same(plain, kept)
    summary = reuse.summary()
    assert summary["kept_bytes"] == 0 and summary["refused_bytes"] > 0 and summary["reused_calls"] == 0


def test_reuse_refuses_another_batch_a_probe_logits_and_a_kv_policy():
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1))
    ids = token_batch(TEXT, 2, 16)
    other = token_batch(TEXT, 2, 16, offset=9)
    reuse = StageReuse().for_rule("max_prob")
    with torch.inference_mode():
        forward_cascade(ensemble, ids, method="masked", reuse=reuse.batch(0))
        with pytest.raises(ValueError, match="other input_ids than the batch"):
            forward_cascade(ensemble, other, method="masked", reuse=reuse.batch(0))
        targets = torch.full_like(ids, -100)
        with pytest.raises(ValueError, match="other targets"):
            forward_cascade(ensemble, ids, None, targets, method="masked", reuse=reuse.batch(0))
        for arguments in (
            dict(probe=Probe()),
            dict(return_logits=True),
            dict(kv_policy="propagate", batching="padded", positions="original"),
        ):
            with pytest.raises(ValueError, match="reuse is for plain untimed passes"):
                forward_cascade(ensemble, ids, method="routed", reuse=reuse.batch(0), **arguments)
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0"):
        StageReuse(limit_bytes=-1)


@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_a_counted_pass_keeps_what_it_computes_and_counts_every_flop(exit_rule):
    """A counted pass may add to the reuse (reading=False) but never reads from it: its count is the
    count without reuse; a later uncounted pass reads what it kept and gives the same results."""
    from cascade_bench.measure.flops import count_pass_flops

    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1), exit_rule=exit_rule)
    ids = token_batch(TEXT, 3, 20)
    reuse = StageReuse().for_rule(exit_rule)
    with torch.inference_mode():
        thresholds = _thresholds(ensemble, ids, 0.5)

        def counted(keep):
            def run(probe):
                return forward_cascade(ensemble, ids, method="masked", thresholds=thresholds, probe=probe, reuse=keep)

            return count_pass_flops(run, 2)

        plain_count, plain = counted(None)
        for _ in range(2):  # the second counted pass finds everything kept and still computes it
            kept_count, kept = counted(reuse.batch(0, reading=False))
            assert kept_count.total == plain_count.total and kept_count.stages == plain_count.stages
            _assert_same(plain, kept)
        summary = reuse.owner.summary()
        assert summary["reused_calls"] == 0 and summary["kept_bytes"] > 0
        _assert_same(
            plain, forward_cascade(ensemble, ids, method="masked", thresholds=thresholds, reuse=reuse.batch(0))
        )
        assert reuse.owner.summary()["reused_calls"] > 0
        with pytest.raises(ValueError, match="reuse is for plain untimed passes"):
            counted(reuse.batch(0))
