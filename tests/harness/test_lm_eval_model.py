"""The lm-evaluation-harness model: its scores are the toolkit's routed NLLs, offline tasks run end to end."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from cascade_bench.cli import main  # noqa: E402
from cascade_bench.data.corpus import load_corpus  # noqa: E402
from cascade_bench.data.tokenization import load_tokenizer  # noqa: E402
from cascade_bench.data.windows import sliding_windows  # noqa: E402
from cascade_bench.harness.lm_eval_model import EarlyExitLM, evaluate  # noqa: E402
from cascade_bench.harness.tasks import TASKS, write_local_tasks  # noqa: E402
from cascade_bench.routing.passes import forward_cascade  # noqa: E402
from cascade_bench.stages.presets import build_blocks  # noqa: E402
from cascade_bench.training.persistence import save_ensemble  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = load_corpus("embedded")
    tokenizer = load_tokenizer("bpe:300", corpus.documents("train"), cache_dir=tmp_path_factory.mktemp("tok"))
    ensemble = build_blocks("gpt2-tiny", (1, 1), vocab_size=320).eval()
    ids = torch.tensor([tokenizer.encode(corpus.documents("validation")[0])[:64]])
    with torch.inference_mode():
        confidence = forward_cascade(ensemble, ids, num_stages=1, confidence_at_last_stage=True).stage_confidence[0]
    threshold = float(confidence[~torch.isnan(confidence)].median())
    ensemble.set_thresholds([threshold])
    return ensemble, tokenizer, threshold, corpus


def _model(setup, **options):
    ensemble, tokenizer, threshold, _ = setup
    return EarlyExitLM(ensemble=ensemble, tokenizer=tokenizer, thresholds=str(threshold), **options)


def _request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_is_the_routed_nll_of_the_continuation(setup):
    ensemble, tokenizer, threshold, _ = setup
    model = _model(setup, batch_size=3)
    pairs = [("The assert statement", " is a convenient way"), ("Assert", " statements"), ("x = 1\nprint(x)", "\n")]
    results = model.loglikelihood([_request("loglikelihood", *pair) for pair in pairs])
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, results):
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
        whole = torch.tensor([ctx + cont])
        targets = torch.full_like(whole, -100)
        targets[0, len(ctx) - 1 : -1] = torch.tensor(cont)
        with torch.inference_mode():
            out = forward_cascade(ensemble, whole, targets=targets, thresholds=[threshold])
        assert loglikelihood == pytest.approx(-float(out.nll[out.scored].double().sum()), rel=1e-5)
        assert greedy == bool(out.correct[out.scored].all())
    costs = model.cost_summary()
    assert costs["scored_tokens"] == sum(len(tokenizer.encode(c)) for _, c in pairs)
    assert 0 < costs["exit_ratios"][0] < 1 and sum(costs["exit_ratios"]) == pytest.approx(1.0)
    assert costs["flops_counted"] == costs["flops_analytic"] > 0 and costs["flop_ratio_to_full_depth"] > 0


def test_loglikelihood_rolling_is_the_toolkits_sliding_window_nll(setup):
    ensemble, tokenizer, threshold, corpus = setup
    text = corpus.documents("test")[0][:1500]
    model = _model(setup, max_length=16, batch_size=4)
    (rolling,) = model.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    stream = torch.tensor([tokenizer.eos_token_id] + tokenizer.encode(text))
    nll = 0.0
    for batch in sliding_windows(stream, 16, 16, batch_size=4):
        with torch.inference_mode():
            out = forward_cascade(
                ensemble, batch["input_ids"], batch.get("attention_mask"), batch["targets"], thresholds=[threshold]
            )
        nll += float(out.nll[out.scored].double().sum())
    assert rolling == pytest.approx(-nll, rel=1e-5)  # float32 per token; other batch layouts


def test_local_tasks_run_offline_through_simple_evaluate_with_cost_columns(setup, tmp_path):
    ensemble, tokenizer, threshold, _ = setup
    write_local_tasks(tmp_path)
    results = evaluate(
        {"ensemble": ensemble, "tokenizer": tokenizer, "thresholds": str(threshold), "max_length": 64},
        list(TASKS),
        include_path=str(tmp_path),
        limit=6,
        log_samples=False,
    )
    metrics = results["results"]
    assert "word_perplexity,none" in metrics["cascade_embedded_rolling"]
    assert 0.0 <= metrics["cascade_entities_choice"]["acc,none"] <= 1.0
    assert "exact_match,strip" in metrics["cascade_entities_generate"]
    costs = results["cascade_bench"]
    assert costs["scored_tokens"] > 0 and costs["generated_tokens"] > 0 and len(costs["exit_ratios"]) == 2


def test_the_lm_eval_command_runs_a_saved_cascade_and_prints_its_costs(setup, tmp_path, capsys):
    ensemble, tokenizer, threshold, _ = setup
    folder = save_ensemble(ensemble, tmp_path / "cascade", tokenizer=tokenizer)
    write_local_tasks(tmp_path / "tasks")
    costs = tmp_path / "costs.json"
    assert (
        main(
            [
                "lm-eval",
                "--model",
                "cascade_bench",
                "--model_args",
                f"cascade={folder},thresholds={threshold},max_length=64,cost_json={costs}",
                "--tasks",
                "cascade_entities_choice",
                "--include_path",
                str(tmp_path / "tasks"),
                "--limit",
                "4",
            ]
        )
        == 0
    )
    assert "cascade_entities_choice" in capsys.readouterr().out
    assert json.loads(costs.read_text())["scored_tokens"] > 0


def test_bad_model_args_name_the_problem(setup):
    with pytest.raises(ValueError, match="exactly one of cascade=FOLDER"):
        EarlyExitLM()
    with pytest.raises(ValueError, match="thresholds: expected 1"):
        _model(setup).__class__(ensemble=setup[0], tokenizer=setup[1], thresholds="0.1;0.2")
    with pytest.raises(ValueError, match="no such folder"):
        EarlyExitLM(cascade="/nonexistent/cascade")
