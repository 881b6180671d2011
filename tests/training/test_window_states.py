"""The teacher's pass over windows, by hand: windows are disjoint with next-token targets, the kept
states are the model's hidden states, the top-1 is the model's argmax, the NLL its cross-entropy, and
the flattened view is what ``collect_layer_states`` keeps."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.measure.layer_exits import collect_layer_states
from cascade_bench.training.window_states import collect_window_states, token_windows
from tests.helpers import tiny_ensemble


def test_token_windows_are_disjoint_with_the_next_token_as_target():
    stream = torch.arange(100)
    batches = token_windows(stream, 10, 45, 3)
    assert [b["input_ids"].shape for b in batches] == [(3, 10), (1, 10)]  # 45 tokens: 4 whole windows
    ids = torch.cat([b["input_ids"] for b in batches])
    targets = torch.cat([b["targets"] for b in batches])
    assert torch.equal(ids.flatten(), torch.arange(40)) and torch.equal(targets, ids + 1)
    with pytest.raises(ValueError, match="fewer than one window of 11"):
        token_windows(torch.arange(10), 10, 100, 1)
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        token_windows(stream, 0, 10, 1)


def test_window_states_are_the_model_s_own(text):
    model = tiny_ensemble("llama-tiny", layers=(3,))[0].model.eval()
    stream = torch.tensor(list(text.encode("utf-8")[:2000]), dtype=torch.long)
    batches = token_windows(stream, 12, 96, 4)
    batches[1]["targets"][:, :5] = -100  # some positions not scored
    states = collect_window_states(model, batches, (1, 2), top_k=5)
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(states.states[:, :, 0], out.hidden_states[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(states.states[:, :, 1], out.hidden_states[2], atol=1e-5, rtol=0)
    log_probs = out.logits.float().log_softmax(-1)
    assert torch.equal(states.final_argmax, out.logits.argmax(-1))
    torch.testing.assert_close(states.top_logprobs, log_probs.topk(5, dim=-1).values, atol=1e-5, rtol=0)
    targets = torch.cat([b["targets"] for b in batches])
    assert torch.equal(states.scored, targets != -100) and states.tokens == 96 - 4 * 5
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(states.final_nll[states.scored], nll[states.scored].double(), atol=1e-5, rtol=0)
    assert float(states.final_nll[~states.scored].abs().sum()) == 0.0
    flat = states.as_layer_states()
    reference = collect_layer_states(model, batches, (1, 2), keep_final=True)
    torch.testing.assert_close(flat.states, reference.states, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.final_states, reference.final_states, atol=1e-5, rtol=0)
    assert torch.equal(flat.final_argmax, reference.final_argmax)
    assert states.final_ppl == pytest.approx(reference.final_ppl, rel=1e-5)
    picked = states.rows(torch.tensor([1]))
    assert picked.windows == 1 and torch.equal(picked.input_ids[0], ids[1])
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        collect_window_states(model, batches, (1,), top_k=0)
