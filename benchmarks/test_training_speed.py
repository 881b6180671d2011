"""Training and hard-token collection throughput on the embedded corpus (tokens/s in extra_info).

pytest benchmarks/test_training_speed.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.prepare import prepare_data
from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.stages.presets import build_ensemble
from cascade_bench.training.loops import TrainConfig, collect_hard_tokens, train_llm

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    data = prepare_data(
        "embedded", tokenizer="bpe:4096", seq_len=128, batch_size=16, cache_dir=tmp_path_factory.mktemp("tok")
    )
    ensemble = build_ensemble("gpt2-cpu", (2, 2), vocab_size=len(data.tokenizer)).eval()
    return data, ensemble


@pytest.mark.benchmark(group="training")
def test_stage0_training_throughput(benchmark, setup):
    data, ensemble = setup
    config = TrainConfig(lr=1e-3, max_epochs=1, max_steps_per_epoch=STEPS)
    history = benchmark.pedantic(
        lambda: train_llm(ensemble[0], data.train, lambda: 1.0, config, progress=False), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        tokens_per_s=history.tokens_per_s,
        tokens=history.train_tokens,
        steps=history.steps,
        batch=list(data.train[0]["input_ids"].shape),
        threads=torch.get_num_threads(),
    )
    assert history.steps == STEPS and history.train_tokens == STEPS * 16 * 128


@pytest.mark.benchmark(group="training")
def test_hard_token_collection_throughput(benchmark, setup):
    data, ensemble = setup
    calibrate_thresholds(ensemble, data.validation, 0.5)
    batches = data.train[:STEPS]
    hard = benchmark.pedantic(lambda: collect_hard_tokens(ensemble, 1, batches), rounds=1, iterations=1)
    benchmark.extra_info.update(
        tokens_per_s=hard.tokens_per_s,
        source_tokens=hard.source_tokens,
        hard_tokens=hard.num_tokens,
        threads=torch.get_num_threads(),
    )
    assert hard.source_tokens == STEPS * 16 * 128 and 0 < hard.num_tokens < hard.source_tokens
