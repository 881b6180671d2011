"""`cascade-bench train-exits` end to end on a tiny model folder of one's own (a 3-layer Llama with a BPE
of its own) and a text file: the record holds one row per recipe and candidate layer with the fields the
published tables read, every recipe starts from least squares (so none is worse on validation than it),
the tables and the figure are written, and bad input stops before the teacher's pass."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_bench.cli import main
from cascade_bench.data.corpus import embedded_documents
from cascade_bench.experiment.exit_recipe_study import recipe_tables
from cascade_bench.training.exit_recipe_specs import EXIT_RECIPES
from cascade_bench.training.saved_exits import read_exits_file


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from cascade_bench.data.tokenization import load_tokenizer
    from cascade_bench.stages.presets import stage_config

    root = tmp_path_factory.mktemp("exits")
    text = root / "my_text.txt"
    text.write_text("\n\n".join(body for _, body in embedded_documents())[:60_000])
    folder = root / "my-model"
    load_tokenizer("bpe:300", [text.read_text()[:50_000]], cache_dir=root / "cache").save_pretrained(folder)
    model_config = stage_config(
        "llama-tiny", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        num_hidden_layers=3, vocab_size=300,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
    path = root / "exits.toml"
    path.write_text(
        f'name = "tiny-exits"\nmodel = "{folder}"\ntokenizer = "model"\ncorpus = "{text}"\nseq_len = 32\n'
        f'batch_size = 4\neval_batches = 1\nexit_layers = [1, 2]\nboundaries = [2]\nout = "{root / "out"}"\n'
    )
    return root, path


def test_train_exits_writes_one_row_per_recipe_and_layer(config, capsys, monkeypatch):
    from cascade_bench.experiment import exit_recipe_study

    scored = {}  # each recipe's exits as they were scored (after early stopping kept its best checks)
    evaluate = exit_recipe_study.evaluate_recipe

    def keep(recipe, states, with_final=False):
        scored[recipe.name] = {k: v.clone() for k, v in recipe.exits.state_dict().items()}
        return evaluate(recipe, states, with_final)

    monkeypatch.setattr(exit_recipe_study, "evaluate_recipe", keep)
    root, path = config
    argv = ["train-exits", str(path), "--budget", "0.02", "--window", "16", "--name", "tiny-named", "--quiet"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads((root / "out" / "results" / "tiny-named.exit_recipes.json").read_text())
    assert [(row["recipe"], row["layer"]) for row in record["rows"]] == [(r, l) for r in EXIT_RECIPES for l in (1, 2)]
    for row in record["rows"]:
        assert {"recipe", "layer", "agreement", "ppl", "split", "train_tokens", "seconds"} <= set(row)
        assert row["split"] == "test" and row["train_tokens"] == record["text"]["train_tokens"] > 0
        assert 0.0 <= row["agreement"] <= 1.0 and row["ppl"] > 1.0
    by_recipe = {recipe["recipe"]: recipe for recipe in record["recipes"]}
    start = by_recipe["lstsq"]["training"]["mean_agreement"][0]
    for name, recipe in by_recipe.items():
        training = recipe["training"]
        assert training["mean_agreement"][0] == pytest.approx(start), name  # every recipe starts there
        assert training["kept_agreement"] >= start - 1e-9, name  # never below its start on validation
    assert "adapted_full_depth" in by_recipe["lora"] and "adapted_full_depth" not in by_recipe["mlp"]
    assert "estimate" in record["routing_estimate"]["test"]["note"]
    assert "candidate layers among [12, 16, 20]" in record["bar"]["not_read"]  # the bar reads SmolLM2's layers
    by_layer, summary = recipe_tables(record)
    assert list(summary["recipe"]) == list(EXIT_RECIPES) and len(by_layer) == 2
    for name in ("exit_recipes.md", "exit_recipes.tex", "exit_recipes.csv", "exit_recipes_summary.md"):
        assert (root / "out" / "results" / f"tiny-named.{name}").is_file()
    assert (root / "out" / "plots" / "tiny-named.exit_recipes.png").is_file()
    # every frozen-trunk recipe's exits are kept, as trained (the LoRA trunk is not an exit of this model)
    saved = sorted(p.name for p in (root / "out" / "results" / "tiny-named.exits").iterdir())
    assert saved == ["adapter.pt", "lstsq.pt", "lstsq_kl.pt", "mlp.pt"]
    for name in ("lstsq+kl", "mlp", "adapter"):
        payload = read_exits_file(root / "out" / "results" / "tiny-named.exits" / f"{name.replace('+', '_')}.pt")
        for layer, state in payload["layers"].items():
            for key, tensor in state.items():
                torch.testing.assert_close(tensor, scored[name][f"{layer}.{key}"], rtol=0, atol=0)
    assert by_recipe["mlp"]["exits_file"].endswith("tiny-named.exits/mlp.pt") and "exits_file" not in by_recipe["lora"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0"], "--budget must be a positive number, got 0.0"),
        (["--window", "4096"], "--window 4096 is longer than the model's"),
        (["--layers", "3"], "candidate exit layers must be in \\[1, 3\\)"),
        (["--corpus", "/nonexistent/folder"], "--corpus /nonexistent/folder is not a folder"),
    ],
)
def test_bad_input_stops_before_the_teacher_s_pass(config, capsys, extra, message):
    import re

    root, path = config
    assert main(["train-exits", str(path), "--quiet", *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
