"""Save and load a trained Ensemble: each stage with ``save_pretrained``, plus one manifest with
thresholds and exit rules (and the tokenizer, if given), written to a temporary folder and renamed
into place so a crash never leaves half a cascade."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .ensemble import Ensemble
from .exits import BUILTIN_EXIT_FUNCTIONS
from .llm import LLM

MANIFEST = "cascade.json"
FORMAT = "cascade_bench.ensemble"
VERSION = 1


def _number(value: float):
    return value if math.isfinite(value) else repr(value)  # JSON has no inf: store "inf" / "-inf"


def save_ensemble(ensemble: Ensemble, folder: "Path | str", tokenizer=None, extra: Optional[dict] = None) -> Path:
    """Write ``folder/stage{k}/`` (save_pretrained), ``folder/tokenizer/`` and ``folder/cascade.json``.

    Only built-in exit functions can be saved (a callable has no portable name). An existing
    folder is replaced only once the new one is complete.
    """
    folder = Path(folder)
    for k, stage in enumerate(ensemble):
        if not isinstance(stage, LLM):
            raise ValueError(f"stage {k} is a {type(stage).__name__} cut from a model, which save_ensemble does not "
                             f"write: save that model with save_pretrained and rebuild with Ensemble.from_blocks "
                             f"(trained exit heads: torch.save(ensemble.state_dict(), path))")
        if stage.exit_function.name not in BUILTIN_EXIT_FUNCTIONS or \
                stage.exit_function.fn is not BUILTIN_EXIT_FUNCTIONS[stage.exit_function.name]:
            raise ValueError(f"stage {k} uses exit function {stage.exit_function.name!r}, which is not a built-in "
                             f"({sorted(BUILTIN_EXIT_FUNCTIONS)}); it cannot be saved by name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        stages = []
        for k, stage in enumerate(ensemble):
            stage.model.save_pretrained(staging / f"stage{k}")
            stages.append({"path": f"stage{k}", "exit_fn": stage.exit_function.name,
                           "threshold": _number(stage.threshold), "layers": stage.num_layers})
        manifest = {"format": FORMAT, "version": VERSION, "stages": stages, "extra": extra or {}}
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


def load_manifest(folder: "Path | str") -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no saved cascade in {folder}: missing {MANIFEST}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} manifest of version {VERSION}")
    return manifest


def load_ensemble(folder: "Path | str", device: str = "cpu", dtype=None) -> Ensemble:
    """Load what :func:`save_ensemble` wrote: stages, exit functions and thresholds."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    ensemble = Ensemble()
    for entry in manifest["stages"]:
        stage = LLM.from_pretrained(folder / entry["path"], exit_fn=entry["exit_fn"],
                                    threshold=float(entry["threshold"]))
        ensemble.add_llm(stage.to(device=device, dtype=dtype) if dtype is not None else stage.to(device))
    return ensemble.eval()


def load_saved_tokenizer(folder: "Path | str"):
    """The tokenizer saved with the cascade, or None."""
    manifest = load_manifest(folder)
    if "tokenizer" not in manifest:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(folder) / manifest["tokenizer"])
