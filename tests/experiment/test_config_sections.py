"""The config's sections: every key in exactly one TOML table, tables checked on load, and each
section's checks naming the bad key."""

from __future__ import annotations

from dataclasses import fields

import pytest

from cascade_bench.experiment.config import ExperimentConfig, load_config_file, make_config
from cascade_bench.experiment.config_sections import (
    KEY_FIELDS,
    SECTION_TYPES,
    SECTIONS,
    DataSection,
    RiskControlSection,
    section_of,
)


def test_every_key_is_declared_once_in_exactly_one_section_with_its_help_and_the_config_is_composed_of_them():
    keys = [key for section in SECTIONS.values() for key in section]
    assert len(keys) == len(set(keys)) == len(KEY_FIELDS)
    assert [f.name for f in fields(ExperimentConfig)] == list(SECTION_TYPES)  # one field per table
    assert all(isinstance(getattr(ExperimentConfig(), name), kind) for name, kind in SECTION_TYPES.items())
    assert all(f.metadata["help"] and "\n" not in f.metadata["help"] for f in KEY_FIELDS.values())
    assert (section_of("seq_len"), section_of("exit_rule"), section_of("threads")) == ("data", "exits", "runtime")
    assert ExperimentConfig().seq_len == ExperimentConfig().data.seq_len == 128  # read by its flat name
    with pytest.raises(AttributeError, match="no key or attribute 'seqlen'"):
        _ = ExperimentConfig().seqlen


def test_a_section_checks_itself_when_made_and_the_config_checks_what_ties_sections():
    with pytest.raises(ValueError, match="config key 'seq_len': expected a positive integer, got 0"):
        DataSection(seq_len=0)
    with pytest.raises(ValueError, match="config key 'risk_batches': expected 0 .* or at least 2"):
        RiskControlSection(risk_batches=1)
    assert DataSection(seq_len=32).eval_stride == 16  # 0 = half the window, resolved by the section
    # risk_batches 0 is fine for the risk section alone; with one validation batch (data) it is not
    assert RiskControlSection(risk_batches=0).risk_batches == 0
    with pytest.raises(ValueError, match="'risk_batches': expected at least 2 when validation_batches is 1"):
        make_config({"risk_batches": 0, "validation_batches": 1})
    changed = ExperimentConfig().replace(seq_len=64, exit_rules=("margin",))
    assert (changed.seq_len, changed.exit_rules, changed.data.batch_size) == (64, ("margin",), 8)
    with pytest.raises(ValueError, match="unknown config key 'seqlen'"):
        ExperimentConfig().replace(seqlen=64)


