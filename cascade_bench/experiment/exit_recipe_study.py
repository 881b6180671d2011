"""The ``train-exits`` job: every exit recipe on one pretrained model, one budget, one table.

1. The run config gives the model, the scored split (the same windows ``cascade-bench run`` scores:
   the first ``eval_batches`` test batches) and the candidate layers (``exit_layers``).
2. Training text, the same for every recipe: the draft's offline text (``distillation.
   draft_text_sources``: the embedded corpus's train split less its paragraphs shared with the test
   split, standard-library source, a ``--corpus`` folder's train split), cut into windows up to the
   budget's tokens; held-out windows of its validation text steer early stopping.
3. The frozen model runs once over the training, validation and scored windows
   (``window_states``); the least-squares translators are fitted on the training windows.
4. Each recipe trains within the budget (``exit_recipes``) and is scored on the scored split: per
   layer top-1 agreement with full depth, PPL, accuracy; the oracle's mean layers needed over the
   candidates; for LoRA also the adapted model's full depth.
5. The estimate of routed early exit (``measure.exit_estimate``) for the frozen-trunk recipe with
   the best validation agreement, at the cut and threshold chosen on validation.

Writes ``results/<name>.exit_recipes.json`` (rows with ``recipe``, ``layer``, ``agreement``,
``ppl``, ``split``, ``train_tokens``, ``seconds``, ...), the tables ``results/<name>.exit_recipes``
and ``results/<name>.exit_recipes_summary`` (md/tex/csv), the figure ``plots/<name>.exit_recipes``, and
each frozen-trunk recipe's trained exits, ``results/<name>.exits/<recipe>.pt`` (``training.saved_exits``:
``bench-decode --exits`` drafts with them).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data.storage import write_json_atomic
from ..data.windows import encode_documents
from ..measure.environment import environment_conditions
from ..measure.exit_estimate import at_threshold, calibrated_threshold, exit_costs, token_exits
from ..measure.layer_exits import check_layers, layers_needed
from ..training.distillation import offline_text_groups, without_paragraphs_of
from ..training.exit_recipe_specs import EXIT_RECIPES, RecipeBudget, check_recipes
from ..training.exit_recipes import build_recipe, evaluate_recipe, scored_head_inputs, train_recipe
from ..training.exit_translators import fit_translators_lstsq, new_translators
from ..training.lora import DEFAULT_TARGETS, lora_targets
from ..training.saved_exits import SAVED_RECIPES, exits_path, save_exits
from ..training.window_states import WindowStates, balanced_token_windows, collect_window_states
from .cascades import pretrained_model
from .pipeline import experiment_paths, prepared_data
from .plots import pyplot, save_figure
from .reports import write_table

RECORD_VERSION = 1
#: PPL tolerance of the routed-exit estimate's threshold (within 5% of full depth on validation).
ESTIMATE_TOLERANCE = 0.05
#: The layers the issue's bar reads (agreement gain over least squares), when they are candidates.
BAR_LAYERS = (12, 16, 20)


def _check_model_fits(model, budget: RecipeBudget, recipes: Sequence[str]) -> None:
    """ValueError before the teacher's pass when the windows are longer than the model's positions, or
    LoRA finds none of its projections in the model."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and budget.window > positions:
        raise ValueError(f"--window {budget.window} is longer than the model's {positions} positions")
    if "lora" in recipes and not lora_targets(model):
        raise ValueError(
            f"recipe 'lora' finds none of the projections {list(DEFAULT_TARGETS)} in {type(model).__name__}; "
            "leave it out (--recipes lstsq lstsq+kl mlp adapter)"
        )


