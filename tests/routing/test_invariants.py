"""docs/design.md section 2, invariants 1-3, for GPT-2, Llama and GPT-NeoX tiny configs, both batching modes,
and both kinds of stage (whole LLMs, blocks of one model)."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench import forward_cascade
from cascade_bench.measure.flops import count_flops
from tests.helpers import BATCHING, INF, KINDS, ROUTED_FAMILIES, scripted_exit, tiny_ensemble, token_batch

ATOL = 1e-5


def _reference_per_sequence(ensemble, input_ids, exits0, positions="compact"):
    """Invariant 2 reference, written without the router: per sequence, stage 0 on the whole
    sequence, then stage 1 alone on that sequence's continuing tokens only (batch of one).
    Returns NLL (B, T) of the next token at each token's exit stage (last position: NaN)."""
    batch_size, seq_len = input_ids.shape
    nll = torch.full((batch_size, seq_len), math.nan)
    with torch.inference_mode():
        for b in range(batch_size):
            ids = input_ids[b : b + 1]
            hidden0 = ensemble[0](input_ids=ids).hidden[0]
            logp0 = torch.log_softmax(ensemble[0].logits(hidden0).float(), dim=-1)
            keep = (~exits0[b]).nonzero().squeeze(1)
            logp1 = None
            if keep.numel():
                pos = keep[None] if positions == "original" else torch.arange(keep.numel())[None]
                # An explicit all-ones mask: without it HF reads position gaps as packed sequences.
                hidden1 = ensemble[1](
                    inputs_embeds=hidden0[keep][None], position_ids=pos, attention_mask=torch.ones_like(pos)
                ).hidden[0]
                logp1 = torch.log_softmax(ensemble[1].logits(hidden1).float(), dim=-1)
            rank = torch.cumsum((~exits0[b]).long(), 0) - 1
            for t in range(seq_len - 1):
                target = input_ids[b, t + 1]
                nll[b, t] = -(logp0[t, target] if exits0[b, t] else logp1[rank[t], target])
    return nll


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_1_extreme_thresholds(kind, preset, batching, exit_rule, text):
    ensemble = tiny_ensemble(preset, exit_rule=exit_rule, kind=kind)
    ids = token_batch(text, 3, 24)
    with torch.inference_mode():
        stage0 = forward_cascade(ensemble, ids, num_stages=1, method="full")
        cascade = forward_cascade(ensemble, ids, method="full")
        nobody_continues = forward_cascade(ensemble, ids, thresholds=[-INF], batching=batching)
        everyone_continues = forward_cascade(ensemble, ids, thresholds=[INF], batching=batching)
    torch.testing.assert_close(nobody_continues.nll, stage0.nll, atol=ATOL, rtol=0)
    torch.testing.assert_close(everyone_continues.nll, cascade.nll, atol=ATOL, rtol=0)
    assert torch.equal(nobody_continues.correct, stage0.correct)
    assert torch.equal(everyone_continues.correct, cascade.correct)
    assert (nobody_continues.exit_stage == 0).all() and (everyone_continues.exit_stage == 1).all()
    assert nobody_continues.tokens_entered == (72, 0)
    assert everyone_continues.tokens_entered == (72, 72)


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_2_batched_equals_one_sequence_at_a_time(kind, preset, batching, positions, text):
    ensemble = tiny_ensemble(preset, kind=kind)
    ids = token_batch(text, 5, 16, offset=1000)
    # Ragged hard-token counts: sequence 0 none continue, sequence 1 all, the rest mixed.
    exits = torch.rand(5, 16) < 0.5
    exits[0], exits[1] = True, False
    scripted, exits = scripted_exit(ensemble, ids, exits)
    ensemble[0].exit_rule = _resolve(scripted)
    with torch.inference_mode():
        out = forward_cascade(ensemble, ids, thresholds=[0.5], batching=batching, positions=positions)
    assert torch.equal(out.exit_stage, (~exits).long())
    reference = _reference_per_sequence(ensemble, ids, exits, positions)
    scored = out.scored
    assert scored[:, :-1].all() and not scored[:, -1].any()
    torch.testing.assert_close(out.nll[scored], reference[scored].float(), atol=ATOL, rtol=0)
    assert out.tokens_entered == (80, int((~exits).sum()))


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_2_padding_changes_nothing(kind, preset, batching, text):
    """Left- and right-padded ragged sequences give the results of each sequence run alone."""
    ensemble = tiny_ensemble(preset, kind=kind)
    lengths = [9, 16, 4]
    rows = [token_batch(text, 1, n, offset=300 * i)[0] for i, n in enumerate(lengths)]
    with torch.inference_mode():
        probe = forward_cascade(ensemble, token_batch(text, 1, 16), num_stages=1, confidence_at_last_stage=True)
        threshold = float(probe.stage_confidence[0].median())
        alone = [forward_cascade(ensemble, r[None], thresholds=[threshold], batching=batching) for r in rows]
        for side in ("right", "left"):
            ids = torch.zeros(3, 16, dtype=torch.long)
            mask = torch.zeros(3, 16, dtype=torch.long)
            for i, r in enumerate(rows):
                where = slice(0, len(r)) if side == "right" else slice(16 - len(r), 16)
                ids[i, where], mask[i, where] = r, 1
            out = forward_cascade(ensemble, ids, mask, thresholds=[threshold], batching=batching)
            for i, r in enumerate(rows):
                where = slice(0, len(r)) if side == "right" else slice(16 - len(r), 16)
                torch.testing.assert_close(out.nll[i, where], alone[i].nll[0], atol=ATOL, rtol=0)
                assert torch.equal(out.exit_stage[i, where], alone[i].exit_stage[0])
            assert (out.exit_stage[mask == 0] == -1).all() and not out.scored[mask == 0].any()


