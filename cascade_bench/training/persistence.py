"""Save and load a trained Ensemble, written to a temporary folder and renamed into place so a
crash never leaves half a cascade. One manifest (``cascade.json``) holds thresholds and exit rules
(and the tokenizer folder, if given). An exit rule with weights of its own (a learned classifier, a
reduced head: ``stages.exit_rules``) is written as its spec in the manifest plus
``exit_rules/stage{k}.safetensors``.

- A cascade of LLMs: each stage with ``save_pretrained`` (``stage{k}/``).
- Blocks (a model grown with ``extend``, or cut with ``from_blocks``): ONE ``save_pretrained``
  checkpoint of the whole model (``model/``, ``blocks.assemble_model``), where to cut it, and the
  non-last blocks' own exit heads (``heads/stage{k}.safetensors``) when they have their own (for
  translator heads, the translator alone: the norm and lm_head are the model's). Any
  Hugging Face tool can load ``model/`` as a plain causal LM of the total depth.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..data.renamed_keys import read_renamed
from ..stages.blocks import Block, Translator, assemble_model, head_sharing
from ..stages.ensemble import Ensemble
from ..stages.exit_rules import rule_from_spec
from ..stages.exits import BUILTIN_EXIT_RULES
from ..stages.families import register_own_families
from ..stages.llm import LLM

MANIFEST = "cascade.json"
FORMAT = "cascade_bench.ensemble"
#: Version 2 adds block ensembles ("kind": "blocks"); version 3 names each stage's rule ``exit_rule``
#: alone (versions 1 and 2 stored a built-in's name as ``exit_fn``: read once under the new name).
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


def _number(value: float):
    return value if math.isfinite(value) else repr(value)  # JSON has no inf: store "inf" / "-inf"


def save_ensemble(ensemble: Ensemble, folder: "Path | str", tokenizer=None, extra: Optional[dict] = None) -> Path:
    """Write ``folder/stage{k}/`` (save_pretrained), ``folder/tokenizer/`` and ``folder/cascade.json``.

    Built-in exit rules are saved by name, rule modules (``stages.exit_rules``) by spec and
    weights; any other callable has no portable form and is refused. An existing folder is replaced
    only once the new one is complete.
    """
    folder = Path(folder)
    kinds = {type(stage) for stage in ensemble}
    if kinds not in ({LLM}, {Block}):
        raise ValueError(
            f"save_ensemble writes cascades of LLMs or of Blocks, not a mix: stages are "
            f"{[type(stage).__name__ for stage in ensemble]}"
        )
    for k, stage in enumerate(ensemble):
        rule = stage.exit_rule
        builtin = rule.name in BUILTIN_EXIT_RULES and rule.fn is BUILTIN_EXIT_RULES[rule.name]
        if not builtin and not callable(getattr(rule.module, "spec", None)):
            raise ValueError(
                f"stage {k} uses exit rule {rule.name!r}, which is neither a built-in "
                f"({sorted(BUILTIN_EXIT_RULES)}) nor a rule module of stages.exit_rules; it "
                f"cannot be saved"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write = _write_blocks if kinds == {Block} else _write_llms
        manifest = {"format": FORMAT, "version": VERSION, **write(ensemble, staging), "extra": extra or {}}
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / "tokenizer")
            manifest["tokenizer"] = "tokenizer"
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _stage_entry(stage, k: int, staging: Path) -> dict:
    """A stage's manifest entry: its exit rule (a built-in's name, or a rule module's spec with its
    weights' file), threshold and depth."""
    entry = {"exit_rule": stage.exit_rule.name, "threshold": _number(stage.threshold), "layers": stage.num_layers}
    rule = stage.exit_rule.module
    if rule is not None:
        from safetensors.torch import save_file

        (staging / "exit_rules").mkdir(exist_ok=True)
        entry["exit_rule"] = rule.spec()
        entry["exit_rule_weights"] = f"exit_rules/stage{k}.safetensors"
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in rule.state_dict().items()},
            str(staging / entry["exit_rule_weights"]),
        )
    return entry


def _attach_exit_rule(stage, entry: dict, folder: Path) -> None:
    """Put the saved exit rule back on ``stage``: a built-in by name, a rule module from its spec and
    weights (``exit_rule_weights``)."""
    if "exit_rule_weights" not in entry:
        stage.exit_rule = entry["exit_rule"]
        return
    from safetensors.torch import load_file

    rule = rule_from_spec(entry["exit_rule"], stage)
    rule.load_state_dict(load_file(str(folder / entry["exit_rule_weights"])))
    stage.exit_rule = rule.eval()


