"""``cascade-bench run`` on blocks of a pretrained model under two gloo ranks, then resumed with every
point stored: rank 0 saves the cascade at the anchor's thresholds, which on a resumed run are not
cached yet, so they are calibrated on every rank before rank 0 alone saves (a collective inside
rank-0-only code hung here before)."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("gguf")

from cascade_bench.stages.model_source import convert_gguf  # noqa: E402
from tests.stages.test_model_source import write_tiny_llama_gguf  # noqa: E402

#: A resumed run on the tiny model takes seconds; a hang waits for this long before the test fails.
DEADLINE_S = 300


def _config(model: str, out: str) -> dict:
    return {
        "name": "two-ranks",
        "model": model,
        "tokenizer": "model",
        "seq_len": 32,
        "eval_stride": 16,
        "batch_size": 2,
        "eval_batches": 2,
        "boundaries": [2],
        "exit_rules": ["max_prob"],
        "hard_ratios": [0.5],
        "kv_policies": [],
        "risk": "",
        "risk_batches": 0,
        "timing_repeats": 1,
        "timing_batches": 2,
        "baselines": ["full", "oracle"],
        "threads": 1,
        "out": out,
        "plausible_ppl": [1, 1e6],
    }


def _worker(rank: int, port: int, model: str, out: str) -> None:
    import os

    from cascade_bench.experiment.config import make_config
    from cascade_bench.experiment.pipeline import run_experiment
    from cascade_bench.measure.distributed import leave_launch

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    config = make_config(_config(model, out))
    paths = run_experiment(config, progress=False)
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:  # the saved cascade is gone, every point is stored: the rerun only saves
        shutil.rmtree(paths["models"] / "cascade")
    dist.barrier()
    run_experiment(config, progress=False)
    leave_launch()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_resumed_two_rank_run_saves_its_cascade_without_hanging(tmp_path):
    gguf = tmp_path / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(gguf, layers=4)
    model = str(convert_gguf(gguf, tmp_path / "converted"))
    out = tmp_path / "run"
    context = mp.start_processes(
        _worker, args=(_free_port(), model, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the resumed two-rank run did not finish in {DEADLINE_S} s (a collective on one rank?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    saved = list(out.glob("models/*/cascade/cascade.json"))
    assert len(saved) == 1
    manifest = json.loads(saved[0].read_text())
    assert "hard ratio 0.5" in json.dumps(manifest)
    records = [json.loads(line) for line in (out / "results" / "two-ranks.jsonl").read_text().splitlines()]
    assert {r["point_id"] for r in records} == {"full", "routed@0.5", "oracle"}
    assert all(r["conditions"]["ranks"] == 2 for r in records)
    assert torch.isfinite(torch.tensor([r["ppl"] for r in records])).all()