def test_old_table_names_are_read_once_with_a_note(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('[model]\npreset = "gpt2-mini"\n[exit_rules]\nexit_fn = "margin"\n[risk]\nrisk_batches = 2\n')
    with pytest.warns(FutureWarning) as caught:
        values = load_config_file(old)
    notes = [str(w.message).split(": ", 1)[1] for w in caught]
    assert [note.split(";")[0] for note in notes] == [
        "the table [model] is now called [stages]",
        "the table [exit_rules] is now called [exits]",
        "key 'exit_fn' is now called 'exit_rule'",
        "the table [risk] is now called [risk_control]",
    ]
    assert values == {"preset": "gpt2-mini", "exit_rule": "margin", "risk_batches": 2}
    both = tmp_path / "both.toml"
    both.write_text("[model]\nmodel = ''\n[stages]\npreset = 'gpt2-mini'\n")
    with pytest.raises(ValueError, match=r"both the table \[model\] and its new name \[stages\]"):
        load_config_file(both)


def test_a_renamed_key_keeps_its_artefact_folders():
    """Saved models are found by a hash of the keys that shaped them; a renamed key is hashed under
    its old name, so these keys are the ones the release before the rename gave (``exit_fn``)."""
    config = make_config({"protocol": "lego-3", "exit_rule": "margin"})
    assert config.artefact_values("stage0")["exit_fn"] == "margin" and "exit_rule" not in config.artefact_values(
        "stage0"
    )
    assert (config.training_key(), config.dense_key(), config.stage0_key()) == (
        "28a0da0da1c5",
        "dense-8e6098057be9",
        "stage0-ae2a632d9bee",
    )


def test_tables_and_top_level_keys_give_the_same_config(tmp_path):
    tables = tmp_path / "tables.toml"
    tables.write_text('name = "t"\n[data]\nseq_len = 64\n[training]\nmax_epochs = 3\n[sweep]\nhard_ratios = [0.5]\n')
    flat = tmp_path / "flat.toml"
    flat.write_text('name = "t"\nseq_len = 64\nmax_epochs = 3\nhard_ratios = [0.5]\n')
    assert (
        load_config_file(tables)
        == load_config_file(flat)
        == {
            "name": "t",
            "seq_len": 64,
            "max_epochs": 3,
            "hard_ratios": [0.5],
        }
    )


def test_a_key_under_another_table_names_its_own_and_an_unknown_table_lists_them(tmp_path):
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[data]\nmax_epochs = 3\n")
    with pytest.raises(ValueError, match=r"key 'max_epochs' is not a \[data\] key; it belongs in \[training\]"):
        load_config_file(wrong)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optimiser]\nlr = 1\n")
    with pytest.raises(ValueError, match=r"unknown table \[optimiser\]; the tables are \[data\], \[stages\]"):
        load_config_file(unknown)
    nowhere = tmp_path / "nowhere.toml"
    nowhere.write_text("[data]\nwindow = 3\n")
    with pytest.raises(ValueError, match="unknown config key 'window'"):
        load_config_file(nowhere)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("data", "eval_stride", 300, "at most seq_len"),
        ("data", "eval_split", "train", "'test' or 'validation'"),
        ("stages", "preset", "gpt5", "one of"),
        ("stages", "boundaries", [4], "left unset unless 'model' is set"),
        ("training", "patience", [1, 1, 1], "one entry per stage"),
        ("training", "lr_decay", 2, "a number in"),
        ("sweep", "hard_ratios", [0.5, 1.0], "fractions strictly between 0 and 1"),
        ("sweep", "batching", "ragged", "'padded' or 'bucketed'"),
        ("exits", "exit_rules", ["max_prob", "max_prob"], "distinct exit rules"),
        ("risk_control", "risk_batches", 1, "at least 2"),
        ("measurement", "count_flops", "some", "one of"),
        ("runtime", "dtype", "float8", "'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_each_section_rejects_a_bad_key_by_name(section, key, value, expected):
    assert section_of(key) == section
    with pytest.raises(ValueError, match=rf"config key '{key}': expected .*{expected}"):
        make_config({key: value})


#: A pretrained-model run's config (the model folder is not read until the run starts).
_PRETRAINED = {"model": "some/folder", "tokenizer": "model", "exit_layers": [2, 4], "boundaries": [2]}
#: Per saved artefact, a change of one field that shapes it (each must move it to another folder).
_SHAPING = {
    "models": {
        "validation_batches": 3,  # the sweep calibrates the saved thresholds (and an automatic cut) on them
        "hard_ratios": [0.3, 0.4],  # the saved thresholds are the anchor's (nearest 0.5)
        "eval_stride": 32,
        "boundaries": [3],
        "block_heads": "translator",
        "exit_rule": "cos_sim",
        "risk_batches": 2,
        "seed": 1,
    },
    "translators": {
        "eval_stride": 32,  # the validation windows that choose each ridge and the cut
        "validation_batches": 3,
        "exit_layers": [2, 3],
        "translator_fit": "lstsq+kl",
        "exit_train_tokens": 100,
        "seq_len": 64,
        "seed": 1,
    },
}


@pytest.mark.parametrize("artefact", sorted(_SHAPING))
def test_configs_that_differ_in_what_shapes_a_saved_artefact_never_share_its_folder(artefact):
    from cascade_bench.experiment.pipeline import experiment_paths

    base = experiment_paths(make_config(_PRETRAINED))[artefact]
    for key, value in _SHAPING[artefact].items():
        changed = experiment_paths(make_config({**_PRETRAINED, key: value}))[artefact]
        assert changed != base, f"{artefact} folder ignores {key}"
    # what does not shape it shares it: another name, timing, another exit rule list
    same = make_config({**_PRETRAINED, "name": "other", "timing_repeats": 5, "hard_ratios": [0.2, 0.5, 0.8]})
    assert experiment_paths(same)[artefact] == base


@pytest.mark.parametrize(
    "values,message",
    [
        ({"hard_ratios": [0.5, 0.5]}, r"hard_ratios.*distinct fractions.*\[0.5\] given twice"),
        ({"hard_ratios": [0.3, 0.1 + 0.2, 0.3]}, r"hard_ratios.*\[0.3\] given twice"),
        ({"oracle_tolerance": True}, "oracle_tolerance': expected a number, got the boolean True"),
        ({"risk_delta": False}, "risk_delta': expected a number, got the boolean False"),
        ({"hard_ratios": [True, 0.5]}, "hard_ratios': expected numbers, got a boolean in"),
        ({"seq_len": True}, "seq_len': expected a number, got the boolean True"),
    ],
)
def test_repeated_ratios_and_booleans_for_numbers_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_point_ids_are_exact_so_distinct_ratios_never_collide():
    from cascade_bench.experiment.points import plan_points, ratio_label

    assert ratio_label(0.5) == "0.5" and ratio_label(0.1 + 0.2) == "0.30000000000000004"
    assert ratio_label(1 / 3) == repr(1 / 3)  # ':g' would print 0.333333 for it and for 0.333333
    config = make_config({"hard_ratios": [1 / 3, 0.333333, 0.5]})
    ids = [p.id for p in plan_points(config, 2)]
    assert len(ids) == len(set(ids))
    assert {"routed@0.333333", f"routed@{1 / 3!r}", "routed@0.5", "masked@0.5"} <= set(ids)


def test_a_key_set_at_the_top_level_and_in_its_table_is_refused(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text("seq_len = 64\n\n[data]\nseq_len = 128\n")
    with pytest.raises(ValueError, match=r"key 'seq_len' is set both at the top level \(64\) and in \[data\] \(128\)"):
        load_config_file(path)


def test_the_risk_batches_message_says_what_0_means():
    with pytest.raises(ValueError, match="0 = risk control shares the validation batches"):
        make_config({"risk_batches": -1})


def test_another_checkpoint_under_the_same_model_spec_gets_other_folders(tmp_path):
    """The keys hash what the spec names, not only the spec: a folder whose config or files change (or
    a GGUF file with other bytes) moves the saved blocks and translators elsewhere."""
    from cascade_bench.experiment.pipeline import experiment_paths

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text('{"rope_theta": 10000}')
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    values = {**_PRETRAINED, "model": str(folder)}
    before = experiment_paths(make_config(values))
    (folder / "config.json").write_text('{"rope_theta": 500000}')
    after = experiment_paths(make_config(values))
    assert before["models"] != after["models"] and before["translators"] != after["translators"]
    (folder / "model.safetensors").write_bytes(b"\0" * 32)
    assert experiment_paths(make_config(values))["models"] != after["models"]


def test_every_config_has_its_paths_with_or_without_a_model():
    """A trained cascade's config names no model: its keys must not need one (a run with no model
    failed at once when the model's fingerprint entered the translators' key)."""
    from cascade_bench.experiment.pipeline import experiment_paths

    assert experiment_paths(make_config({}))["models"].name == make_config({}).training_key()
    assert experiment_paths(make_config(_PRETRAINED))["translators"].name.startswith("translators-")


def test_risk_control_on_one_shared_validation_batch_is_refused_before_the_run():
    with pytest.raises(ValueError, match=r"'risk_batches': expected at least 2 when validation_batches is 1"):
        make_config({"risk_batches": 0, "validation_batches": 1})
    make_config({"risk_batches": 0, "validation_batches": 1, "risk": ""})  # no risk control: nothing to refuse
    make_config({"risk_batches": 2, "validation_batches": 1})


def test_a_list_key_has_one_grammar_and_the_old_comma_form_is_refused_by_name():
    """TOML lists and space-separated flags; a comma-joined string says which form reads."""
    assert make_config({"hard_ratios": ["0.3", "0.5"]}).hard_ratios == (0.3, 0.5)
    with pytest.raises(ValueError, match=r"'hard_ratios' is a list \(TOML `hard_ratios = \[a, b\]`, command line"):
        make_config({"hard_ratios": "0.3,0.5"})
    with pytest.raises(
        ValueError, match=r"give its values space-separated .*`--exit-rules a b`\); got \['max_prob,cos_sim'\]"
    ):
        make_config({"exit_rules": ["max_prob,cos_sim"]})


def test_every_artefact_key_is_a_config_key_and_each_artefact_reads_the_data_keys():
    from cascade_bench.experiment.config import ARTEFACT_KEYS

    fields = set(KEY_FIELDS)
    for artefact, keys in ARTEFACT_KEYS.items():
        assert set(keys) <= fields and len(set(keys)) == len(keys), artefact
    data = {"corpus", "corpus_config", "tokenizer", "seq_len", "batch_size", "eval_stride"}
    assert all(data <= set(ARTEFACT_KEYS[a]) for a in ("training", "dense", "stage0", "exit_study"))
    with pytest.raises(ValueError, match=r"'hard_ratios' is a list .*; got the single value 0.5"):
        make_config({"hard_ratios": 0.5})  # a TOML scalar: an error naming the key, not a TypeError
    with pytest.raises(ValueError, match=r"'smoke.toml' was read as one of its values; .* give the config file first"):
        make_config({"hard_ratios": ["0.3", "smoke.toml"]})  # `run --hard-ratios 0.3 smoke.toml`
    with pytest.raises(ValueError, match=r"'hard_ratios': cannot read the item '0.5x' as float"):
        make_config({"hard_ratios": ["0.5", "0.5x"]})


def test_the_default_config_file_writes_every_key_under_its_table_with_its_default():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "default.toml"
    raw = tomllib.loads(path.read_text())
    assert {table: sorted(raw[table]) for table in SECTIONS} == {
        table: sorted(keys) for table, keys in SECTIONS.items()
    }
    assert make_config(load_config_file(path)) == ExperimentConfig()
    assert raw["data"]["eval_stride"] == 0  # half the window, so a copy that changes seq_len keeps the meaning
