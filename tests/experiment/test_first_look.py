"""The run's first look at a pretrained model: its PPL on two validation batches, with a warning at
once when it predicts (near-)uniformly or falls outside the plausible range."""

from __future__ import annotations

import math

import torch

from cascade_bench.experiment.first_look import FIRST_LOOK_BATCHES, first_look


def _uniform_gpt2():
    """A GPT-2 whose (tied) head is all zeros: every logit is 0, so the PPL is exactly the vocabulary."""
    from transformers import AutoModelForCausalLM

    from cascade_bench.stages.presets import stage_config

    model = AutoModelForCausalLM.from_config(stage_config("gpt2-tiny", vocab_size=256)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model


def test_a_uniform_model_is_flagged_before_the_sweep_with_its_ppl():
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(3)]
    record, warning = first_look(_uniform_gpt2(), batches, vocab_size=256, plausible=(5.0, 1000.0))
    assert math.isclose(record["ppl"], 256.0, rel_tol=1e-4)  # uniform over 256 ids
    assert record["batches"] == FIRST_LOOK_BATCHES == 2 and record["tokens"] == 2 * 2 * 15
    assert warning is not None and "near its vocabulary size 256" in warning and "256.0" in warning


def test_outside_the_plausible_range_is_flagged_and_inside_it_is_not():
    batches = [torch.randint(0, 256, (2, 16))]
    model = _uniform_gpt2()
    # measured against a (pretend) larger vocabulary, PPL 256 is not near-uniform; only the range speaks
    _, outside = first_look(model, batches, vocab_size=10**6, plausible=(5.0, 100.0))
    assert outside is not None and "outside plausible_ppl [5, 100]" in outside
    assert first_look(model, batches, vocab_size=10**6, plausible=(5.0, 1000.0))[1] is None
    assert first_look(model, [], vocab_size=256, plausible=(5.0, 1000.0)) == ({"note": "no validation batches"}, None)
