"""Where could this pretrained model exit? The exit study of ``cascade-bench run`` with ``model``
and ``exit_layers`` set.

1. The unsplit model runs once over the scored split (sliding windows, no early exit); the
   residual stream after every layer is kept for the scored positions.
2. Through the model's own final norm + lm_head (the shared head), every layer 1..L-1 gets PPL,
   accuracy and top-1 agreement with the full-depth prediction.
3. One ``Translator`` per candidate layer of ``exit_layers`` is fitted on states of the train
   split with the model frozen (``translator_fit``: ridge least squares onto the last layer's
   stream, the ridge chosen on the validation split; with ``lstsq+kl`` then trained by KL to the
   full model's top-k, ``training.exit_recipes``' recipe and budget, each layer keeping its best
   check on the validation split); the scored split is never among its tokens. Each candidate gets the
   same figures through its translator, on the validation split too (what ``auto_boundaries``
   reads: cut points are never chosen on the scored split).
4. The oracle: the mean number of layers a token needs for the full-depth prediction, with shared
   heads (grid: every layer) and with translators (grid: the candidates).

Everything goes to ``results/<name>.exit_study.json`` (and the table ``results/<name>.exit_curve``
as md/tex/csv, the figure ``plots/<name>.exit_curve``); the translators are saved beside the run's
models, keyed by what trains them, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from ..data.storage import write_json_atomic
from ..measure.layer_exits import LayerStates, collect_layer_states, exit_curve, layers_needed, shared_head
from ..stages.model_source import model_fingerprint
from ..training.exit_translators import RIDGES, fit_translators_lstsq, new_translators, translated_head

STUDY_VERSION = 1


@dataclass
class ExitStudy:
    """What the study found: the JSON-ready ``summary`` and the trained translators by layer."""

    summary: dict
    translators: nn.ModuleDict

    def translator(self, layer: int) -> nn.Module:
        return self.translators[str(layer)]


def study_key(config) -> str:
    """Hash of what trains the translators and chooses their ridges (the model, the data and the
    validation windows, the candidate layers and the recipe)."""
    values = config.artefact_values("exit_study")
    if config.model:  # another checkpoint under the same name gets other translators
        values["model_fingerprint"] = model_fingerprint(config.model)
    values.update(ridges=list(RIDGES), version=STUDY_VERSION)
    if config.translator_fit == "lstsq+kl":  # what trains them further
        from ..training.exit_recipe_specs import RecipeBudget
        from ..training.exit_recipes import TRANSLATOR_LR

        values.update(kl_budget=asdict(RecipeBudget()), kl_lr=TRANSLATOR_LR)
    return "translators-" + hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _curve_rows(curve) -> list[dict]:
    return [{"layer": p.layer, "ppl": p.ppl, "accuracy": p.accuracy, "agreement": p.agreement} for p in curve]


def _columns(states: LayerStates, layers) -> LayerStates:
    """The same states restricted to ``layers`` (a subset of ``states.layers``)."""
    index = [states.layers.index(layer) for layer in layers]
    return LayerStates(
        layers=tuple(layers),
        num_layers=states.num_layers,
        states=states.states[:, index],
        targets=states.targets,
        final_argmax=states.final_argmax,
        final_nll=states.final_nll,
    )


def _saved_or_fitted(
    config, model, splits, candidates, translators: nn.ModuleDict, folder: Path, progress: bool
) -> dict:
    """The translators' training record: read with their weights from ``folder`` when a run with the
    same ``study_key`` saved them there (``reused``), else fitted at ``candidates`` on ``splits``
    (train, validation batches) and saved there."""
    from safetensors.torch import load_file, save_file

    weights, record = folder / "translators.safetensors", folder / "translators.json"
    if weights.is_file() and record.is_file():
        translators.load_state_dict(load_file(str(weights)))
        return {**json.loads(record.read_text()), "reused": True}
    training = _fit_translators(config, model, *splits, candidates, translators, progress)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in translators.state_dict().items()}, str(weights))
    write_json_atomic(record, training)
    return {**training, "reused": False}


def _candidate_row(base, point) -> dict:
    """One candidate layer's row: the shared head (``base``) against its translator (``point``)."""
    return {
        "layer": point.layer,
        "shared_ppl": base.ppl,
        "trained_ppl": point.ppl,
        "ppl_ratio": point.ppl / base.ppl,
        "shared_agreement": base.agreement,
        "trained_agreement": point.agreement,
        "shared_accuracy": base.accuracy,
        "trained_accuracy": point.accuracy,
    }


