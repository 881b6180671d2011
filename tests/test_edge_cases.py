"""Edge cases of routing, and the errors bad input gets."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench import LLM, Ensemble, forward_cascade
from cascade_bench.stages.presets import build_ensemble, stage_config
from tests.helpers import BATCHING, FAMILIES, INF, tiny_ensemble, token_batch


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("batching", BATCHING)
def test_sequence_length_one_and_batch_of_one(preset, batching, text):
    ensemble = tiny_ensemble(preset)
    with torch.inference_mode():
        for ids in (token_batch(text, 3, 1), token_batch(text, 1, 7), token_batch(text, 1, 1)):
            for threshold in (-INF, 0.0, INF):
                out = forward_cascade(ensemble, ids, thresholds=[threshold], batching=batching)
                reference = forward_cascade(ensemble, ids, num_stages=1 if threshold == -INF else 2, method="full")
                if threshold != 0.0:
                    torch.testing.assert_close(out.nll, reference.nll, atol=1e-5, rtol=0)
                assert out.exit_stage.shape == ids.shape
                assert not out.scored[:, -1].any()  # last position has no next token
                assert sum(out.tokens_exited) == ids.numel()


@pytest.mark.parametrize("preset", FAMILIES)
def test_per_stage_thresholds_three_stages(preset, text):
    ensemble = tiny_ensemble(preset, layers=(1, 1, 1))
    ids = token_batch(text, 4, 20)
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, num_stages=1, confidence_at_last_stage=True)
        t0 = float(probe.stage_confidence[0].quantile(0.4))  # 40% continue past stage 0
        probe1 = forward_cascade(ensemble, ids, thresholds=[t0, INF], num_stages=2, confidence_at_last_stage=True)
        reached1 = probe1.exit_stage == 1
        t1 = float(probe1.stage_confidence[1][reached1].median())
        out = forward_cascade(ensemble, ids, thresholds=[t0, t1])
    conf0 = probe.stage_confidence[0]
    conf1 = probe1.stage_confidence[1]
    expected = torch.where(conf0 >= t0, 0, torch.where(conf1 >= t1, 1, 2))
    assert torch.equal(out.exit_stage, expected)
    assert out.tokens_entered == (80, int((conf0 < t0).sum()), int((expected == 2).sum()))
    assert 0 < out.tokens_entered[2] < out.tokens_entered[1] < 80
    # layer cost of 1+1+1 layers = (80 + n1 + n2) / (80 * 3), by hand
    assert out.layer_cost == pytest.approx(sum(out.tokens_entered) / (80 * 3))
    # thresholds set on the stages are what routing uses by default
    ensemble.set_thresholds([t0, t1])
    with torch.inference_mode():
        again = forward_cascade(ensemble, ids)
    assert torch.equal(again.exit_stage, out.exit_stage)


def test_masked_baseline_same_stage0_decisions_full_cost(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 3, 16)
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, num_stages=1, confidence_at_last_stage=True)
        threshold = float(probe.stage_confidence[0].median())
        routed = forward_cascade(ensemble, ids, thresholds=[threshold])
        masked = forward_cascade(ensemble, ids, thresholds=[threshold], method="masked")
        masked_none = forward_cascade(ensemble, ids, thresholds=[-INF], method="masked")
        masked_all = forward_cascade(ensemble, ids, thresholds=[INF], method="masked")
        stage0 = forward_cascade(ensemble, ids, num_stages=1, method="full")
        cascade = forward_cascade(ensemble, ids, method="full")
    assert torch.equal(masked.exit_stage, routed.exit_stage)
    easy = routed.exit_stage == 0
    torch.testing.assert_close(masked.nll[easy], routed.nll[easy])
    assert masked.tokens_entered == (48, 48) and masked.layer_cost == 1.0
    assert routed.layer_cost < 1.0
    torch.testing.assert_close(masked_none.nll, stage0.nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_all.nll, cascade.nll, atol=1e-5, rtol=0)


def test_full_vocab_logits_only_on_request(text):
    ensemble = tiny_ensemble("llama-tiny")
    ids = token_batch(text, 2, 10)
    with torch.inference_mode():
        plain = forward_cascade(ensemble, ids, thresholds=[0.0])
        with_logits = forward_cascade(ensemble, ids, thresholds=[0.0], return_logits=True)
        cascade = forward_cascade(ensemble, ids, return_logits=True, method="full")
    assert plain.logits is None
    assert with_logits.logits.shape == (2, 10, ensemble.vocab_size)
    logp = torch.log_softmax(with_logits.logits.float(), -1)
    targets = ids[:, 1:]
    nll = -logp[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(nll, with_logits.nll[:, :-1], atol=1e-5, rtol=0)
    assert cascade.logits.shape == (2, 10, ensemble.vocab_size)


def test_hidden_size_mismatch_is_a_clear_error():
    ensemble = build_ensemble("gpt2-tiny", (1,))
    other = LLM.from_config(stage_config("gpt2-tiny", hidden_size=48, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"hidden size 48 != 32"):
        ensemble.add_stage(other)


def test_vocab_mismatch_is_a_clear_error():
    ensemble = build_ensemble("gpt2-tiny", (1,))
    other = LLM.from_config(stage_config("gpt2-tiny", vocab_size=300))
    with pytest.raises(ValueError, match=r"vocab size 300 != 256"):
        ensemble.add_stage(other)


def test_dtype_mismatch_is_a_clear_error():
    ensemble = build_ensemble("gpt2-tiny", (1,))
    other = LLM.from_config(stage_config("gpt2-tiny")).to(torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64 != torch.float32"):
        ensemble.add_stage(other)


def test_nan_logits_raise_instead_of_a_silent_perplexity(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    with torch.no_grad():
        ensemble[1].parts.final_norm.weight[0] = math.nan
    ids = token_batch(text, 2, 8)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"stage 1 produced non-finite logits"):
        forward_cascade(ensemble, ids, thresholds=[INF])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(method="cascade"), r"method must be one of"),
        (dict(batching="packed"), r"batching must be one of"),
        (dict(positions="absolute"), r"positions must be one of"),
        (dict(thresholds=[0.1, 0.2, 0.3]), r"expected 1 \(or 2\) thresholds"),
        (dict(thresholds=[math.nan]), r"threshold must not be NaN"),
        (dict(num_stages=3), r"num_stages must be an int in \[1, 2\]"),
    ],
)
def test_bad_arguments_name_the_value(bad, match, text):
    ensemble = tiny_ensemble("gpt2-tiny")
    with pytest.raises(ValueError, match=match):
        forward_cascade(ensemble, token_batch(text, 1, 4), **bad)


def test_bad_inputs_name_the_value():
    ensemble = tiny_ensemble("gpt2-tiny")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\).*300"):
        forward_cascade(ensemble, torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        forward_cascade(ensemble, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        forward_cascade(ensemble, [[1, 2, 3]])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape"):
        forward_cascade(ensemble, torch.tensor([[1, 2, 3]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"exceeds stage 0's max_position_embeddings 128"):
        forward_cascade(ensemble, torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"marks no token as real"):
        forward_cascade(ensemble, torch.tensor([[1, 2]]), torch.zeros(1, 2))


def test_empty_ensemble_and_bad_threshold_types():
    with pytest.raises(ValueError, match="no stages"):
        forward_cascade(Ensemble(), torch.tensor([[1, 2]]))
    ensemble = tiny_ensemble("gpt2-tiny")
    with pytest.raises(TypeError, match="threshold must be a real number"):
        ensemble.set_thresholds(["high"])
    with pytest.raises(ValueError, match="expected 1 or 2 thresholds"):
        ensemble.set_thresholds([0.1, 0.2, 0.3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_routes_like_float32(dtype, text):
    """Confidences and NLLs are computed in float32 whatever the model dtype; decisions and PPL
    stay close to the float32 model's."""
    ids = token_batch(text, 4, 48)
    reference = tiny_ensemble("llama-tiny")
    half = tiny_ensemble("llama-tiny").to(dtype)
    with torch.inference_mode():
        probe = forward_cascade(reference, ids, num_stages=1, confidence_at_last_stage=True)
        threshold = float(probe.stage_confidence[0].median())
        a = forward_cascade(reference, ids, thresholds=[threshold])
        b = forward_cascade(half, ids, thresholds=[threshold])
    assert b.nll.dtype == torch.float32 and b.stage_confidence.dtype == torch.float32
    agree = (a.exit_stage == b.exit_stage).float().mean()
    assert agree > 0.8  # tokens near the threshold may flip
    ppl_a = torch.exp(a.nll[a.scored].mean())
    ppl_b = torch.exp(b.nll[b.scored].mean())
    assert abs(ppl_a - ppl_b) / ppl_a < 0.05
