"""Property-based tests (hypothesis): the routing and decoding invariants over random batch sizes,
lengths, left/right padding, thresholds, draft lengths, ``max_new_tokens`` up to the position
limit, K/V policies, families and kinds of stage. Every bug the review found was such an edge
case; the example tests pin hand-derived cases, these sweep the space around them.

Cascades are built once per (family, kind) and reused; each property runs a bounded number of
examples with no deadline (CPU timing varies), derandomised so CI runs the same cases each time.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cascade_bench import forward_cascade, generate  # noqa: E402
from cascade_bench.routing.speculative import self_speculative_generate  # noqa: E402
from tests.helpers import FAMILIES, KINDS, ROUTED_FAMILIES, tiny_ensemble  # noqa: E402

ATOL = 1e-4
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None)
MAX_POSITIONS = 128  # every tiny preset


@functools.lru_cache(maxsize=None)
def cascade(preset: str, kind: str, stages: int = 2):
    return tiny_ensemble(preset, layers=(1,) * stages, kind=kind)


@st.composite
def ragged_batch(draw, max_rows: int = 4, max_len: int = 20):
    """(ids (B, T), mask (B, T)) of 1..max_rows rows of 1..max_len real tokens, padded left or right."""
    rows = draw(st.integers(1, max_rows))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=rows, max_size=rows))
    side = draw(st.sampled_from(["left", "right"]))
    width = max(lengths)
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(0, 256, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    return ids * mask, mask


def _threshold(ensemble, ids, mask, quantile: float) -> float:
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, mask, num_stages=1, confidence_at_last_stage=True)
    confidence = probe.stage_confidence[0]
    values = confidence[~torch.isnan(confidence)].sort().values
    # between two neighbouring confidences (no token on the threshold), or below/above all of them
    index = int(quantile * values.numel())
    if index == 0:
        return -math.inf
    if index >= values.numel():
        return math.inf
    return float((values[index - 1] + values[index]) / 2)


@PROPERTY
@given(
    preset=st.sampled_from(ROUTED_FAMILIES),
    kind=st.sampled_from(KINDS),
    batch=ragged_batch(),
    batching=st.sampled_from(["padded", "bucketed"]),
    quantile=st.floats(0.0, 1.0),
)
def test_batched_routing_equals_one_row_at_a_time(preset, kind, batch, batching, quantile):
    """Invariant 2: padding and packing change nothing; each row routed alone gives the same NLL
    and exits as the batch."""
    ensemble = cascade(preset, kind)
    ids, mask = batch
    threshold = _threshold(ensemble, ids, mask, quantile)
    with torch.inference_mode():
        together = forward_cascade(ensemble, ids, mask, thresholds=[threshold], batching=batching)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = forward_cascade(ensemble, ids[row : row + 1, real], thresholds=[threshold], batching=batching)
            assert torch.equal(together.exit_stage[row, real], alone.exit_stage[0])
            scored = together.scored[row, real]
            torch.testing.assert_close(together.nll[row, real][scored], alone.nll[0][scored], atol=ATOL, rtol=0)


@PROPERTY
@given(preset=st.sampled_from(ROUTED_FAMILIES), kind=st.sampled_from(KINDS), batch=ragged_batch())
def test_extreme_thresholds_are_the_prefix_and_the_full_cascade(preset, kind, batch):
    """Invariant 1 on ragged batches."""
    ensemble = cascade(preset, kind)
    ids, mask = batch
    real = mask.bool()
    with torch.inference_mode():
        stage0 = forward_cascade(ensemble, ids, mask, num_stages=1, method="full")
        full = forward_cascade(ensemble, ids, mask, method="full")
        nobody = forward_cascade(ensemble, ids, mask, thresholds=[-math.inf])
        everyone = forward_cascade(ensemble, ids, mask, thresholds=[math.inf])
    scored = stage0.scored & real
    torch.testing.assert_close(nobody.nll[scored], stage0.nll[scored], atol=ATOL, rtol=0)
    torch.testing.assert_close(everyone.nll[scored], full.nll[scored], atol=ATOL, rtol=0)
    assert nobody.tokens_entered[1] == 0 and everyone.tokens_entered[1] == int(real.sum())


@PROPERTY
@given(preset=st.sampled_from(FAMILIES), kind=st.sampled_from(KINDS), data=st.data())
def test_self_speculative_is_full_depth_greedy_up_to_the_position_limit(preset, kind, data):
    """Lossless at any batch size, draft length and number of new tokens, including prompts that
    end just before the position table does."""
    ensemble = cascade(preset, kind, stages=3)
    rows = data.draw(st.integers(1, 3))
    new_tokens = data.draw(st.integers(1, 8))
    longest = data.draw(st.integers(1, MAX_POSITIONS - new_tokens))
    lengths = data.draw(st.lists(st.integers(1, longest), min_size=rows - 1, max_size=rows - 1)) + [longest]
    draft_length = data.draw(st.integers(1, 6))
    draft_stages = data.draw(st.integers(1, 2))
    seed = data.draw(st.integers(0, 2**16))
    ids = torch.randint(0, 256, (rows, longest), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1  # left padding: every prompt ends at the last column
    full = generate(ensemble, ids, mask, max_new_tokens=new_tokens, method="full")
    out = self_speculative_generate(
        ensemble, ids, mask, max_new_tokens=new_tokens, draft_length=draft_length, draft_stages=draft_stages
    )
    assert torch.equal(out.tokens, full.tokens)
    assert out.drafted <= out.rounds * min(draft_length, max(new_tokens - 1, 0))  # a round drafts what is left


@PROPERTY
@given(
    preset=st.sampled_from(FAMILIES),
    kind=st.sampled_from(KINDS),
    kv_policy=st.sampled_from(["absent", "propagate", "recompute"]),
    data=st.data(),
)
def test_generation_matches_teacher_forcing_under_every_kv_policy(preset, kind, kv_policy, data):
    """Invariant 4: the NLL and exits of early-exit generation equal routed teacher forcing of the
    prompt plus what was generated, under the same K/V policy."""
    ensemble = cascade(preset, kind)
    rows = data.draw(st.integers(1, 3))
    lengths = data.draw(st.lists(st.integers(2, 12), min_size=rows, max_size=rows))
    new_tokens = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**16))
    width = max(lengths)
    ids = torch.randint(0, 256, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    threshold = _threshold(ensemble, ids, mask, data.draw(st.floats(0.2, 0.8)))
    out = generate(ensemble, ids, mask, max_new_tokens=new_tokens, thresholds=[threshold], kv_policy=kv_policy)
    sequences = [torch.cat([ids[i][mask[i].bool()], out.tokens[i]]) for i in range(rows)]
    longest = max(s.numel() for s in sequences)
    fed = torch.zeros(rows, longest, dtype=torch.long)
    fed_mask = torch.zeros_like(fed)
    for i, s in enumerate(sequences):
        fed[i, : s.numel()], fed_mask[i, : s.numel()] = s, 1
    with torch.inference_mode():
        forced = forward_cascade(ensemble, fed, fed_mask, thresholds=[threshold], kv_policy=kv_policy)
    for i, n in enumerate(lengths):
        span = slice(n - 1, n - 1 + new_tokens)
        assert torch.equal(forced.exit_stage[i, span], out.exit_stage[i])
        torch.testing.assert_close(forced.nll[i, span], out.nll[i], atol=ATOL, rtol=0)