def _run_recipe(name: str, model, candidates, fitted: dict, states, budget: RecipeBudget, lstsq: dict, exits, progress):
    """Recipe ``name`` built from the least-squares translators ``fitted``, trained on the train and
    validation states and scored on the test states: its result, with the file its exits were saved
    to (``exits``: the folder and the model's name) for a recipe that saves them, and (the recipe,
    its kept agreement) for the routing estimate. The recipe is closed however it ends."""
    train, validation, test = states
    torch.manual_seed(budget.seed)  # each recipe's initialisation the same whichever ran before it
    recipe = build_recipe(name, model, candidates, fitted)
    try:
        history = train_recipe(recipe, train, validation, budget, progress)
        curve = evaluate_recipe(recipe, test, with_final=True)
        result = _recipe_result(recipe, history, curve, test, lstsq if name == "lstsq" else None)
        if name in SAVED_RECIPES:
            folder, model_name = exits
            result["exits_file"] = str(save_exits(recipe, exits_path(folder, name), model_name))
        return result, (recipe, history.kept_agreement)
    finally:
        recipe.close()


def _recipe_record(config, model, source, candidates, budget: RecipeBudget, text: dict, states, results) -> dict:
    """The job's record, up to its rows and recipes (the estimate, bar, phases and conditions follow)."""
    train, validation, test = states
    return {
        "version": RECORD_VERSION,
        "kind": "exit_recipes",
        "model": config.model,
        "source": source,
        "config": config.name,
        "num_layers": int(model.config.num_hidden_layers),
        "candidates": list(candidates),
        "budget": {**budget.__dict__, "scale_note": "--budget scales train_tokens and seconds"},
        "text": {
            **text,
            "train_tokens": train.tokens,
            "validation_tokens": validation.tokens,
            "scored_split": config.eval_split,
            "scored_tokens": test.tokens,
        },
        "full_depth_ppl": test.final_ppl,
        "shared_head": _shared_rows(model, test),
        "rows": [row for result in results for row in result["rows"]],
        "recipes": [{k: v for k, v in result.items() if k != "rows"} for result in results],
    }


