"""Every kind of stage implements the one Stage protocol, and the members both kinds compute alike
live in one place (StageBase), not in each."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages import Block, Ensemble, Stage
from cascade_bench.stages.llm import LLM
from cascade_bench.stages.stage import StageBase
from tests.helpers import KINDS, tiny_ensemble

SHARED = ("hidden_size", "vocab_size", "max_positions", "device", "dtype")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "gpt_neox-tiny", "memory-tiny"])
def test_every_stage_is_a_stage_with_its_presets_sizes(preset, kind):
    cascade = tiny_ensemble(preset, kind=kind)
    for stage in cascade:
        assert isinstance(stage, Stage) and isinstance(stage, LLM if kind == "llm" else Block)
        # the tiny presets: hidden 32, vocab 256, 128 positions, float32 on the CPU, 2 layers per stage
        assert (stage.hidden_size, stage.vocab_size, stage.max_positions) == (32, 256, 128)
        assert (stage.device, stage.dtype, stage.num_layers, len(stage.layers)) == (
            torch.device("cpu"),
            torch.float32,
            2,
            2,
        )


def test_the_shared_members_are_defined_once():
    for member in SHARED:
        assert member in StageBase.__dict__
        assert member not in LLM.__dict__ and member not in Block.__dict__, f"{member} is redefined"


def test_a_stage_follows_its_exit_head_to_another_dtype():
    stage = tiny_ensemble("gpt2-tiny")[0].to(torch.float64)
    assert stage.dtype == torch.float64 and stage.lm_head.weight.dtype == torch.float64


def test_an_object_without_the_members_is_not_a_stage():
    assert not isinstance(torch.nn.Linear(2, 2), Stage)


def test_add_stage_is_the_one_name_for_appending_a_stage():
    assert not hasattr(Ensemble, "add_llm")