def _write_llms(ensemble: Ensemble, staging: Path) -> dict:
    stages = []
    for k, stage in enumerate(ensemble):
        stage.model.save_pretrained(staging / f"stage{k}")
        stages.append({"path": f"stage{k}", **_stage_entry(stage, k, staging)})
    return {"kind": "llms", "stages": stages}


def _write_blocks(ensemble: Ensemble, staging: Path) -> dict:
    from safetensors.torch import save_file

    blocks = list(ensemble)
    others = [
        k
        for k, b in enumerate(blocks[:-1])
        if b.head.translator is not None and not isinstance(b.head.translator, Translator)
    ]
    if others:
        raise ValueError(
            f"blocks {others} exit through a trained exit that is not a Translator "
            f"({type(blocks[others[0]].head.translator).__name__}); a cascade saves translators only: keep such "
            "exits with training.saved_exits (train-exits writes them)"
        )
    assemble_model(blocks).save_pretrained(staging / "model")
    heads = head_sharing(blocks)
    stages = []
    for k, block in enumerate(blocks):
        entry = _stage_entry(block, k, staging)
        if heads != "shared" and k < len(blocks) - 1:
            (staging / "heads").mkdir(exist_ok=True)
            entry["head"] = f"heads/stage{k}.safetensors"
            own = block.head.translator if heads == "translator" else block.head  # not the shared norm and head
            save_file(
                {name: t.detach().contiguous().cpu() for name, t in own.state_dict().items()},
                str(staging / entry["head"]),
            )
        stages.append(entry)
    boundaries = [sum(block.num_layers for block in blocks[:k]) for k in range(1, len(blocks))]
    entry = {"kind": "blocks", "model": "model", "boundaries": boundaries, "heads": heads, "stages": stages}
    if heads == "translator":
        entry["translator_rank"] = blocks[0].head.translator.rank
    return entry


def load_manifest(folder: "Path | str") -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no saved cascade in {folder}: missing {MANIFEST}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} is not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}")
    if manifest["version"] < 3:
        manifest["stages"] = [_old_stage_entry(entry, path) for entry in manifest["stages"]]
    return manifest


def _old_stage_entry(entry: dict, path: Path) -> dict:
    """A version 1 or 2 stage entry in version 3's form: ``exit_fn`` (a built-in's name) is
    ``exit_rule``, unless the entry already names a rule module there (its spec, with weights)."""
    if "exit_rule_weights" in entry:
        return {k: v for k, v in entry.items() if k != "exit_fn"}
    return read_renamed(entry, str(path))


def load_ensemble(folder: "Path | str", device: str = "cpu", dtype=None) -> Ensemble:
    """Load what :func:`save_ensemble` wrote: stages (LLMs, or blocks of one model with their own exit
    heads), exit rules and thresholds."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.get("kind", "llms") == "blocks":
        return _read_blocks(folder, manifest, device, dtype)
    ensemble = Ensemble()
    for entry in manifest["stages"]:
        stage = LLM.from_pretrained(folder / entry["path"], threshold=float(entry["threshold"]))
        stage = stage.to(device=device, dtype=dtype) if dtype is not None else stage.to(device)
        _attach_exit_rule(stage, entry, folder)
        ensemble.add_stage(stage)
    return ensemble.eval()


def _read_blocks(folder: Path, manifest: dict, device, dtype) -> Ensemble:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    register_own_families()
    model = AutoModelForCausalLM.from_pretrained(folder / manifest["model"])
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    entries = manifest["stages"]
    ensemble = Ensemble.from_blocks(
        model.eval(),
        manifest["boundaries"],
        heads=manifest["heads"],
        thresholds=[float(entry["threshold"]) for entry in entries],
        translator_rank=manifest.get("translator_rank"),
    )
    for block, entry in zip(ensemble, entries):
        if "head" in entry:
            own = block.head.translator if manifest["heads"] == "translator" else block.head
            own.load_state_dict(load_file(str(folder / entry["head"])))
        _attach_exit_rule(block, entry, folder)
    return ensemble.eval()


def load_saved_tokenizer(folder: "Path | str"):
    """The tokenizer saved with the cascade, or None."""
    manifest = load_manifest(folder)
    if "tokenizer" not in manifest:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(folder) / manifest["tokenizer"])