def run_exit_recipes(
    config,
    recipes: Sequence[str],
    budget: RecipeBudget,
    layers: Optional[Sequence[int]] = None,
    corpus: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Steps 1-5 of the module docstring; returns the paths written."""
    recipes = check_recipes(recipes)
    if not config.model:
        raise ValueError("train-exits needs a pretrained model: set config key 'model' (e.g. configs/smollm2.toml)")
    if corpus is not None and not Path(corpus).is_dir():
        raise ValueError(f"--corpus {corpus} is not a folder")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    began = time.perf_counter()
    paths = experiment_paths(config)
    model, folder, source = pretrained_model(config, paths["converted"], progress)
    candidates = check_layers(layers or config.exit_layers, int(model.config.num_hidden_layers))
    _check_model_fits(model, budget, recipes)
    data = prepared_data(config, paths, model, folder)
    scored = data.test[: config.eval_batches] if config.eval_batches else data.test
    train_batches, validation_batches, text = _shared_text(data.tokenizer, budget, corpus)
    phases = {"loading": time.perf_counter() - began}
    if progress:
        print(f"the frozen model reads {len(train_batches)} + {len(validation_batches)} + {len(scored)} batches")
    started = time.perf_counter()
    train = collect_window_states(model, train_batches, candidates, budget.top_k)
    validation = collect_window_states(model, validation_batches, candidates, budget.top_k)
    test = collect_window_states(model, scored, candidates, budget.top_k)
    phases["teacher"] = time.perf_counter() - started
    started = time.perf_counter()
    translators = new_translators(model, candidates)
    lstsq = fit_translators_lstsq(model, translators, train.as_layer_states(), validation.as_layer_states())
    fitted = {layer: translators[str(layer)].eval() for layer in candidates}
    phases["lstsq"] = time.perf_counter() - started
    exits = (paths["tables"] / f"{config.name}.exits", config.model)
    results, trained, saved = [], {}, {}
    for name in recipes:
        states = (train, validation, test)
        result, kept = _run_recipe(name, model, candidates, fitted, states, budget, lstsq, exits, progress)
        results.append(result)
        if "exits_file" in result:
            saved[f"exits {name}"] = Path(result["exits_file"])
        if name != "lora":
            trained[name] = kept
        if progress:
            print(_recipe_line(result), flush=True)
    estimate = _routing_estimate(model, trained, validation, test)
    record = _recipe_record(config, model, source, candidates, budget, text, (train, validation, test), results)
    record.update(routing_estimate=estimate, bar=_bar(results))
    record["phase_seconds"] = {**phases, "total": time.perf_counter() - began}
    record["conditions"] = environment_conditions(model.device, model.dtype)
    return {**write_recipe_outputs(record, paths["tables"], paths["plots"], config.name), **saved}


def _shared_text(tokenizer, budget: RecipeBudget, corpus: Optional[Path]) -> tuple[list, list, dict]:
    """(training batches, validation batches, what they hold): ``offline_text_groups``, each group its
    own token stream and every group an equal share of the windows while it lasts; the validation
    text less every paragraph that also occurs in the training text."""
    train_groups, validation_groups = offline_text_groups(corpus)
    seen = [text for documents in train_groups.values() for text in documents]
    validation_groups = {name: without_paragraphs_of(docs, seen) for name, docs in validation_groups.items()}
    window, rows = budget.window, budget.batch_windows

    def streams(groups: dict) -> dict:
        return {name: encode_documents(tokenizer, docs) for name, docs in groups.items() if docs}

    train, train_taken = balanced_token_windows(streams(train_groups), window, budget.train_tokens, rows)
    held, held_taken = balanced_token_windows(streams(validation_groups), window, budget.validation_tokens, rows)
    return train, held, {"train_by_source": train_taken, "validation_by_source": held_taken}


def _recipe_result(recipe, history, curve, test: WindowStates, lstsq: Optional[dict]) -> dict:
    exits = [point for point in curve if point.layer in recipe.layers]
    oracle = layers_needed(exits, test.final_argmax[test.scored], test.num_layers)
    summary = history.summary()
    rows = [
        {
            "recipe": recipe.name,
            "layer": point.layer,
            "agreement": point.agreement,
            "ppl": point.ppl,
            "accuracy": point.accuracy,
            "split": "test",
            "train_tokens": None,  # filled by the caller's record: the same for every recipe
            "tokens_seen": summary["tokens_seen"][-1],
            "seconds": summary["seconds"],
            "trainable_parameters": summary["trainable_parameters"],
            "converged": summary["converged"],
        }
        for point in exits
    ]
    result = {
        "recipe": recipe.name,
        "training": summary,
        "layers_needed": {"first_agreement": oracle.first_agreement, "settled": oracle.settled},
        "rows": rows,
        **recipe.extra(),
    }
    adapted = [point for point in curve if point.layer == test.num_layers]
    if adapted:
        result["adapted_full_depth"] = {"ppl": adapted[0].ppl, "agreement_with_original": adapted[0].agreement}
    if lstsq is not None:
        result["lstsq"] = {
            "seconds": lstsq["seconds"],
            "ridges": {str(k): v["ridge"] for k, v in lstsq["layers"].items()},
        }
        for row in rows:
            row["seconds"] = lstsq["seconds"]
    return result


def _recipe_line(result: dict) -> str:
    cells = ", ".join(f"{row['layer']}: {row['agreement']:.3f}" for row in result["rows"])
    return f"{result['recipe']}: agreement with full depth by layer {cells} ({result['training']['stop_reason']})"


def _shared_rows(model, test: WindowStates) -> list[dict]:
    """The model's own norm + head at the candidates (no exit training at all), for reference."""
    from ..measure.layer_exits import exit_curve, shared_head

    return [
        {"layer": p.layer, "agreement": p.agreement, "ppl": p.ppl, "accuracy": p.accuracy}
        for p in exit_curve(test.as_layer_states(), shared_head(model))
    ]


def _routing_estimate(model, trained: dict, validation: WindowStates, test: WindowStates) -> dict:
    """The estimate for the frozen-trunk recipe of best validation agreement: per cut, the threshold
    calibrated on validation; the cut with the lowest validation FLOP ratio; test figures there."""
    from ..training.exit_recipes import final_head

    if not trained:
        return {"not_run": "no frozen-trunk recipe was trained"}
    name = max(trained, key=lambda n: trained[n][1])
    recipe = trained[name][0]
    head = final_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]

    def costs(layer: int, states: WindowStates):  # attention over that split's own windows
        window = int(states.input_ids.shape[1])
        return exit_costs(model.config, window, _exit_macs(recipe.exits[str(layer)], window), vocab)

    held = scored_head_inputs(recipe, validation, recipe.layers)
    scored = scored_head_inputs(recipe, test, recipe.layers)
    choices = []
    for layer in recipe.layers:
        tokens = token_exits(held, layer, head)
        threshold = calibrated_threshold(tokens, ESTIMATE_TOLERANCE)
        choices.append((at_threshold(tokens, threshold, layer, costs(layer, validation)).flop_ratio, layer, threshold))
    _, layer, threshold = min(choices, key=lambda c: (c[0], c[1]))
    estimate = at_threshold(token_exits(scored, layer, head), threshold, layer, costs(layer, test))
    return {
        "recipe": name,
        "chosen_on": "validation (recipe: best mean agreement; cut: lowest FLOP ratio; threshold: lowest with PPL "
        f"within {ESTIMATE_TOLERANCE:.0%} of full depth)",
        "validation_flop_ratio_by_cut": {str(c[1]): c[0] for c in choices},
        "test": estimate.as_dict(),
    }


