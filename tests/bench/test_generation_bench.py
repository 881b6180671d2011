"""The decoding benchmark: forced exit shares, what it reports, its checks and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cascade_bench.bench.decoding import (
    DecodingRow,
    DecodingSettings,
    ForcedStepExit,
    bench_decoding,
    decoding_checks,
    format_decoding_table,
    teacher_forced_policies,
    write_decoding_bench,
)
from cascade_bench.bench.forced_exits import CHUNK, ForcedExitRate
from cascade_bench.cli import main
from cascade_bench.stages.exits import resolve_exit_rule
from tests.helpers import tiny_ensemble, token_batch


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_forced_rate_exits_exactly_its_share_of_every_chunk(rate):
    rule = ForcedExitRate(rate, "cos_sim", seed=3)
    h = torch.randn(CHUNK, 4)
    decisions = torch.cat([rule(h, h, None) for _ in range(10)])
    per_chunk = decisions.view(10, CHUNK).sum(dim=1)
    # chunk j exits round(r*8*(j+1)) - round(r*8*j): the running total never drifts from r*n by 1 or more.
    assert int(decisions.sum()) == round(rate * CHUNK * 10)
    assert all(abs(float(per_chunk[: j + 1].sum()) - rate * CHUNK * (j + 1)) < 1 for j in range(10))
    assert set(decisions.tolist()) <= {0.0, 1.0}


def test_forced_rate_pays_the_rule_it_names_and_places_exits_by_seed():
    assert ForcedExitRate(0.5, "max_prob").needs_logits and not ForcedExitRate(0.5, "max_prob").needs_input_state
    assert ForcedExitRate(0.5, "cos_sim").needs_input_state and not ForcedExitRate(0.5, "cos_sim").needs_logits
    h = torch.randn(64, 4)
    first = ForcedExitRate(0.5, "cos_sim", seed=0)(h, h, None)
    assert torch.equal(first, ForcedExitRate(0.5, "cos_sim", seed=0)(h, h, None))
    assert not torch.equal(first, ForcedExitRate(0.5, "cos_sim", seed=1)(h, h, None))
    calls = []

    def spy(h_in, h_out, logits):
        calls.append(h_out.shape[0])
        return torch.zeros(h_out.shape[0])

    spy.needs_logits = False
    ForcedExitRate(0.5, resolve_exit_rule(spy))(h, h, None)
    assert calls == [64]  # the named rule ran on every token


@pytest.mark.parametrize("rate", [-0.1, 1.5, True, "half"])
def test_forced_rate_rejects_what_is_not_a_fraction(rate):
    with pytest.raises(ValueError, match="rate must be a fraction in"):
        ForcedExitRate(rate)


def test_forced_step_exit_gives_every_row_of_a_call_the_same_decision():
    rule = ForcedStepExit(0.5, "cos_sim", seed=2)
    h = torch.randn(8, 4)
    decisions = torch.stack([rule(h, h, None) for _ in range(CHUNK)])
    assert all(len(set(row.tolist())) == 1 for row in decisions)  # one decision per call
    assert int(decisions[:, 0].sum()) == CHUNK // 2  # exactly half of 8 calls exit


def _variant(rows, batch, start):
    return next(r for r in rows if r.batch_size == batch and r.variant.startswith(start))


def test_bench_decoding_reports_every_variant_with_its_quality(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    original = ensemble[0].exit_rule
    prompts = {1: token_batch(text, 1, 16), 2: token_batch(text, 2, 16)}
    rows = bench_decoding(ensemble, prompts, DecodingSettings(new_tokens=9, repeats=1, warmup=0))
    assert ensemble[0].exit_rule is original
    for batch in (1, 2):
        assert _variant(rows, batch, "full depth").same_tokens == 1.0
        speculative = _variant(rows, batch, "self-speculative")
        assert speculative.same_tokens == 1.0 and speculative.common_prefix == 1.0  # lossless
        assert 0.0 <= speculative.acceptance_rate <= 1.0
        # 8 decode steps: forced shares are exact; two equal stages: layer cost = 1 - share / 2.
        for kv in ("absent", "propagate"):
            row = next(
                r for r in rows if r.batch_size == batch and r.variant.startswith("per_token") and r.kv_policy == kv
            )
            assert row.decode_exit_ratio == 0.5 and row.layer_cost == pytest.approx(0.75)
        assert _variant(rows, batch, "per_token").stage1_rows_per_step == pytest.approx(batch / 2)
        together = _variant(rows, batch, "batch")
        # The prompt's prefill draws one step decision too, so 8 decode steps hold 4 +- 1 exits; whole steps exit.
        assert abs(together.decode_exit_ratio - 0.5) <= 1 / 8
        assert together.stage1_rows_per_step == pytest.approx(batch * (1 - together.decode_exit_ratio))
        scheduled = _variant(rows, batch, "schedule")
        assert scheduled.decode_exit_ratio == 0.5 and scheduled.layer_cost == pytest.approx(0.75)
        assert _variant(rows, batch, "stage 0 only").decode_exit_ratio == 1.0
        assert all(math.isfinite(r.continuation_nll) and r.speedup > 0 for r in rows)
    assert "| batch | variant | K/V |" in format_decoding_table(rows)


def test_block_cascades_get_hugging_faces_generate_on_the_unsplit_model(text):
    ensemble = tiny_ensemble("llama-tiny", kind="block")
    rows = bench_decoding(ensemble, {1: token_batch(text, 1, 8)}, DecodingSettings(new_tokens=5, repeats=1, warmup=0))
    hf = _variant(rows, 1, "HF generate (unsplit model)")
    assert hf.same_tokens == 1.0  # the unsplit model's greedy tokens are full-depth greedy tokens


def test_teacher_forced_policies_rank_their_costs(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ensemble.set_thresholds([0.0])
    windows = [token_batch(text, 2, 16)]
    rows = {r.kv_policy: r for r in teacher_forced_policies(ensemble, windows)}
    assert rows["absent"].recomputed_tokens == rows["absent"].propagated_tokens == 0
    assert rows["recompute"].flop_ratio >= rows["absent"].flop_ratio
    assert rows["propagate"].flop_ratio >= rows["absent"].flop_ratio
    assert rows["absent"].exit_ratio_stage0 == rows["propagate"].exit_ratio_stage0


def test_decoding_checks_read_the_bars_from_the_runs_own_rows(tmp_path):
    def row(batch, variant, seconds, full=4.0, speedup=None, exit_policy="per_token", **extra):
        return DecodingRow(
            batch,
            variant,
            exit_policy,
            "absent",
            0.5,
            0.75,
            0.5,
            seconds,
            full,
            full / seconds if speedup is None else speedup,
            1.0,
            1.0,
            2.0,
            **extra,
        )

    rows = [
        row(1, "full depth", 4.0, exit_policy="-"),
        row(1, "stage 0 only (exit/draft step)", 2.0),
        # ideal: 1 / (0.5 x 0.5 + 0.5) = 4/3; achieved 4 / 3.2 = 1.25: 0.9375 of it
        row(1, "per_token, 50% forced to exit", 3.2),
        row(8, "stage 0 only (exit/draft step)", 1.0, full=1.6),
        row(8, "batch (quorum 1), 50% of steps forced to exit, cos_sim cost", 1.5, full=1.6, exit_policy="batch"),
        # 2 tokens per round; 4 drafts at 1 / 1.6 of a step + a verify of 0.25 x 2 / 1.6: predicted 2 / 2.8125
        row(
            8,
            "self-speculative, draft 4",
            1.0,
            full=1.6,
            exit_policy="speculative",
            acceptance_rate=0.5,
            mean_accepted_length=2.0,
            verify_share=0.25,
            tokens_per_loop_round=1.5,
        ),
        # at batch 1 the loop's rounds are the row's: only the acceptance-based line
        row(
            1,
            "self-speculative, draft 4",
            8.0,
            exit_policy="speculative",
            acceptance_rate=0.5,
            mean_accepted_length=2.0,
            verify_share=0.25,
            tokens_per_loop_round=2.0,
        ),
    ]
    checks = decoding_checks(rows, draft_length=4)
    assert [met for _, met in checks] == [True, False, True, True, False]
    assert "ideal 1.333x" in checks[0][0] and "= 0.938 >= 0.9" in checks[0][0]
    assert "(cos_sim cost)" in checks[1][0] and "1.067x full depth >= 1.15" in checks[1][0]
    assert "predicted 0.711x" in checks[2][0]
    # the slowest row's pace: 1.5 tokens per round for 4 drafts (2.5) + a verify of 0.25 x 1.5 / 1.6
    assert "slowest row" in checks[3][0] and "predicted 0.549x" in checks[3][0]
    # batch 1: 4 drafts at 1/2 of a step + a verify of 0.25 x 2 / 0.5 = 3; predicted 2/3, achieved 0.5
    assert checks[4][0].startswith("batch 1, self-speculative") and "predicted 0.667x = 0.750" in checks[4][0]
    write_decoding_bench(rows, [], checks, {"device": "cpu"}, tmp_path / "d.json")
    stored = json.loads((tmp_path / "d.json").read_text())
    assert [c["met"] for c in stored["checks"]] == [True, False, True, True, False] and len(stored["rows"]) == 7


def test_bench_generate_command_prints_and_stores_the_tables(tmp_path, capsys):
    out = tmp_path / "generate.json"
    code = main(
        [
            "bench-generate",
            "--preset",
            "gpt2-tiny",
            "--layers",
            "1",
            "1",
            "--batch-sizes",
            "1",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "5",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    stored = json.loads(out.read_text())
    assert {r["batch_size"] for r in stored["rows"]} == {1, 2}
    assert [r["kv_policy"] for r in stored["teacher_forced"]] == ["absent", "propagate", "recompute"]
    printed = capsys.readouterr().out
    assert "self-speculative, draft 4" in printed and "| K/V policy | PPL |" in printed
    assert any("self-speculative" in c["check"] for c in stored["checks"])


def test_bench_generate_command_names_bad_arguments(capsys):
    assert main(["bench-generate", "--preset", "gpt2-tiny", "--new-tokens", "2"]) == 2
    assert "--new-tokens must be at least 3" in capsys.readouterr().err
    assert main(["bench-generate", "--cascade", "/nonexistent/cascade"]) == 2
    assert "is not a saved cascade (no cascade.json)" in capsys.readouterr().err


def test_bench_generate_hard_ratio_is_the_share_that_continues(tmp_path, monkeypatch):
    """--hard-ratio 0.75: three quarters of the tokens continue past stage 0 (a quarter exit after
    it), so thresholds are calibrated for a hard ratio of 0.75, as ``run`` calibrates its points."""
    import cascade_bench.bench.decoding_run as decoding_run

    asked = []
    original = decoding_run.calibrate_thresholds

    def spy(ensemble, batches, hard_ratio, **kwargs):
        asked.append(hard_ratio)
        return original(ensemble, batches, hard_ratio, **kwargs)

    monkeypatch.setattr(decoding_run, "calibrate_thresholds", spy)
    out = tmp_path / "generate.json"
    assert (
        main(
            [
                "bench-generate",
                "--preset",
                "gpt2-tiny",
                "--layers",
                "1",
                "1",
                "--batch-sizes",
                "1",
                "--prompt-len",
                "8",
                "--new-tokens",
                "5",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--hard-ratio",
                "0.75",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert asked == [0.75]
    stored = json.loads(out.read_text())
    assert all(abs(r["exit_ratio_stage0"] - 0.25) < 0.15 for r in stored["teacher_forced"])


def test_only_transformers_own_assistant_call_has_its_deprecation_line_dropped(_no_transformers_deprecation_lines):
    """HF's assisted generation calls ``generate`` with a generation_config and token counts itself, and
    transformers then logs a deprecation about that internal call: that one line is dropped. The same
    line from any other caller (ours) still reaches the log, and the tests fail on it."""
    import logging

    from cascade_bench.bench.hf_generate import _INTERNAL_DEPRECATION, _without_transformers_internal_deprecation

    with _without_transformers_internal_deprecation():
        logging.getLogger("transformers.generation.utils").warning(_INTERNAL_DEPRECATION + "=({'x'}) is deprecated")
    assert _no_transformers_deprecation_lines.lines == [_INTERNAL_DEPRECATION + "=({'x'}) is deprecated"]
    _no_transformers_deprecation_lines.lines.clear()


def test_a_peer_known_to_fail_is_not_called_and_the_record_says_why():
    from transformers import AutoModelForCausalLM

    from cascade_bench.bench.decoding import peers_not_run
    from cascade_bench.stages.ensemble import Ensemble
    from cascade_bench.stages.presets import stage_config

    def blocks(preset):
        return Ensemble.from_blocks(AutoModelForCausalLM.from_config(stage_config(preset)), [1])

    reason = peers_not_run(blocks("gpt2-tiny"))["HF assistant_early_exit"]
    assert "GPT-2" in reason and "IndexError" in reason
    assert peers_not_run(blocks("llama-tiny")) == {}
