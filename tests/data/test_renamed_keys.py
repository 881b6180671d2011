"""Renamed keys are read once from what was stored under the old name (a run config, a results file's
stored config, a saved cascade's manifest), with a FutureWarning naming the file and the new name;
nothing past the loader sees the old name."""

from __future__ import annotations

import json

import pytest

from cascade_bench.data.renamed_keys import RENAMED, read_renamed
from cascade_bench.experiment.config import load_config_file, make_config
from cascade_bench.experiment.records import Record
from cascade_bench.experiment.results_store import ResultsStore
from tests.helpers import tiny_ensemble


def test_an_old_key_is_read_under_its_new_name_with_a_note_and_both_names_are_refused():
    assert RENAMED == {"exit_fn": "exit_rule"}
    with pytest.warns(FutureWarning, match=r"old\.toml: key 'exit_fn' is now called 'exit_rule'"):
        assert read_renamed({"exit_fn": "margin", "seq_len": 8}, "old.toml") == {"exit_rule": "margin", "seq_len": 8}
    with pytest.raises(ValueError, match="holds both 'exit_fn' and its new name 'exit_rule'"):
        read_renamed({"exit_fn": "margin", "exit_rule": "cos_sim"}, "both.toml")


@pytest.mark.parametrize("text", ['exit_fn = "margin"\n', '[exit_rules]\nexit_fn = "margin"\n'])
def test_an_old_config_file_runs_as_the_new_one(tmp_path, text):
    path = tmp_path / "old.toml"
    path.write_text(text)
    with pytest.warns(FutureWarning, match="old.toml"):
        values = load_config_file(path)
    assert values == {"exit_rule": "margin"} and make_config(values).exit_rule == "margin"


def test_a_results_file_with_the_old_config_key_is_read_once_and_rewritten_with_the_new(tmp_path):
    path = tmp_path / "run.jsonl"
    store = ResultsStore(path)
    old = Record(point_id="full", method="full", conditions={"config": {"exit_rule": "margin"}})
    store.append(old)
    path.write_text(path.read_text().replace('"exit_rule"', '"exit_fn"'))
    with pytest.warns(
        FutureWarning, match=r"run\.jsonl: the run config of 1 record holds keys renamed since \(exit_fn -> exit_rule\)"
    ):
        store = ResultsStore(path)
    assert [r.conditions["config"] for r in store] == [{"exit_rule": "margin"}]
    store.append(Record(point_id="prefix", method="prefix", conditions={"config": {"exit_rule": "margin"}}))
    assert '"exit_fn"' not in path.read_text()  # the next write stores the new name


def test_a_cascade_saved_under_manifest_version_2_loads_its_rules(tmp_path):
    from cascade_bench.training.persistence import MANIFEST, load_ensemble, save_ensemble

    ensemble = tiny_ensemble("gpt2-mini", exit_rule="margin")
    folder = save_ensemble(ensemble, tmp_path / "saved")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["version"] == 3 and [s["exit_rule"] for s in manifest["stages"]] == ["margin", "margin"]
    manifest["version"] = 2
    manifest["stages"] = [{("exit_fn" if k == "exit_rule" else k): v for k, v in s.items()} for s in manifest["stages"]]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(FutureWarning, match="key 'exit_fn' is now called 'exit_rule'"):
        loaded = load_ensemble(folder)
    assert [stage.exit_rule.name for stage in loaded] == ["margin", "margin"]


def test_confidence_histograms_stored_under_the_old_key_still_plot(tmp_path):
    from cascade_bench.experiment.plots import _read_confidences

    path = tmp_path / "run.confidence.json"
    path.write_text(
        json.dumps({"histograms": [{"stage": 0, "exit_fn": "max_prob", "counts": [1], "min": 0, "max": 1}]})
    )
    with pytest.warns(FutureWarning, match="run.confidence.json: key 'exit_fn' is now called 'exit_rule'"):
        stored = _read_confidences(path)
    assert stored["histograms"][0]["exit_rule"] == "max_prob"


def test_a_prompt_without_a_real_token_is_refused_with_or_without_a_mask():
    import torch

    from cascade_bench.routing.decode_steps import real_tokens

    for mask in (None, torch.zeros(1, 3, dtype=torch.long)):
        ids = torch.zeros(1, 0 if mask is None else 3, dtype=torch.long)
        with pytest.raises(ValueError, match="every prompt needs at least one real token"):
            real_tokens(ids, mask)