def _exit_macs(module, window: int) -> int:
    """Multiply-adds per token of an exit's own layers before the shared head: its matrices, and for an
    attention adapter its attention over a ``window``-token window (counted full)."""
    macs = sum(p.numel() for p in module.parameters() if p.dim() == 2)
    layer = getattr(module, "layer", None)
    if layer is not None:
        from ..measure.analytic import attention_macs
        from ..stages.families import layer_shape

        macs += attention_macs(layer_shape(module.runner.config), 1, window) // window
    return macs


def _bar(results: list[dict]) -> dict:
    """The issue's bar: the best recipe's agreement gain over least squares at the bar layers."""
    by = {(row["recipe"], row["layer"]): row["agreement"] for result in results for row in result["rows"]}
    layers = [layer for layer in BAR_LAYERS if ("lstsq", layer) in by]
    if not layers:
        return {"not_read": f"needs lstsq among the recipes and candidate layers among {list(BAR_LAYERS)}"}
    gains = {
        result["recipe"]: {str(layer): by[(result["recipe"], layer)] - by[("lstsq", layer)] for layer in layers}
        for result in results
        if result["recipe"] != "lstsq"
    }
    best = max(gains, key=lambda name: min(gains[name].values()), default=None)
    return {
        "layers": layers,
        "gain_over_lstsq": gains,
        "best_recipe": best,
        "best_min_gain": None if best is None else min(gains[best].values()),
        "target": 0.10,
    }


def recipe_tables(record: dict):
    """(per recipe and layer, per recipe) pandas DataFrames."""
    import pandas as pd

    lstsq = {row["layer"]: row["agreement"] for row in record["rows"] if row["recipe"] == "lstsq"}
    shared = {row["layer"]: row for row in record["shared_head"]}
    layers_rows = []
    for layer in record["candidates"]:
        line = {"exit after layer": layer, "shared head": f"{shared[layer]['agreement']:.3f}"}
        for row in (r for r in record["rows"] if r["layer"] == layer):
            gain = row["agreement"] - lstsq[layer] if layer in lstsq and row["recipe"] != "lstsq" else math.nan
            cell = f"{row['agreement']:.3f}" + ("" if math.isnan(gain) else f" ({gain:+.3f})")
            line[row["recipe"]] = cell
            line[f"PPL {row['recipe']}"] = f"{row['ppl']:,.2f}"
        layers_rows.append(line)
    summary_rows = []
    for recipe in record["recipes"]:
        training, needed = recipe["training"], recipe["layers_needed"]
        adapted = recipe.get("adapted_full_depth")
        summary_rows.append(
            {
                "recipe": recipe["recipe"],
                f"oracle layers needed (of {record['num_layers']})": f"{needed['first_agreement']:.2f}",
                "trainable parameters": f"{training['trainable_parameters']:,}",
                "training tokens": f"{record['text']['train_tokens']:,}",
                "tokens trained on (all layers)": f"{training['tokens_seen'][-1]:,}",
                "seconds": f"{recipe['lstsq']['seconds'] if 'lstsq' in recipe else training['seconds']:.0f}",
                "stopped by": training["stop_reason"],
                "full depth PPL": f"{adapted['ppl']:.3f} (adapted)" if adapted else f"{record['full_depth_ppl']:.3f}",
            }
        )
    return pd.DataFrame(layers_rows), pd.DataFrame(summary_rows)


