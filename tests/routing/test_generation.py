"""Early-exit generation with per-stage KV caches (docs/design.md invariant 4 and the extremes)."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.routing.generation import generate
from cascade_bench.routing.passes import forward_cascade
from tests.helpers import FAMILIES, KINDS, tiny_ensemble, token_batch

NEW = 8


def _median_threshold(ensemble, ids, mask=None):
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, mask, num_stages=1, confidence_at_last_stage=True)
    conf = probe.stage_confidence[0]
    values = conf[~torch.isnan(conf)].sort().values
    middle = values.numel() // 2
    # Halfway between two neighbouring confidences: no token sits on the threshold, so float
    # rounding between a cached decode step and a teacher-forced pass cannot flip a decision.
    return float((values[middle - 1] + values[middle]) / 2)


def _ragged_prompts(text, lengths, side):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = token_batch(text, 1, n, offset=97 * i + 5)[0]
        where = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


def _teacher_forced(ensemble, ids, mask, generated, thresholds, positions="compact"):
    """Routed teacher forcing over prompt + generated tokens, compacted per row (left-aligned)."""
    rows = [torch.cat([ids[i][mask[i].bool()], generated[i]]) for i in range(ids.shape[0])]
    width = max(r.numel() for r in rows)
    full = torch.zeros(len(rows), width, dtype=torch.long)
    full_mask = torch.zeros_like(full)
    for i, r in enumerate(rows):
        full[i, : r.numel()], full_mask[i, : r.numel()] = r, 1
    with torch.inference_mode():
        return forward_cascade(ensemble, full, full_mask, thresholds=thresholds, positions=positions), rows


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("lengths, side", [([12], "left"), ([9, 14, 5, 11], "left"), ([9, 14, 5, 11], "right")])
@pytest.mark.parametrize(
    "positions, exit_rule", [("compact", "max_prob"), ("original", "max_prob"), ("compact", "cos_sim")]
)
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_4_generation_nll_equals_teacher_forcing(kind, preset, lengths, side, positions, exit_rule, text):
    ensemble = tiny_ensemble(preset, exit_rule=exit_rule, kind=kind)
    ids, mask = _ragged_prompts(text, lengths, side)
    threshold = _median_threshold(ensemble, ids, mask)
    out = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[threshold], positions=positions)
    tf, rows = _teacher_forced(ensemble, ids, mask, out.tokens, [threshold], positions)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(tf.nll[i, n - 1 : n - 1 + NEW], out.nll[i], atol=1e-4, rtol=0)
        assert torch.equal(tf.exit_stage[i, n - 1 : n - 1 + NEW], out.exit_stage[i])
        # Stage 1's cache holds exactly the tokens that reached it (everything fed but the last token).
        fed = n + NEW - 1
        assert int(out.cache_lengths[1][i]) == int((tf.exit_stage[i, :fed] >= 1).sum())
        assert int(out.cache_lengths[0][i]) == fed
    assert 0 < out.exit_counts[0] and sum(out.exit_counts) == out.decode_tokens


@pytest.mark.parametrize("preset", FAMILIES)
def test_thresholds_minus_inf_is_hf_generate_with_stage_0(preset, text):
    ensemble = tiny_ensemble(preset)
    ids, mask = _ragged_prompts(text, [7, 10, 4], "left")
    out = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[-math.inf])
    with torch.inference_mode():
        hf = ensemble[0].model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert torch.equal(out.tokens, hf[:, ids.shape[1] :])
    assert (out.exit_stage == 0).all() and (out.cache_lengths[1] == 0).all()


@pytest.mark.parametrize("preset", FAMILIES)
def test_blocks_at_full_depth_generate_what_hf_generates_with_the_unsplit_model(preset, text):
    ensemble = tiny_ensemble(preset, kind="block")
    ids, mask = _ragged_prompts(text, [7, 10, 4], "left")
    out = generate(ensemble, ids, mask, max_new_tokens=NEW, method="full")
    with torch.inference_mode():
        hf = ensemble[0].source.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert torch.equal(out.tokens, hf[:, ids.shape[1] :])
    # Each block's cache holds its own layers only, and every token reached every block.
    assert all(torch.equal(c, out.cache_lengths[0]) for c in out.cache_lengths)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_thresholds_plus_inf_is_full_depth_generation(kind, preset, text):
    ensemble = tiny_ensemble(preset, kind=kind)
    ids, mask = _ragged_prompts(text, [7, 10], "left")
    routed = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[math.inf])
    full = generate(ensemble, ids, mask, max_new_tokens=NEW, method="full")
    assert torch.equal(routed.tokens, full.tokens)
    torch.testing.assert_close(routed.nll, full.nll)
    assert (full.exit_stage == 1).all() and full.layer_cost == 1.0


def test_sampling_eos_and_stats(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 3, 10)
    threshold = _median_threshold(ensemble, ids)
    a = generate(
        ensemble,
        ids,
        max_new_tokens=NEW,
        thresholds=[threshold],
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    b = generate(
        ensemble,
        ids,
        max_new_tokens=NEW,
        thresholds=[threshold],
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(a.tokens, b.tokens)  # seeded
    greedy = generate(ensemble, ids, max_new_tokens=NEW, thresholds=[threshold])
    eos = int(greedy.tokens[0, 2])
    stopped = generate(ensemble, ids, max_new_tokens=NEW, thresholds=[threshold], eos_token_id=eos, pad_token_id=-1)
    first = int((greedy.tokens[0] == eos).nonzero()[0])
    assert stopped.tokens[0, first] == eos and (stopped.tokens[0, first + 1 :] == -1).all()
    counted = generate(ensemble, ids, max_new_tokens=4, thresholds=[threshold], count_flops=True)
    assert counted.counted_flops > 0 and counted.seconds_per_token > 0 and 0.5 <= counted.layer_cost <= 1.0
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(ensemble, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="method must be 'routed' or 'full'"):
        generate(ensemble, ids, method="masked")


@pytest.mark.parametrize(
    "kinds", [("infini", "pythia", "pythia", "pythia"), ("pythia", "pythia", "hierarchical", "pythia")]
)
def test_invariant_4_on_memory_layers_at_batch_1(kinds, text):
    """Blocks of a memory-layer model at batch 1: each block's cache holds exactly the tokens that reached
    it, so a memory layer decodes with its fixed-size cache in block 0 or in a later block, across segment
    boundaries (8 tokens), and gives the teacher-forced routed NLL. At batch > 1 a later block's call
    leaves rows out, which memory layers refuse."""
    from cascade_bench.stages.presets import build_blocks

    ensemble = build_blocks("memory-tiny", (2, 2), layer_kinds=kinds).eval()
    ids, mask = _ragged_prompts(text, [12], "left")
    threshold = _median_threshold(ensemble, ids, mask)
    out = generate(ensemble, ids, mask, max_new_tokens=2 * NEW, thresholds=[threshold])
    tf, _ = _teacher_forced(ensemble, ids, mask, out.tokens, [threshold])
    torch.testing.assert_close(tf.nll[0, 11 : 11 + 2 * NEW], out.nll[0], atol=1e-4, rtol=0)
    assert torch.equal(tf.exit_stage[0, 11 : 11 + 2 * NEW], out.exit_stage[0])
    assert 0 < out.exit_counts[0] < out.decode_tokens
    if kinds[0] == "pythia":
        ids, mask = _ragged_prompts(text, [12, 12, 12], "left")
        with pytest.raises(
            NotImplementedError, match="every row has a real token at every step|every row of the batch"
        ):
            generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[threshold])
