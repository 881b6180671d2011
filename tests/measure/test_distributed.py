"""Data-parallel evaluation (measure.distributed): two gloo processes give the one-process results.

Each worker evaluates inside ``sharded`` and rank 0 then computes the same calls ``unsharded`` in
the same process (same threads, same weights), so the comparison is exact: counts and thresholds
equal, float64 sums equal up to the order they were added in.
"""

from __future__ import annotations

import math
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cascade_bench.cost.measurement import measure_cost
from cascade_bench.data.corpus import embedded_documents
from cascade_bench.measure.distributed import (
    ONE_PROCESS,
    Ranks,
    concatenated,
    first_share,
    join_launch,
    leave_launch,
    shard,
    sharded,
    summed,
    totals,
    unsharded,
)
from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.routing.evaluation import evaluate
from cascade_bench.routing.oracle import oracle_bound
from cascade_bench.routing.risk_control import risk_controlled_thresholds, routed_violations
from tests.helpers import tiny_ensemble, token_batch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def test_one_process_shards_nothing_and_combines_nothing():
    batches = [1, 2, 3]
    assert shard(batches) is batches and first_share(2) == 2 and summed([1, 2.5]) == [1, 2.5]
    with sharded(ONE_PROCESS):
        assert shard(batches) is batches
    assert join_launch() == ONE_PROCESS  # no torchrun environment here
    assert ONE_PROCESS.summary() == {"ranks": 1, "backend": None}


def test_per_token_values_and_totals_over_batches_in_one_process():
    batches = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    assert torch.equal(concatenated(lambda b: b, batches), torch.tensor([1.0, 2.0, 3.0]))
    pairs = concatenated(lambda b: (b, 2 * b), batches)
    assert torch.equal(pairs[1], torch.tensor([2.0, 4.0, 6.0]))
    assert totals(lambda b: [len(b), float(b.sum())], batches) == [3, 6.0]
    for combine in (concatenated, totals):
        with pytest.raises(ValueError, match="got no batches"):
            combine(lambda b: [b], [])


def test_shares_stride_over_ranks_and_every_rank_needs_one(monkeypatch):
    # shard's arithmetic, read without a process group (nothing is combined here)
    with sharded(Ranks(rank=1, world_size=3, backend="gloo")):
        assert shard(range(8)) == [1, 4, 7] and first_share(5) == 2  # batches 1, 4 of the first 5
        with pytest.raises(ValueError, match="cannot shard 2 batches over 3 ranks"):
            shard([0, 1])
        with pytest.raises(ValueError, match="cannot time the first 2 batches over 3 ranks"):
            first_share(2)
        with unsharded():
            assert shard([0, 1]) == [0, 1]


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        join_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK 2 must be in 0..WORLD_SIZE-1"):
        join_launch()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="under torchrun give device 'cuda'.*got 'cuda:1'"):
        join_launch("cuda:1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calls(ensemble, batches) -> dict:
    """Every sharded evaluation function once, on ``batches``."""
    thresholds = calibrate_thresholds(ensemble, batches, 0.4)
    cost = measure_cost(
        ensemble, batches, "routed", thresholds=list(thresholds), repeats=1, fvcore=False, spans=False, timing_batches=2
    )
    risk = risk_controlled_thresholds(ensemble, batches, delta=0.3, epsilon=0.2)
    return {
        "thresholds": thresholds,
        "evaluate": evaluate(ensemble, batches, method="routed", thresholds=list(thresholds)),
        "cost": cost,
        "oracle": oracle_bound(ensemble, batches),
        "risk": risk.summary(),
        "violations": routed_violations(ensemble, batches, risk.thresholds),
        # the two edges every algorithm goes through: per-token values and additive totals per batch
        "concatenated": concatenated(lambda b: _ids(b).flatten()[:5].float(), batches),
        "totals": totals(lambda b: [int(_ids(b).sum()), 0.5 * _ids(b).shape[0]], batches),
    }


def _ids(batch) -> torch.Tensor:
    return (batch["input_ids"] if isinstance(batch, dict) else batch).cpu()


def _worker(rank: int, world_size: int, port: int, out: str, device: str = "cpu") -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    ranks = join_launch(device)
    text = "\n\n".join(body for _, body in embedded_documents())
    # 5 batches, uneven over 2 ranks; padding in one of them
    batches = [token_batch(text, 3, 24, offset=700 * i) for i in range(5)]
    mask = torch.ones_like(batches[1])
    mask[0, 18:] = 0
    batches[1] = {"input_ids": batches[1], "attention_mask": mask}
    if device != "cpu":
        batches = [{k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b.to(device) for b in batches]
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1), seed=0).to(device)
    with sharded(ranks):
        parallel = _calls(ensemble, batches)
        if ranks.is_main:
            with unsharded():
                single = _calls(ensemble, batches)
            with open(out, "wb") as f:
                pickle.dump({"parallel": parallel, "single": single, "ranks": ranks}, f)
    leave_launch()


