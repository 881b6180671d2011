"""Blocks of one pretrained model as cascade stages (early exit inside a single causal LM).

The routing invariants (1-4) for block stages run in test_invariants.py and test_generation.py
(parametrized over ``KINDS``); this file checks what is specific to blocks: equality with the
unsplit model, shared weights, which decoder layers ran, loading from a saved folder, training.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cascade_bench import Ensemble
from cascade_bench.measure.analytic import routed_cost
from cascade_bench.measure.flops import count_flops
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.blocks import Block
from cascade_bench.stages.presets import stage_config
from cascade_bench.training.loops import TrainConfig
from cascade_bench.training.protocols import Protocol, exit_heads_ppl, train_ensemble, train_exit_heads
from tests.helpers import INF, ROUTED_FAMILIES, token_batch

ATOL = 1e-5


def _model(preset: str, layers: int = 6):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(stage_config(preset, num_hidden_layers=layers)).eval()


def _ragged(text):
    ids = token_batch(text, 3, 20, offset=400)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    mask[2, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("boundaries", [[2, 4], [1], [5], []])
def test_blocks_that_never_exit_reproduce_the_unsplit_model(preset, boundaries, text):
    model = _model(preset)
    ensemble = Ensemble.from_blocks(model, boundaries)
    ids, mask = _ragged(text)
    real = mask.bool()
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).logits
        for method in ("routed", "full", "masked"):
            out = forward_cascade(
                ensemble, ids, mask, method=method, return_logits=True, thresholds=[INF] * len(ensemble)
            )
            torch.testing.assert_close(out.logits[real], reference[real], atol=ATOL, rtol=0)
            assert (out.exit_stage[real] == len(boundaries)).all()


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
def test_thresholds_minus_inf_reproduce_the_first_block_and_its_head(preset, text):
    """Reference from the unsplit model's own outputs: hidden_states[b] is the residual stream
    after layer b; the first block's exit is final norm + lm_head of it."""
    model = _model(preset)
    for boundary in (1, 3):
        ensemble = Ensemble.from_blocks(model, [boundary])
        ids, mask = _ragged(text)
        real = mask.bool()
        with torch.inference_mode():
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            norm = ensemble[0].head.norm
            reference = model.get_output_embeddings()(norm(states[boundary]))
            out = forward_cascade(ensemble, ids, mask, thresholds=[-INF], return_logits=True)
        torch.testing.assert_close(out.logits[real], reference[real], atol=ATOL, rtol=0)
        assert (out.exit_stage[real] == 0).all() and out.tokens_entered[1] == 0


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
def test_blocks_share_the_models_weights(preset):
    model = _model(preset)
    ensemble = Ensemble.from_blocks(model, [2, 4])
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    for block in ensemble:
        assert all(p.data_ptr() in model_ptrs for p in block.parameters())
    layers = model.base_model.layers if preset != "gpt2-tiny" else model.base_model.h
    for block, (start, end) in zip(ensemble, [(0, 2), (2, 4), (4, 6)]):
        for mine, theirs in zip(block.layers, layers[start:end]):
            assert mine is theirs
            assert all(a.data_ptr() == b.data_ptr() for a, b in zip(mine.parameters(), theirs.parameters()))
        assert block.lm_head.weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    # Together the blocks hold the model's parameters once each, and nothing else.
    assert sum(p.numel() for p in ensemble.parameters()) == sum(p.numel() for p in model.parameters())
    own = Ensemble.from_blocks(model, [2, 4], heads="own")
    assert own[0].lm_head.weight.data_ptr() not in model_ptrs
    assert own[2].lm_head.weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    torch.testing.assert_close(own[0].lm_head.weight, model.get_output_embeddings().weight)


