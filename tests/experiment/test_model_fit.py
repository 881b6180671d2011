"""Model-dependent settings are checked against the model's sizes before anything runs: a chosen
value that cannot fit stops with the key, the value and what fits; a default that cannot fit is
dropped with a note."""

from __future__ import annotations

import pytest

from cascade_bench.experiment.config import ExperimentConfig, make_config
from cascade_bench.experiment.model_fit import ModelSizes, fit_to_model, rule_misfit

TINY = ModelSizes(hidden_size=16, vocab_size=300, num_layers=4)


def test_a_rule_fits_when_its_size_is_within_the_head():
    assert rule_misfit("lowrank:16", TINY) is None  # rank up to min(hidden 16, vocab 300)
    assert "[1, 16]" in rule_misfit("lowrank:17", TINY)
    assert rule_misfit("topk:300", TINY) is None
    assert "[1, 300]" in rule_misfit("topk:301", TINY)
    assert rule_misfit("max_prob", TINY) is None and rule_misfit("classifier", TINY) is None


def test_the_default_rules_lose_only_what_cannot_fit_and_say_so():
    config = ExperimentConfig()
    assert "lowrank:32" in config.exit_rules
    fitted, notes = fit_to_model(config, TINY)
    assert fitted.exit_rules == tuple(r for r in config.exit_rules if r != "lowrank:32")
    assert len(notes) == 1 and "lowrank:32" in notes[0] and "--exit-rules" in notes[0]
    # on a model it fits, nothing changes
    assert fit_to_model(config, ModelSizes(128, 1024)) == (config, [])


def test_a_chosen_rule_that_cannot_fit_stops_with_the_key_the_value_and_what_fits():
    config = make_config({"exit_rules": ["max_prob", "lowrank:64"]})
    with pytest.raises(ValueError, match=r"'exit_rules': 'lowrank:64' needs a rank in \[1, 16\]"):
        fit_to_model(config, TINY)
    with pytest.raises(ValueError, match=r"'exit_rules': 'topk:999' needs K in \[1, 300\]"):
        fit_to_model(make_config({"exit_rules": ["max_prob", "topk:999"]}), TINY)


@pytest.mark.parametrize("key", ["boundaries", "exit_layers"])
def test_layer_indices_beyond_the_model_stop_the_run(key):
    values = {
        "model": "some/folder",
        "tokenizer": "model",
        "boundaries": [2],
        "exit_layers": [2],
        "exit_rules": ["max_prob"],
    }
    assert fit_to_model(make_config(values), TINY)[1] == []
    values[key] = [2, 4]  # a 4-layer model can be cut before layers 1..3 only
    with pytest.raises(ValueError, match=rf"'{key}': layer indices \[4\] .* 4 layers; expected indices in \[1, 3\]"):
        fit_to_model(make_config(values), TINY)