def plot_recipes(record: dict, stem: Path) -> list[Path]:
    """Agreement with full depth per candidate layer, one line per recipe (and the shared head), and
    each trained recipe's validation agreement against the tokens it trained on."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    shared = record["shared_head"]
    left.plot(
        [r["layer"] for r in shared], [r["agreement"] for r in shared], "o--", color="tab:gray", label="shared head"
    )
    for recipe in record["recipes"]:
        name = recipe["recipe"]
        color = f"C{EXIT_RECIPES.index(name)}"  # one colour per recipe in both panels
        rows = [r for r in record["rows"] if r["recipe"] == name]
        left.plot([r["layer"] for r in rows], [r["agreement"] for r in rows], "s-", color=color, label=name)
        training = recipe["training"]
        if len(training["tokens_seen"]) > 1:
            right.plot(training["tokens_seen"], training["mean_agreement"], ".-", color=color, label=name)
    left.set_xlabel("exit after layer")
    left.set_ylabel("top-1 agreement with full depth (test)")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    right.set_xlabel("tokens trained on (all exit layers together)")
    right.set_ylabel("validation agreement (mean over layers)")
    if right.lines:  # only least squares asked: nothing trained, no curve
        right.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"{record['config']} ({record['model']}): exit recipes, {record['text']['scored_tokens']:,} scored tokens"
    )
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def rewrite_recipe_outputs(json_path: Path, plots: Path) -> dict[str, Path]:
    """The tables and the figure again from a stored record (``train-exits --tables-from``), beside it
    and in ``plots``; the record itself is not rewritten."""
    import json

    json_path = Path(json_path)
    if not json_path.is_file():
        raise ValueError(f"--tables-from {json_path}: no such file")
    if not json_path.name.endswith(".exit_recipes.json"):
        raise ValueError(f"--tables-from {json_path}: expected a <name>.exit_recipes.json written by train-exits")
    record = json.loads(json_path.read_text())
    name = json_path.name.removesuffix(".exit_recipes.json")
    return _tables_and_plot(record, json_path.parent, Path(plots), name)


def _tables_and_plot(record: dict, tables: Path, plots: Path, name: str) -> dict[str, Path]:
    by_layer, summary = recipe_tables(record)
    return {
        "table": write_table(by_layer, tables / f"{name}.exit_recipes", f"{name}: agreement by exit recipe")[0],
        "summary": write_table(summary, tables / f"{name}.exit_recipes_summary", f"{name}: exit recipes")[0],
        "plot": plot_recipes(record, plots / f"{name}.exit_recipes")[0],
    }


def write_recipe_outputs(record: dict, tables: Path, plots: Path, name: str) -> dict[str, Path]:
    """The record's JSON, its two tables (md/tex/csv) and its figure."""
    for row in record["rows"]:
        row["train_tokens"] = record["text"]["train_tokens"]
    json_path = tables / f"{name}.exit_recipes.json"
    write_json_atomic(json_path, record)
    return {"record": json_path, **_tables_and_plot(record, tables, plots, name)}


__all__ = ["plot_recipes", "recipe_tables", "rewrite_recipe_outputs", "run_exit_recipes", "write_recipe_outputs"]