class _LayerRows:
    """Counts the token slots every decoder layer of the model ran on."""

    def __init__(self, layers):
        self.slots = [0] * len(layers)
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.slots[index] += hidden.shape[0] * hidden.shape[1]

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
def test_exited_tokens_never_run_later_layers(preset, text):
    model = _model(preset)
    ensemble = Ensemble.from_blocks(model, [2, 4])
    ids = token_batch(text, 4, 16, offset=900)
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, thresholds=[INF, INF], confidence_at_last_stage=True)
        # Thresholds at the medians: about half exit after block 0, half of the rest after block 1.
        thresholds = [float(probe.stage_confidence[k].nanmedian()) for k in range(2)]
        layers = model.base_model.layers if preset != "gpt2-tiny" else model.base_model.h
        rows = _LayerRows(layers)
        try:
            out = forward_cascade(ensemble, ids, thresholds=thresholds, batching="padded")
        finally:
            rows.close()
    entered = out.tokens_entered
    assert entered[0] == 64 and 0 < entered[2] < entered[1] < 64
    for k, (start, end) in enumerate([(0, 2), (2, 4), (4, 6)]):
        for layer in range(start, end):
            assert rows.slots[layer] == out.slots_computed[k]  # the dense slots of block k, padding included
    reaching_2 = out.exit_stage >= 2
    longest = int(reaching_2.sum(dim=1).max())
    assert rows.slots[4] == int((reaching_2.sum(dim=1) > 0).sum()) * longest  # no exited token in layers 4, 5


def test_counted_flops_of_blocks_equal_the_analytic_model(text):
    model = _model("gpt2-tiny")
    ensemble = Ensemble.from_blocks(model, [2, 4])
    ids = token_batch(text, 4, 16, offset=60)
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, thresholds=[INF, INF], confidence_at_last_stage=True)
        thresholds = [float(probe.stage_confidence[k].nanmedian()) for k in range(2)]
        counter, out = count_flops(forward_cascade, ensemble, ids, thresholds=thresholds)
    analytic = sum(c.total for c in routed_cost([b.config for b in ensemble], out.stage_batch_shapes, out.head_tokens))
    assert counter.flops == analytic
    assert [b.config.num_hidden_layers for b in ensemble] == [2, 2, 2]


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
def test_translator_heads_start_as_the_shared_head_and_are_counted(preset, text):
    """A translator starts as the identity (the block exits as with the shared head), reads the
    model's own norm and lm_head (shared, not copied), and its d x d matmul is in the analytic count."""
    model = _model(preset, layers=4)
    shared = Ensemble.from_blocks(model, [2])
    translated = Ensemble.from_blocks(model, [2], heads="translator")
    head = translated[0].head
    assert head.lm_head is model.get_output_embeddings() and head.translator is not None
    ids = token_batch(text, 2, 16, offset=90)
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(translated[0].logits(hidden), shared[0].logits(hidden), atol=0, rtol=0)
        probe = forward_cascade(translated, ids, thresholds=[INF], confidence_at_last_stage=True)
        threshold = float(probe.stage_confidence[0].nanmedian())
        counter, out = count_flops(forward_cascade, translated, ids, thresholds=[threshold])
        a = forward_cascade(shared, ids, thresholds=[threshold])
    assert torch.equal(out.exit_stage, a.exit_stage)
    d = model.config.hidden_size
    assert translated[0].head_macs_per_token == d * model.config.vocab_size + d * d
    analytic = sum(
        c.total
        for c in routed_cost(
            [b.config for b in translated],
            out.stage_batch_shapes,
            out.head_tokens,
            head_macs=[b.head_macs_per_token for b in translated],
        )
    )
    assert counter.flops == analytic


