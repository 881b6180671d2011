"""Blocks of any decoder in the standard transformers 5 layout (``families.standard_layout_recipe``):
every causal-LM family the installed transformers builds at a tiny size in that layout is cut into
blocks that reproduce the unsplit model's logits, and routed early exit over them equals the
router-free per-sequence reference (invariant 2). A family whose forward departs from the layout is
refused at the cut with a ValueError naming it, never run wrong."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from cascade_bench import Ensemble, calibrate_thresholds, forward_cascade, measure_cost
from cascade_bench.stages.families import LAYER_SLICE_RECIPES, MLP_MATRICES, standard_layout_recipe
from tests.helpers import scripted_exit, token_batch
from tests.routing.test_invariants import _reference_per_sequence

#: The tiny size every family is built at (4 layers; a sliding window shorter than the test windows).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    sliding_window=6,
)
#: A family still larger than this at the tiny size ignores it somewhere: not built.
MAX_PARAMETERS = 5_000_000
#: Families named here must be among those cut: the layout test cannot pass by skipping them all.
MUST_CUT = ("gemma", "gemma3_text", "qwen3", "olmo2", "mixtral", "starcoder2", "phimoe")


def _config(model_type: str):
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in TINY.items() if k != "sliding_window" or hasattr(default, k)}  # the family's own keys
    config = AutoConfig.for_model(model_type, **sizes)
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" in types:  # both kinds of layer, on each side of the cut
        config.layer_types = ["sliding_attention", "full_attention"] * 2
    return config


@functools.lru_cache(maxsize=None)
def layout_families() -> tuple[str, ...]:
    """Every causal-LM family of the installed transformers that builds at ``TINY`` and follows the
    standard layout, but those with an explicit recipe (tested in test_blocks)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type in LAYER_SLICE_RECIPES:
            continue
        try:
            config = _config(model_type)
            if getattr(config, "sub_configs", None):  # multimodal: its vision/audio towers ignore the tiny size
                continue
            with warnings.catch_warnings(), torch.device("meta"):  # the layout and size, nothing allocated
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config)
        except Exception:  # no tiny config of this family
            continue
        small = sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS
        if small and standard_layout_recipe(model) is not None:
            found.append(model_type)
    return tuple(found)


def _model(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(_config(model_type)).eval()


@pytest.mark.parametrize("model_type", layout_families())
def test_a_standard_layout_family_is_cut_right_or_refused_by_name(model_type, text):
    model = _model(model_type)
    try:
        ensemble = Ensemble.from_blocks(model, [2])
    except ValueError as error:  # its forward does something the layout does not: refused, named
        assert repr(model_type) in str(error) and "LAYER_SLICE_RECIPES" in str(error)
        return
    ids = token_batch(text, 3, 16, offset=900)
    with torch.inference_mode():
        blocks = forward_cascade(ensemble, ids, return_logits=True, method="full").logits
        unsplit = model(input_ids=ids).logits
    torch.testing.assert_close(blocks, unsplit, atol=2e-5, rtol=1e-4)
    exits = torch.rand(3, 16) < 0.5
    exits[0] = True
    scripted, exits = scripted_exit(ensemble, ids, exits)
    ensemble[0].exit_rule = scripted
    with torch.inference_mode():
        out = forward_cascade(ensemble, ids, thresholds=[0.5])
    reference = _reference_per_sequence(ensemble, ids, exits)
    assert torch.equal(out.exit_stage, (~exits).long())
    torch.testing.assert_close(out.nll[out.scored], reference[out.scored].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", [f for f in layout_families() if f in MLP_MATRICES])
def test_the_analytic_flops_of_a_layout_family_equal_the_counted_ones(model_type, text):
    """Every family the analytic model knows: counted (FlopCounterMode) == analytic, routed and full."""
    ensemble = Ensemble.from_blocks(_model(model_type), [2])
    batches = [token_batch(text, 2, 16)]
    calibrate_thresholds(ensemble, batches, 0.5)
    for method in ("full", "routed"):
        record = measure_cost(ensemble, batches, method, warmup=0, repeats=1, fvcore=False, spans=False)
        assert record.flops == record.flops_analytic


def test_the_named_families_follow_the_layout_and_are_cut():
    families = layout_families()
    for model_type in MUST_CUT:
        assert model_type in families
        Ensemble.from_blocks(_model(model_type), [2])  # no ValueError: the logit check passed


def test_a_family_whose_forward_departs_from_the_layout_is_refused(monkeypatch):
    """The logit check at the first cut: here an embedding scale the forward applies and the layout
    cannot see (simulated by scaling the unsplit model's output)."""
    from cascade_bench.stages import blocks

    model = _model("qwen3")
    monkeypatch.setattr(blocks, "_LAYOUTS_CHECKED", set())
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: type(original(*a, **k))(logits=original(*a, **k).logits * 2))
    with pytest.raises(ValueError, match=r"cannot cut a 'qwen3' model into blocks: .* logits .* away"):
        Ensemble.from_blocks(model, [2])


def test_the_layout_check_runs_per_config_not_per_family(monkeypatch):
    """A second model of a checked family whose config sends its forward down another path (Granite's
    embedding and logit multipliers) is checked again, and refused, not cut wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cascade_bench.stages import blocks

    monkeypatch.setattr(blocks, "_LAYOUTS_CHECKED", set())
    plain = AutoConfig.for_model("granite", **{k: v for k, v in TINY.items() if k != "sliding_window"})
    plain.embedding_multiplier, plain.logits_scaling = 1.0, 1.0
    Ensemble.from_blocks(AutoModelForCausalLM.from_config(plain).eval(), [2])
    scaled = AutoConfig.for_model("granite", **{k: v for k, v in TINY.items() if k != "sliding_window"})
    scaled.embedding_multiplier, scaled.logits_scaling = 12.0, 8.0
    with pytest.raises(ValueError, match=r"cannot cut a 'granite' model into blocks: .* logits .* away"):
        Ensemble.from_blocks(AutoModelForCausalLM.from_config(scaled).eval(), [2])


def test_a_prepared_mask_longer_than_the_window_is_refused_by_sliding_layers(text):
    """A cache with gaps hands blocks a finished 4-D mask (causality and real slots only): within the
    window it is exact, longer it would let sliding layers see too far, so it is refused."""
    from cascade_bench.stages.presets import build_blocks

    ensemble = build_blocks("gemma3-tiny", (2, 2)).eval()  # window 6, sliding and full layers
    block = ensemble[1]
    hidden = torch.randn(1, 8, block.hidden_size)
    within = torch.zeros(1, 1, 4, 4)
    with torch.inference_mode():
        block(inputs_embeds=hidden[:, :4], attention_mask=within)
        with pytest.raises(ValueError, match=r"sliding-window layers \(window 6\).*prepared"):
            block(inputs_embeds=hidden, attention_mask=torch.zeros(1, 1, 8, 8))


def test_key_values_of_an_attention_with_parts_we_do_not_know_are_refused():
    """Hunyuan normalises its keys with a ``key_layernorm``: propagating its keys as a plain Llama's
    would give wrong keys, so K/V propagation refuses it by name."""
    from cascade_bench.stages.key_values import layer_key_values

    ensemble = Ensemble.from_blocks(_model("hunyuan_v1_dense"), [2])
    layer = ensemble[1].layers[0]
    x = torch.randn(1, 4, ensemble[1].hidden_size)
    with pytest.raises(ValueError, match="'hunyuan_v1_dense' family's key/value projections"):
        layer_key_values(ensemble[1], layer, x, torch.arange(4)[None])
