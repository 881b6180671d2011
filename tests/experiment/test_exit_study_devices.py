"""The exit study keeps every tensor on the model's device: run here under ``HostTensorMixups``, which
fails on the first op that would mix a host-made tensor with the model's on a GPU (``torch.eye``
without ``device=`` added to a device Gram matrix, CPU depth tables indexed by device argmaxes did)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cascade_bench.experiment.config import make_config
from cascade_bench.experiment.exit_study import run_exit_study
from cascade_bench.stages.presets import stage_config
from tests.helpers import HostTensorMixups, token_batch


def _batches(text: str, offset: int) -> list[dict]:
    """Two sliding-window batches as the data loader makes them (host tensors), half of each unscored."""
    batches = []
    for k in range(2):
        ids = token_batch(text, 2, 24, offset=offset + 400 * k)
        targets = ids.roll(-1, dims=1)
        targets[:, :12] = -100
        targets[:, -1] = -100
        batches.append({"input_ids": HostTensorMixups.mark(ids), "targets": HostTensorMixups.mark(targets)})
    return batches


@pytest.mark.parametrize("fit", ["lstsq", "lstsq+kl"])
def test_the_exit_study_mixes_no_host_tensor_with_the_model_s(text, tmp_path, fit):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(stage_config("llama-tiny", num_hidden_layers=4)).eval()
    config = make_config(
        {
            "model": "tiny",
            "tokenizer": "model",
            "boundaries": [2],
            "exit_layers": [1, 2, 3],
            "translator_fit": fit,
            "max_epochs": 1,
        }
    )
    with HostTensorMixups():
        study = run_exit_study(
            config, model, _batches(text, 0), _batches(text, 2000), _batches(text, 4000), tmp_path, progress=False
        )
    assert [row["layer"] for row in study.summary["candidate_rows"]] == [1, 2, 3]
    assert 1 <= study.summary["layers_needed"]["shared"]["first_agreement"] <= 4


def test_the_check_itself_catches_a_host_tensor_meeting_the_model_s():
    weight = torch.nn.Linear(3, 3).weight
    with HostTensorMixups(), pytest.raises(RuntimeError, match="device mix-up in add"):
        weight.detach() @ weight.detach() + torch.eye(3)