def run_exit_study(
    config,
    model,
    train_batches,
    validation_batches,
    scored_batches,
    folder: Path,
    progress: bool = True,
    source: Optional[dict] = None,
) -> ExitStudy:
    """Steps 1-4 of the module docstring; translators are read from ``folder`` when a run with the
    same ``study_key`` saved them there, else trained and saved."""
    num_layers = int(model.config.num_hidden_layers)
    candidates = tuple(sorted(config.exit_layers))
    started = time.perf_counter()
    every = collect_layer_states(model, scored_batches, range(1, num_layers))
    collect_s = time.perf_counter() - started
    shared = exit_curve(every, shared_head(model))
    shared_s = time.perf_counter() - started - collect_s
    translators = new_translators(model, candidates)
    splits = (train_batches, validation_batches)
    training = _saved_or_fitted(config, model, splits, candidates, translators, folder, progress)
    for parameter in translators.parameters():
        parameter.requires_grad_(False)
    by_layer = {int(k): t.eval() for k, t in translators.items()}
    subset = _columns(every, candidates)
    trained = exit_curve(subset, translated_head(model, by_layer))
    shared_at = {p.layer: p for p in shared}
    rows = [_candidate_row(shared_at[point.layer], point) for point in trained]
    oracle_shared = layers_needed(shared, every.final_argmax, num_layers)
    oracle_trained = layers_needed(trained, every.final_argmax, num_layers)
    summary = {
        "version": STUDY_VERSION,
        "model": config.model,
        "source": source,
        "num_layers": num_layers,
        "candidates": list(candidates),
        "scored_tokens": every.tokens,
        "full_depth_ppl": every.final_ppl,
        "shared_curve": _curve_rows(shared),
        "candidate_rows": rows,
        "trained_beats_shared_everywhere": all(r["trained_ppl"] < r["shared_ppl"] for r in rows),
        "layers_needed": {
            "shared": {
                "first_agreement": oracle_shared.first_agreement,
                "settled": oracle_shared.settled,
                "grid": "every layer 1..L-1",
            },
            "trained": {
                "first_agreement": oracle_trained.first_agreement,
                "settled": oracle_trained.settled,
                "grid": f"candidates {list(candidates)}",
            },
        },
        "translators": training,
        "seconds": {"collect": collect_s, "shared_curve": shared_s, "total": time.perf_counter() - started},
    }
    return ExitStudy(summary=summary, translators=translators)


def _fit_translators(
    config, model, train_batches, validation_batches, candidates, translators: nn.ModuleDict, progress: bool
) -> dict:
    """Fit the translators (step 3 of the module docstring); returns what the report says of it."""
    begin = time.perf_counter()
    windows = None
    if config.translator_fit == "lstsq+kl":  # one pass keeps what both fits read: states, top-k, windows
        windows = _kl_windows(config, model, train_batches, validation_batches, candidates)
        train, validation = windows[0].as_layer_states(), windows[1].as_layer_states()
    else:
        train = collect_layer_states(
            model, train_batches, candidates, max_tokens=config.exit_train_tokens or None, keep_final=True
        )
        validation = collect_layer_states(model, validation_batches, candidates)
    collected = time.perf_counter() - begin
    lstsq = fit_translators_lstsq(model, translators, train, validation)
    parameters = sum(p.numel() for p in translators.parameters())
    training = {
        "fit": config.translator_fit,
        "train_tokens": train.tokens,
        "validation_tokens": validation.tokens,
        "split": "train",
        "validation_split": "validation",
        "parameters": parameters,
        "parameters_per_layer": parameters // len(candidates),
        "collect_seconds": collected,
        "lstsq": lstsq,
    }
    if windows is not None:
        training["kl"] = _train_by_kl(config, model, *windows, translators, progress)
    by_layer = {int(k): t.eval() for k, t in translators.items()}
    training["validation_curve"] = _curve_rows(exit_curve(validation, translated_head(model, by_layer)))
    training["seconds"] = time.perf_counter() - begin
    return training


def _kl_windows(config, model, train_batches, validation_batches, layers):
    """The teacher's pass for ``lstsq+kl``: as many whole train batches as cover ``exit_train_tokens``,
    and the validation batches (``training.window_states``)."""
    from ..training.exit_recipe_specs import RecipeBudget
    from ..training.window_states import collect_window_states

    wanted, covered, batches = config.exit_train_tokens or None, 0, []
    for batch in train_batches:
        if wanted is not None and covered >= wanted:
            break
        batches.append(batch)
        covered += int((batch["targets"] != -100).sum())
    top_k = RecipeBudget().top_k
    return collect_window_states(model, batches, layers, top_k), collect_window_states(
        model, validation_batches, layers, top_k
    )


def _train_by_kl(config, model, train, validation, translators: nn.ModuleDict, progress: bool) -> dict:
    """The ``lstsq+kl`` recipe of ``training.exit_recipes`` on the run's own train and validation
    windows, with its default budget; the trained translators are copied back into ``translators``."""
    from ..training.exit_recipe_specs import RecipeBudget
    from ..training.exit_recipes import build_recipe, train_recipe

    budget = RecipeBudget(max_checks=config.max_epochs)  # the run's safety cap, as for every part it trains
    layers = tuple(sorted(int(k) for k in translators))
    recipe = build_recipe("lstsq+kl", model, layers, {layer: translators[str(layer)] for layer in layers})
    history = train_recipe(recipe, train, validation, budget, progress)
    for layer in layers:
        translators[str(layer)].load_state_dict(recipe.exits[str(layer)].state_dict())
    return {**history.summary(), "budget": asdict(budget), "train_tokens": train.tokens}


def auto_boundaries(levels, validation_curve: list[dict]) -> list[int]:
    """Per agreement level, the first candidate layer whose translator reaches it on the validation
    split (ValueError naming the best agreement when none does); distinct and increasing."""
    cuts = []
    for level in levels:
        reached = [row["layer"] for row in validation_curve if row["agreement"] >= level]
        if not reached:
            best = max(row["agreement"] for row in validation_curve)
            raise ValueError(
                f"config key 'auto_boundaries': no candidate layer's translator agrees with full depth on "
                f"{level:g} of the validation tokens (best {best:.3f}); lower the level (--auto-boundaries "
                f"{best:.2f}), add later exit_layers, or cut by hand (--boundaries L, with --block-heads "
                f"shared or translator); the exit curve is written either way (results/<name>.exit_curve.md)"
            )
        cuts.append(reached[0])
    if len(set(cuts)) != len(cuts):
        raise ValueError(
            f"config key 'auto_boundaries': levels {list(levels)} give the cut points {cuts}, not "
            f"distinct; use levels further apart or a finer exit_layers grid"
        )
    return cuts


__all__ = ["ExitStudy", "auto_boundaries", "run_exit_study", "study_key"]