class _Received:
    """Forward pre-hooks that record what a stage's modules actually received. The exit head is
    counted by wrapping this stage's ``logits`` (blocks may share their lm_head module)."""

    def __init__(self, stage):
        self.stage = stage
        self.layer_inputs, self.embeds, self.head_rows = [], [], 0
        self.handles = [
            stage.register_forward_pre_hook(self._stage, with_kwargs=True),
            stage.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True),
        ]
        head = stage.logits

        def counting_logits(hidden):
            self.head_rows += hidden.reshape(-1, hidden.shape[-1]).shape[0]
            return head(hidden)

        stage.logits = counting_logits

    def _stage(self, module, args, kwargs):
        self.embeds.append(kwargs["inputs_embeds"].detach().clone())

    def _layer(self, module, args, kwargs):
        self.layer_inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def close(self):
        for handle in self.handles:
            handle.remove()
        del self.stage.logits


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("kind", KINDS)
def test_exited_tokens_never_reach_a_later_stage(kind, preset, batching, text):
    ensemble = tiny_ensemble(preset, kind=kind)
    ids = token_batch(text, 4, 12, offset=50)
    exits = torch.rand(4, 12) < 0.6
    exits[2] = True  # one sequence sends nothing on
    scripted, exits = scripted_exit(ensemble, ids, exits)
    ensemble[0].exit_rule = _resolve(scripted)
    received = _Received(ensemble[1])
    try:
        with torch.inference_mode():
            out = forward_cascade(ensemble, ids, thresholds=[0.5], batching=batching)
    finally:
        received.close()
    continuing = int((~exits).sum())
    counts = (~exits).sum(1)
    slots = sum(x.shape[0] * x.shape[1] for x in received.layer_inputs)
    rows = sum(x.shape[0] for x in received.layer_inputs)
    # Stage 1's first layer saw one row per sequence with continuing tokens, no more slots than
    # rows x longest row, and its lm_head ran on exactly the continuing tokens.
    assert rows == int((counts > 0).sum())
    assert continuing <= slots <= rows * int(counts.max())
    if batching == "padded":
        assert slots == rows * int(counts.max())
    assert received.head_rows == continuing
    assert out.slots_computed[1] == slots and out.tokens_entered[1] == continuing
    # The states stage 1 received are exactly stage 0's outputs at the continuing positions, in
    # order per sequence; no exited token's state is among them.
    with torch.inference_mode():
        stage0 = ensemble[0](input_ids=ids).hidden
    got = sorted(
        (
            tuple(row[:n].flatten().tolist())
            for x in received.embeds
            for row in x
            for n in [int((row.abs().sum(-1) > 0).sum())]
        )
    )
    want = sorted(tuple(stage0[b][~exits[b]].flatten().tolist()) for b in range(4) if (~exits[b]).any())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_3_counted_flops_follow_tokens_reaching_a_stage(kind, preset, text):
    """Stage 1's counted FLOPs inside the routed pass equal stage 1 run alone on a (B, m) batch
    plus its lm_head on B*m tokens: they grow with the tokens that reach it, not with B*T."""
    ensemble = tiny_ensemble(preset, kind=kind)
    ids = token_batch(text, 4, 16, offset=700)
    ids[:, 0] = torch.tensor([65, 66, 67, 68])  # distinct first tokens, so no two sequences share a state
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    with torch.inference_mode():
        nobody, _ = count_flops(forward_cascade, ensemble, ids, thresholds=[-INF])
        for keep in (3, 8, 16):
            exits = torch.ones(4, 16, dtype=torch.bool)
            exits[:, :keep] = False  # every sequence sends exactly `keep` tokens on: no padding
            scripted, scripted_exits = scripted_exit(ensemble, ids, exits)
            assert torch.equal(scripted_exits, exits)  # distinct first tokens: no twin states
            ensemble[0].exit_rule = _resolve(scripted)
            both, out = count_flops(forward_cascade, ensemble, ids, thresholds=[0.5])
            ensemble[0].exit_rule = _resolve("max_prob")
            alone, _ = count_flops(ensemble[1], inputs_embeds=torch.zeros(4, keep, d))
            head1 = 2 * 4 * keep * d * vocab
            head0_saved = 2 * 4 * keep * d * vocab  # stage-0 lm_head runs only on exiting tokens (logit-free rule)
            assert both.flops - nobody.flops == alone.flops + head1 - head0_saved
            assert out.tokens_entered[1] == 4 * keep


