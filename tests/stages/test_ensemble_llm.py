"""Building cascades: LLM wrapping, add_stage, extend, loading from a local folder."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cascade_bench import LLM, Ensemble, forward_cascade
from cascade_bench.stages.presets import build_ensemble, stage_config
from tests.helpers import FAMILIES, tiny_ensemble, token_batch


@pytest.mark.parametrize("preset", FAMILIES)
def test_llm_forward_matches_the_hf_model(preset, text):
    model = AutoModelForCausalLM.from_config(stage_config(preset)).eval()
    stage = LLM(model)
    ids = token_batch(text, 2, 12)
    with torch.inference_mode():
        reference = model(input_ids=ids, output_hidden_states=True)
        chosen = torch.zeros(2, 12, dtype=torch.bool)
        chosen[:, [3, 7]] = True
        out = stage(input_ids=ids, capture_input_state=True, logits_at=chosen)
    torch.testing.assert_close(out.hidden, reference.hidden_states[-1])
    torch.testing.assert_close(out.input_state, reference.hidden_states[-2])  # input of the last layer
    torch.testing.assert_close(out.logits, reference.logits[:, [3, 7]].reshape(4, -1))
    with pytest.raises(ValueError, match="logits_at must be a bool mask of shape"):
        stage(input_ids=ids, logits_at=chosen[:, :5])
    assert stage.model is model  # composition, not a copy
    assert (stage.num_layers, stage.hidden_size, stage.vocab_size) == (2, 32, 256)


def test_add_stage_wraps_raw_models_and_overrides():
    ensemble = Ensemble()
    first = ensemble.add_stage(
        AutoModelForCausalLM.from_config(stage_config("gpt2-tiny")), exit_rule="margin", threshold=0.3
    )
    assert isinstance(first, LLM) and first.exit_rule.name == "margin" and first.threshold == 0.3
    second = ensemble.add_stage(LLM.from_config(stage_config("gpt2-tiny")), exit_rule="cos_sim")
    assert second.exit_rule.name == "cos_sim" and math.isinf(second.threshold)
    assert len(ensemble) == 2 and ensemble.layers_per_stage == (2, 2)


def test_extend_builds_a_new_block_from_the_last_config(text):
    ensemble = build_ensemble("llama-tiny", (2,), exit_rule="neg_entropy")
    new = ensemble.extend(3)
    assert ensemble.layers_per_stage == (2, 3)
    assert new.config.model_type == "llama" and new.hidden_size == ensemble[0].hidden_size
    assert new.exit_rule.name == "neg_entropy"
    assert new.config is not ensemble[0].config and ensemble[0].num_layers == 2
    with torch.inference_mode():
        out = forward_cascade(ensemble.eval(), token_batch(text, 2, 8), thresholds=[math.inf])
    assert out.tokens_entered == (16, 16)
    with pytest.raises(ValueError, match="num_new_layers must be a positive int"):
        ensemble.extend(0)
    with pytest.raises(ValueError, match="at least one stage"):
        Ensemble().extend(2)


def test_stage_loaded_from_a_local_folder_routes_like_the_original(tmp_path, text):
    ensemble = tiny_ensemble("gpt_neox-tiny")
    for k, stage in enumerate(ensemble):
        stage.model.save_pretrained(tmp_path / f"stage{k}")
    loaded = Ensemble([LLM.from_pretrained(tmp_path / f"stage{k}") for k in range(2)])
    ids = token_batch(text, 2, 16)
    with torch.inference_mode():
        a = forward_cascade(ensemble, ids, thresholds=[0.01])
        b = forward_cascade(loaded, ids, thresholds=[0.01])
    assert torch.equal(a.exit_stage, b.exit_stage)
    torch.testing.assert_close(a.nll, b.nll)


def test_llm_rejects_what_is_not_a_causal_lm():
    with pytest.raises(TypeError, match="wraps a Hugging Face causal LM"):
        LLM(torch.nn.Linear(2, 2))
    model = AutoModelForCausalLM.from_config(stage_config("gpt2-tiny"))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        LLM(model)()


def test_unsupported_family_names_what_is_missing():
    from cascade_bench.stages.families import family_parts

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.trunk = torch.nn.Linear(2, 2)

        @property
        def base_model(self):
            return self.trunk

    with pytest.raises(ValueError, match=r"unsupported model family 'odd'.*decoder layers and final norm"):
        family_parts(Odd())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routing_on_cuda_matches_cpu(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 4, 32)
    with torch.inference_mode():
        cpu = forward_cascade(ensemble, ids, thresholds=[0.01], batching="bucketed")
        ensemble.cuda()
        gpu = forward_cascade(ensemble, ids.cuda(), thresholds=[0.01], batching="bucketed")
        full = forward_cascade(ensemble, ids.cuda(), method="full")
    assert full.nll.is_cuda
    assert torch.equal(cpu.exit_stage, gpu.exit_stage.cpu())
    torch.testing.assert_close(cpu.nll, gpu.nll.cpu(), atol=1e-4, rtol=1e-4)