def test_a_saved_and_reloaded_checkpoint_folder_cuts_into_blocks(tmp_path, text):
    model = _model("llama-tiny", layers=4)
    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    ensemble = Ensemble.from_blocks(reloaded, [2], exit_rule="cos_sim")
    ids, mask = _ragged(text)
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).logits
        out = forward_cascade(ensemble, ids, mask, thresholds=[INF], return_logits=True)
    torch.testing.assert_close(out.logits[mask.bool()], reference[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
@pytest.mark.parametrize("heads", ["shared", "own", "translator"])
def test_block_ensembles_save_as_one_checkpoint_and_load_back(preset, heads, tmp_path, text):
    """A cut model saves as ONE Hugging Face checkpoint (plus own exit heads) that any HF tool loads
    as the unsplit model, and loads back to the same routed results."""
    from cascade_bench.training.persistence import load_ensemble, save_ensemble

    model = _model(preset, layers=4)
    ensemble = Ensemble.from_blocks(model, [1, 3], exit_rule="cos_sim", heads=heads)
    ensemble[1].exit_rule = __import__("cascade_bench").resolve_exit_rule("max_prob")
    if heads == "own":
        with torch.no_grad():
            ensemble[0].head.lm_head.weight.mul_(1.5)  # an exit head that differs from the model's
    if heads == "translator":
        with torch.no_grad():
            for block in ensemble[:2]:
                block.head.translator.linear.weight.normal_(0, 0.2)  # a translator that is not the identity
    ids, mask = _ragged(text)
    with torch.inference_mode():
        conf = forward_cascade(ensemble, ids, mask, thresholds=[INF, INF], confidence_at_last_stage=True)
    finite = lambda t: t[torch.isfinite(t)]  # noqa: E731
    ensemble.set_thresholds(
        [float(finite(conf.stage_confidence[0]).median()), float(finite(conf.stage_confidence[1]).median())]
    )
    save_ensemble(ensemble, tmp_path / "saved")
    assert ((tmp_path / "saved" / "heads").is_dir()) == (heads != "shared")
    if heads == "translator":  # the translator alone is saved: the norm and lm_head are the model's
        from safetensors.torch import load_file

        assert sorted(load_file(str(tmp_path / "saved" / "heads" / "stage0.safetensors"))) == [
            "linear.bias",
            "linear.weight",
        ]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved" / "model").eval()
    loaded = load_ensemble(tmp_path / "saved")
    assert [type(b) for b in loaded] == [Block] * 3 and loaded.thresholds == ensemble.thresholds
    assert [b.exit_rule.name for b in loaded] == ["cos_sim", "max_prob", "cos_sim"]
    with torch.inference_mode():
        torch.testing.assert_close(
            plain(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            atol=ATOL,
            rtol=0,
        )
        a = forward_cascade(ensemble, ids, mask)
        b = forward_cascade(loaded, ids, mask)
    assert 0 < a.tokens_entered[1] < a.tokens_entered[0]
    assert torch.equal(a.exit_stage, b.exit_stage)
    torch.testing.assert_close(a.nll, b.nll, atol=ATOL, rtol=0)


def test_bad_boundaries_and_unsupported_families_are_named():
    model = _model("gpt2-tiny")
    with pytest.raises(ValueError, match=r"strictly increasing.*\(0, 6\).*\[4, 2\]"):
        Ensemble.from_blocks(model, [4, 2])
    with pytest.raises(ValueError, match=r"\(0, 6\).*\[6\]"):
        Ensemble.from_blocks(model, [6])
    with pytest.raises(TypeError, match="ints"):
        Ensemble.from_blocks(model, [2.0])
    with pytest.raises(ValueError, match="heads must be one of"):
        Ensemble.from_blocks(model, [2], heads="copied")
    with pytest.raises(ValueError, match="expected 2 thresholds for 3 blocks"):
        Ensemble.from_blocks(model, [2, 4], thresholds=[0.5])
    from transformers import OPTConfig

    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            num_hidden_layers=2,
            hidden_size=16,
            ffn_dim=32,
            num_attention_heads=2,
            vocab_size=64,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(ValueError, match="'opt'.*LAYER_SLICE_RECIPES"):
        Ensemble.from_blocks(opt, [1])
    ensemble = Ensemble.from_blocks(model, [2])
    with pytest.raises(ValueError, match="reads the residual stream"):
        ensemble[1](input_ids=torch.zeros(1, 3, dtype=torch.long))


def _train_batches(text, count, offset=0):
    batches = []
    for i in range(count):
        ids = token_batch(text, 4, 32, offset=offset + 4 * 32 * i)
        targets = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
        batches.append({"input_ids": ids, "targets": targets})
    return batches


def test_exit_heads_train_with_the_trunk_frozen(text):
    model = _model("gpt2-tiny", layers=4)
    ensemble = Ensemble.from_blocks(model, [1, 2], heads="own")
    trunk_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    heads_before = [p.detach().clone() for p in ensemble[0].head.parameters()]
    train, validation = _train_batches(text, 6), _train_batches(text, 2, offset=20000)
    ppl_before = exit_heads_ppl(ensemble, validation)
    history = train_exit_heads(
        ensemble, train, validation, TrainConfig(lr=1e-2, max_epochs=2, patience=1), progress=False
    )
    ppl_after = exit_heads_ppl(ensemble, validation)
    for name, p in model.named_parameters():
        assert torch.equal(p, trunk_before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, ensemble[0].head.parameters()))
    assert all(after < before for after, before in zip(ppl_after, ppl_before))
    assert history.steps > 0 and all(not m.training for m in model.modules())
    with pytest.raises(ValueError, match="heads='own'"):
        train_exit_heads(Ensemble.from_blocks(model, [2]), train, validation, progress=False)


def test_lego_extension_of_a_block_trains_new_layers_on_hard_tokens(text):
    """The LEGO/ASHEM way on blocks: the model's first block trains on all data, then new layers
    (``extend``) train on the tokens that do not exit after it, the first block frozen."""
    ensemble = Ensemble.from_blocks(_model("gpt2-tiny", layers=2), [])
    first_before = [p.detach().clone() for p in ensemble[0].parameters()]
    train, validation = _train_batches(text, 4), _train_batches(text, 2, offset=20000)
    protocol = Protocol("lego-blocks", layers=(2, 2), lrs=(1e-3, 1e-3), patience=(1, 1), hard_ratio=0.5, max_epochs=1)
    report = train_ensemble(ensemble, train, validation, protocol, progress=False)
    new = ensemble[1]
    assert isinstance(new, Block) and not new.reads_tokens and new.num_layers == 2
    assert new.lm_head.weight.data_ptr() != ensemble[0].lm_head.weight.data_ptr()
    assert report.stages[1].hard_tokens > 0
    assert any(not torch.equal(a, b) for a, b in zip(first_before, ensemble[0].parameters()))
    assert all(not p.requires_grad for p in ensemble[0].parameters())
    assert math.isfinite(ensemble.thresholds[0])
    with torch.inference_mode():
        out = forward_cascade(ensemble, train[0]["input_ids"])
    assert 0 < out.tokens_entered[1] < out.tokens_entered[0]


def test_per_layer_type_lists_follow_the_layers_into_blocks_and_grown_stages():
    """A block's config lists its own layers' types; a block grown after it continues the model's list
    (memory family ``layer_kinds``), and Hugging Face's ``layer_types`` keeps exactly the block's entries."""
    from cascade_bench.stages.families import config_for_layers, layer_kinds
    from cascade_bench.stages.presets import build_blocks, stage_config

    ensemble = build_blocks("memory-tiny", (1, 2))
    assert [layer_kinds(block.config) for block in ensemble] == [("infini",), ("multi_memory", "hierarchical")]
    ensemble.extend(2)
    assert layer_kinds(ensemble[-1].config) == ("pythia", "infini")
    assert [type(layer).__name__ for layer in ensemble[-1].layers] == ["PythiaLayer", "InfiniLayer"]
    llama = stage_config("llama-tiny", num_hidden_layers=4)
    llama.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert config_for_layers(llama, 1, 2).layer_types == ["sliding_attention", "full_attention"]
    assert layer_kinds(llama) == ("attention",) * 4
    with pytest.raises(ValueError, match="too few for layers \\[4, 7\\)"):
        config_for_layers(stage_config("memory-tiny"), 4, 3)