def _resolve(fn):
    from cascade_bench.stages.exits import resolve_exit_rule

    return resolve_exit_rule(fn)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_buckets_give_the_same_pass_in_fewer_calls(kind, text):
    """Bucketed batching with the default call cost merges the tiny batch's length classes into one
    call: the same per-token results as keeping them apart, fewer stage calls, more padding."""
    shipped_call_overhead = 128  # compaction.CALL_OVERHEAD_SLOTS (tests/conftest.py sets it to 0)
    ensemble = tiny_ensemble("gpt2-tiny", kind=kind)
    ids = token_batch(text, 6, 24, offset=300)
    exits = torch.rand(6, 24) < torch.linspace(0.1, 0.9, 6)[:, None]  # rows of very different lengths
    scripted, exits = scripted_exit(ensemble, ids, exits)
    ensemble[0].exit_rule = _resolve(scripted)
    with torch.inference_mode():
        apart = forward_cascade(ensemble, ids, thresholds=[0.5], batching="bucketed", call_overhead_slots=0)
        merged = forward_cascade(
            ensemble, ids, thresholds=[0.5], batching="bucketed", call_overhead_slots=shipped_call_overhead
        )
        padded = forward_cascade(ensemble, ids, thresholds=[0.5], batching="padded")
    assert len(apart.stage_batch_shapes[1]) > 1 and len(merged.stage_batch_shapes[1]) == 1
    assert merged.stage_batch_shapes == padded.stage_batch_shapes
    assert merged.slots_computed[1] > apart.slots_computed[1]
    torch.testing.assert_close(merged.nll, apart.nll, atol=ATOL, rtol=0)
    assert torch.equal(merged.exit_stage, apart.exit_stage) and torch.equal(merged.correct, apart.correct)


@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_tokens_continuing_past_an_open_end_exit_nowhere_and_the_rest_keep_their_stage_results(exit_rule, text):
    # open_end: the last stage run decides like a middle one; who continues has exit stage S, no NLL,
    # not correct, no logits, whatever the last stage computed for them (a logit rule computes its
    # head on every token reaching the stage).
    from cascade_bench.routing.passes import forward_cascade

    ensemble = tiny_ensemble("gpt2-tiny", exit_rule=exit_rule)
    ids = token_batch(text, 3, 24)
    with torch.inference_mode():
        everyone = forward_cascade(
            ensemble, ids, num_stages=1, thresholds=[-INF], return_logits=True, confidence_at_last_stage=True
        )
        median = float(everyone.stage_confidence[0].nanmedian())
        out = forward_cascade(ensemble, ids, num_stages=1, thresholds=[median], open_end=True, return_logits=True)
    continuing = out.exit_stage == 1
    exited = out.exit_stage == 0
    assert continuing.any() and exited.any() and bool((continuing | exited).all())
    assert out.continuing_index.numel() == int(continuing.sum())
    assert not out.nll[continuing].any() and not out.correct[continuing].any()
    assert not out.logits[continuing].any()
    assert torch.equal(out.nll[exited], everyone.nll[exited]) and torch.equal(out.correct, everyone.correct & exited)
    assert torch.equal(out.logits[exited], everyone.logits[exited])
    assert out.tokens_exited == (int(exited.sum()),)
