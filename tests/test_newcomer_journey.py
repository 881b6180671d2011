"""A newcomer's first hour, driven as docs/pretrained.md's recipe tells it: a small model folder of
one's own (with its tokenizer), a plain text file of one's own, `run` with the subset flags, then the
`bench-generate` command the run prints, on the same text. No crash, prompts through the model's
tokenizer, a default that cannot fit the model dropped with a note, and a chosen rule that cannot
fit stopped before anything runs."""

from __future__ import annotations

import json
import shlex

import pytest

from cascade_bench.cli import main
from cascade_bench.data.corpus import embedded_documents


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A 3-layer Llama of hidden size 16 (narrower than the default rule lowrank:32) with a BPE of
    its own, saved as a user would, and a text file."""
    from transformers import AutoModelForCausalLM

    from cascade_bench.data.tokenization import load_tokenizer
    from cascade_bench.stages.presets import stage_config

    root = tmp_path_factory.mktemp("journey")
    text = root / "my_text.txt"
    text.write_text("\n\n".join(body for _, body in embedded_documents())[:60_000])
    folder = root / "my-model"
    tokenizer = load_tokenizer("bpe:300", [text.read_text()[:50_000]], cache_dir=root / "cache")
    tokenizer.save_pretrained(folder)
    config = stage_config(
        "llama-tiny", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        num_hidden_layers=3, vocab_size=300,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return root, folder, text


def _run_args(root, folder, text, *extra):
    return [
        "run",
        "--model", str(folder), "--tokenizer", "model", "--corpus", str(text),
        "--boundaries", "2", "--exit-layers", "1", "2",
        "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "2", "--validation-batches", "1", "--risk-batches", "2", "--exit-train-tokens", "2048",
        "--hard-ratios", "0.5", "--timing-repeats", "1", "--timing-batches", "1",
        "--name", "mine", "--out", str(root / "out"), "--quiet",
        *extra,
    ]  # fmt: skip


def test_a_chosen_rule_that_cannot_fit_stops_before_anything_is_measured(mine, capsys):
    root, folder, text = mine
    assert main(_run_args(root, folder, text, "--exit-rules", "max_prob", "lowrank:64", "--name", "too-wide")) == 2
    error = capsys.readouterr().err
    assert "config key 'exit_rules': 'lowrank:64' needs a rank in [1, 16]" in error
    assert not (root / "out" / "results" / "too-wide.jsonl").exists()


def test_the_journey_from_a_model_folder_and_a_text_file_to_decoding(mine, capsys):
    root, folder, text = mine
    out = root / "out"
    assert main(_run_args(root, folder, text)) == 0
    printed = capsys.readouterr().out
    # the default rule lowrank:32 cannot fit hidden size 16: dropped, and said so
    assert "note: exit_rules: the default rule 'lowrank:32' dropped" in printed
    # an untrained model predicts near-uniformly: said before the sweep, not after it
    assert "warning: the unsplit model's PPL" in printed and "near its vocabulary size 300" in printed
    records = [json.loads(line) for line in (out / "results" / "mine.jsonl").read_text().splitlines()]
    conditions = records[0]["conditions"]
    assert "lowrank:32" not in conditions["config"]["exit_rules"] and conditions["adapted"]
    assert conditions["dataset"].startswith("file:") and str(text) in conditions["dataset"]
    # the exit curve, the cost-vs-quality table, the report that lists the run's files
    assert (out / "plots" / "mine.exit_curve.png").is_file()
    assert "FLOP" in (out / "results" / "mine.paper.md").read_text()
    report = (out / "mine.report.md").read_text()
    assert "## Files of this run" in report and "`results/mine.paper.md`" in report
    assert "Adapted to the model: exit_rules" in report
    # the run prints where it saved the cascade and the command that decodes it on the same text
    command = next(line for line in printed.splitlines() if "cascade-bench bench-generate" in line)
    argv = shlex.split(command.split("cascade-bench", 1)[1])
    assert argv[argv.index("--corpus") + 1] == str(text)
    bench = root / "bench-generate.json"
    quick = ["--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--prompt-len", "16", "--new-tokens", "4"]
    assert main([*argv[: argv.index("--batch-sizes")], *quick, "--json", str(bench)]) == 0
    decoded = json.loads(bench.read_text())
    # prompts through the model's own tokenizer from the user's text, not bytes of the embedded corpus
    assert decoded["conditions"]["data"].startswith(f"file:{text}") and "tokenizer" in decoded["conditions"]["data"]
    assert decoded["rows"] and "| batch | variant |" in capsys.readouterr().out
    # and on prompts of one's own (JSON lines), each row the last --prompt-len tokens of one
    prompts = root / "prompts.jsonl"
    words = text.read_text().split()
    prompts.write_text("\n".join(json.dumps({"text": " ".join(words[i : i + 60])}) for i in (0, 500)) + "\n")
    own = root / "own-prompts.json"
    head = argv[: argv.index("--batch-sizes")]
    assert main([*head, *quick, "--prompts", str(prompts), "--json", str(own)]) == 0
    assert json.loads(own.read_text())["conditions"]["data"].startswith(f"prompts {prompts}")


def test_a_model_folder_without_a_tokenizer_is_refused_not_fed_bytes(mine, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, folder, _ = mine
    bare = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(bare)
    assert main(["bench-generate", "--model", str(bare), "--boundaries", "2", "--batch-sizes", "1"]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help():
    import argparse

    from cascade_bench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = []
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            text = action.help or ""
            if not text.strip() or text.lstrip().startswith("(default"):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"flags without help: {missing}"


def test_help_imports_no_torch_so_it_answers_at_once():
    """`cascade-bench ... --help` builds every parser from torch-free name modules (the package's
    public names load on first use), so it answers in a fraction of a second."""
    import subprocess
    import sys

    code = (
        "import sys; from cascade_bench.cli import build_parser; build_parser(); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules); "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_torch_free_names_are_the_registries_they_stand_for():
    from cascade_bench.bench.routing import BENCH_RULES
    from cascade_bench.stages.exit_rules import parse_rule_spec
    from cascade_bench.stages.exits import BUILTIN_EXIT_RULES
    from cascade_bench.stages.rule_specs import BUILTIN_RULE_NAMES
    from cascade_bench.training.protocol_specs import STAGE_KIND_NAMES
    from cascade_bench.training.protocols import STAGE_KINDS

    assert BUILTIN_RULE_NAMES == tuple(sorted(BUILTIN_EXIT_RULES))
    assert tuple(STAGE_KINDS) == STAGE_KIND_NAMES
    assert all(parse_rule_spec(rule) for rule in BENCH_RULES)


@pytest.mark.parametrize(
    "package",
    [
        "cascade_bench",
        *(f"cascade_bench.{p}" for p in ("data", "stages", "measure", "routing", "training", "cost", "experiment")),
    ],
)
def test_every_public_name_of_every_package_loads_on_first_use(package):
    import importlib

    module = importlib.import_module(package)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
        assert name in dir(module)