def _launch(out: str, device: str = "cpu") -> dict:
    mp.start_processes(_worker, args=(2, _free_port(), out, device), nprocs=2, join=True, start_method="spawn")
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("ranks") / "results.pkl"))


def test_two_ranks_calibrate_the_same_exact_quantiles(two_ranks):
    assert two_ranks["ranks"] == Ranks(rank=0, world_size=2, backend="gloo")
    assert two_ranks["parallel"]["thresholds"] == two_ranks["single"]["thresholds"]
    assert two_ranks["parallel"]["risk"] == two_ranks["single"]["risk"]
    assert two_ranks["parallel"]["violations"] == two_ranks["single"]["violations"]


def test_two_ranks_evaluate_every_token_once(two_ranks):
    parallel, single = two_ranks["parallel"]["evaluate"], two_ranks["single"]["evaluate"]
    for key in (
        "tokens",
        "routed_tokens",
        "hard_tokens",
        "tokens_entered",
        "tokens_exited",
        "exit_ratios",
        "layer_cost",
        "padding_waste",
        "tokens_computed",
    ):
        assert getattr(parallel, key) == getattr(single, key), key
    assert parallel.nll_sum == pytest.approx(single.nll_sum, rel=1e-12)
    for key in ("ppl", "accuracy", "hard_ppl", "easy_ppl", "hard_ppl_stage0"):
        assert getattr(parallel, key) == pytest.approx(getattr(single, key), rel=1e-12), key
    assert parallel.conditions["ranks"] == 2 and single.conditions["ranks"] == 1
    assert parallel.conditions["batch_shapes"] == single.conditions["batch_shapes"]


def test_two_ranks_count_the_same_flops_and_time_the_same_batches(two_ranks):
    parallel, single = two_ranks["parallel"]["cost"], two_ranks["single"]["cost"]
    assert parallel.flops == single.flops == parallel.flops_analytic == single.flops_analytic
    assert parallel.flops_by_op == single.flops_by_op
    assert parallel.stages == single.stages
    assert parallel.quality.ppl == pytest.approx(single.quality.ppl, rel=1e-12)
    for key in ("timed_batches", "timed_tokens", "batches"):
        assert parallel.conditions[key] == single.conditions[key], key
    assert parallel.conditions["timed_batches"] == 2 and parallel.conditions["batches"] == 5
    assert parallel.conditions["ranks"] == 2
    assert math.isfinite(parallel.time_median_s) and parallel.tokens_per_s > 0


def test_two_ranks_gather_every_batch_s_values_and_sum_every_batch_s_totals(two_ranks):
    parallel, single = two_ranks["parallel"], two_ranks["single"]
    assert parallel["concatenated"].shape == (25,)  # 5 values from each of the 5 batches
    assert sorted(parallel["concatenated"].tolist()) == sorted(single["concatenated"].tolist())
    assert parallel["totals"] == single["totals"] and single["totals"][1] == 7.5  # 5 batches of 3 rows x 0.5


def test_two_ranks_give_the_same_oracle_bound(two_ranks):
    parallel, single = two_ranks["parallel"]["oracle"], two_ranks["single"]["oracle"]
    assert parallel.tokens_entered == single.tokens_entered and parallel.flops_analytic == single.flops_analytic
    assert parallel.ppl == pytest.approx(single.ppl, rel=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL: one rank per GPU)")
def test_two_nccl_ranks_on_two_gpus_calibrate_and_count_like_one(tmp_path):
    results = _launch(str(tmp_path / "results.pkl"), device="cuda")
    assert results["ranks"].backend == "nccl"
    assert results["parallel"]["thresholds"] == results["single"]["thresholds"]
    parallel, single = results["parallel"]["evaluate"], results["single"]["evaluate"]
    assert parallel.tokens_entered == single.tokens_entered
    assert parallel.ppl == pytest.approx(single.ppl, rel=1e-12)
    assert results["parallel"]["cost"].flops_analytic == results["single"]["cost"].flops_analytic


def test_each_torchrun_rank_sets_its_own_gpu_before_the_device_probe(monkeypatch):
    """Under torchrun, checking device 'cuda' (the config does it before join_launch) must not open a
    context on GPU 0 from every rank: LOCAL_RANK's GPU is set first. CUDA is faked: it runs on the CPU."""
    from cascade_bench.measure.environment import check_device

    calls = []
    real_ones = torch.ones
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))

    def ones(*shape, device=None, **kwargs):
        calls.append(("probe", str(device)))
        return real_ones(*shape, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    check_device("cuda")
    assert calls == [("set_device", 1), ("probe", "cuda")]
    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing is set, the current device is probed
    check_device("cuda")
    assert calls == [("probe", "cuda")]
