"""``cascade-bench run``: from a config to results, tables, plots and ``<name>.report.md``.

Steps: prepare the data; train the cascade with its protocol and the dense baseline, or load
them if a run with the same training settings already saved them (``models/<training key>/``),
or, with ``model`` set, cut that pretrained model into blocks (training only their exit heads
if asked);
evaluate every point (full cascade, each stage prefix, the dense model, routed and masked early
exit at every hard ratio of the sweep, routed early exit under every other exit rule of
``exit_rules`` at the same hard ratios (``rule_sweep``), one risk-controlled point per rule, the
oracle bound) on the test split with quality, analytic
FLOPs (counted too at the anchor points: every baseline and, per swept method, the hard ratio
nearest 0.5; at every point with ``count_flops="all"``), wall time over the first
``timing_batches`` test batches (and its ratio to the full cascade timed back to back on them) and
peak memory; append each point to the results store as soon as it is measured (a rerun with the
same config skips stored points, so an interrupted sweep resumes); then write the tables, the
plots and the report with its checks.

Under ``torchrun --nproc-per-node N`` (``measure.distributed``): rank 0 prepares the tokenizer and
trains (the others wait, then load what it saved); every evaluation, calibration, risk-control,
oracle and cost measurement is sharded over the N processes and combined exactly; rank 0 alone
writes records, tables, plots and the report; each record says how many ranks ran.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.prepare import hold_out_validation, prepare_data
from ..data.storage import write_json_atomic
from ..measure.distributed import concatenated, join_launch, main_first, same_parameters, sharded
from ..measure.timing import PhaseClock
from ..routing import compaction
from ..routing.passes import forward_cascade
from ..routing.stage_reuse import BatchReuse, RuleReuse, reuse_for
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.families import PER_TOKEN_CACHE_KINDS, layer_kinds
from ..stages.presets import STAGE_PRESETS
from ..training.persistence import save_ensemble
from .cascades import pretrained_blocks, pretrained_model, trained_cascade, trained_dense
from .config import ExperimentConfig
from .exit_study import run_exit_study, study_key
from .first_look import first_look
from .model_fit import fit_to_model, model_sizes
from .plots import make_plots, plot_exit_curve
from .points import anchor_ratio, plan_points
from .records import measured_config
from .reports import exit_curve_table, write_report, write_table
from .results_store import ResultsStore
from .sweep import BACK_TO_BACK_PAIRS, Sweep


def experiment_paths(config: ExperimentConfig) -> dict[str, Path]:
    out = config.out_dir
    return {
        "results": out / "results" / f"{config.name}.jsonl",
        "confidence": out / "results" / f"{config.name}.confidence.json",
        "models": out / "models" / config.saved_cascade_key(),
        "dense": out / "models" / config.dense_key() / "dense",
        "stage0": out / "models" / config.stage0_key() / "stage0",
        "tables": out / "results",
        "plots": out / "plots",
        "report": out / f"{config.name}.report.md",
        "tokenizers": out / "cache" / "tokenizers",
        "converted": out / "models" / "converted",
        "translators": out / "models" / study_key(config),
        "exit_study": out / "results" / f"{config.name}.exit_study.json",
        "run": out / "results" / f"{config.name}.run.json",
    }


def saved_cascade(spec: "Path | str") -> Path:
    """The folder of a saved cascade: ``spec`` itself, or for a run's TOML config the cascade that
    run saved (``models/<saved cascade key>/cascade`` under its ``out``)."""
    from .config import load_config_file, make_config

    spec = Path(spec)
    if spec.suffix == ".toml":
        return experiment_paths(make_config(load_config_file(spec)))["models"] / "cascade"
    return spec


def _check_resumable(store: ResultsStore, config: ExperimentConfig) -> None:
    """Stored points are reused only when they were measured under this very config."""
    current = measured_config(config.as_dict())
    for record in store:
        stored = measured_config((record.conditions or {}).get("config") or {})
        differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if differ:
            raise ValueError(
                f"{store.path} holds points measured with another config (keys {differ}: stored "
                f"{[stored.get(k) for k in differ]}, now {[current.get(k) for k in differ]}); give this "
                f"run another --name or --out, or delete that file to start over"
            )


def run_experiment(
    config: ExperimentConfig, progress: bool = True, on_point: Optional[Callable[[str], None]] = None
) -> dict[str, Path]:
    """Run (or resume) the experiment; returns the paths it wrote. ``on_point(point_id)`` is called
    after each new point is stored (tests use it to interrupt a sweep)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    clock = PhaseClock()
    ranks = join_launch(config.device)
    progress = progress and ranks.is_main
    paths = experiment_paths(config)
    store = ResultsStore(paths["results"])
    with clock("preparation"):
        pretrained, model_folder, model_source = (
            pretrained_model(config, paths["converted"], progress) if config.model else (None, None, None)
        )
        with main_first(ranks):  # rank 0 trains (or reads) the tokenizer cache the others then read
            data = prepared_data(config, paths, pretrained, model_folder)
        # every model-dependent setting checked against the model before anything is trained or measured
        config, adapted = fit_to_model(config, model_sizes(config, pretrained, data.tokenizer))
        for note in adapted if ranks.is_main else ():
            print(f"note: {note}")
        paths = experiment_paths(config)
        _check_resumable(store, config)
        looked = _first_look(config, pretrained, data, ranks) if pretrained is not None else None
        data, risk_calibration, validation, test = _sweep_splits(config, data)
    with clock("training"):
        if pretrained is not None:
            ensemble, training = _pretrained_cascade(
                config, pretrained, model_source, (data, validation, test), paths, ranks, progress
            )
        else:
            with main_first(ranks):  # rank 0 trains and saves; the others load what it saved
                ensemble, training = trained_cascade(config, data, paths, progress)
    kv_runnable = all(kind in PER_TOKEN_CACHE_KINDS for stage in ensemble for kind in layer_kinds(stage.config))
    timed = min(config.timing_batches, len(test)) if config.timing_batches else len(test)
    conditions = {
        **data.conditions,
        "split": config.eval_split,
        **_run_conditions(config, training, _measurement_note(config, timed, len(test)), kv_runnable),
        "adapted": adapted,
        **({"first_look": looked} if looked is not None else {}),
        **ranks.summary(),
    }

    def dense_model() -> tuple[Ensemble, dict]:
        with main_first(ranks):
            return trained_dense(config, data, paths["dense"], sum(ensemble.layers_per_stage), progress)

    splits = dict(train=data.train, validation=validation, test=test, risk_calibration=risk_calibration)
    measured = dict(conditions=conditions, ranks=ranks, dense_model=dense_model, timing_batches=timed)
    sweep = Sweep(config, ensemble, **splits, **measured, progress=progress, clock=clock)
    points = plan_points(config, len(ensemble), dense=pretrained is None, kv_policies=kv_runnable)
    with clock("sweep"):
        sweep.run(points, store, on_point)
    with clock("report"):
        _finish_run(sweep, store, paths, blocks_tokenizer=data.tokenizer if pretrained is not None else None)
    if ranks.is_main:
        write_json_atomic(paths["run"], run_summary(clock, sweep))
    return paths


def run_summary(clock: PhaseClock, sweep: Sweep) -> dict:
    """The run's own conditions (``results/<name>.run.json``): where this invocation's time went and
    what the sweep reused. ``seconds``: wall seconds per phase, exclusive (training inside the sweep,
    the dense model and the other exit rules' training, counts as training; the wall-time
    measurements inside the sweep as timing); ``sweep``: quality, FLOPs, calibration, risk control,
    the oracle and the intervals."""
    spent = clock.seconds
    inside = spent.get("training_in_sweep", 0.0) + spent.get("timing", 0.0)
    seconds = {
        "preparation": spent.get("preparation", 0.0),
        "training": spent.get("training", 0.0) + spent.get("training_in_sweep", 0.0),
        "sweep": spent.get("sweep", 0.0) - inside,
        "timing": spent.get("timing", 0.0),
        "report": spent.get("report", 0.0),
    }
    total = sum(seconds.values())
    return {
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "total_s": round(total, 1),
        "shares": {name: round(value / total, 3) if total else 0.0 for name, value in seconds.items()},
        "note": "this invocation only: a resumed run's earlier points and a reused trained model cost nothing here",
        "stage_reuse": sweep.reuse.summary() if sweep.reuse is not None else "off (reuse_memory_mb = 0)",
    }


def _finish_run(sweep: Sweep, store: ResultsStore, paths: dict, blocks_tokenizer=None) -> None:
    """After the sweep: blocks of a pretrained model saved at the anchor ratio's thresholds (with
    ``blocks_tokenizer``), stage 0's confidences kept, then (rank 0) the plots and the report."""
    config, ranks, training = sweep.config, sweep.ranks, sweep.conditions["training"]
    with sharded(ranks):
        if blocks_tokenizer is not None:
            # calibrated on every rank (a collective when sharded and not cached, as in a resumed
            # run); only then does rank 0 alone save
            anchor_thresholds = sweep.thresholds_at(sweep.anchor)
            if ranks.is_main:
                _save_blocks(sweep, anchor_thresholds, paths["models"] / "cascade", blocks_tokenizer, training)
        main_reuse = None if sweep.reuse is None else sweep.reuse.for_rule(config.exit_rule)
        confidences = None if paths["confidence"].exists() else _confidences(sweep.ensemble, sweep.test, main_reuse)
    if not ranks.is_main:
        return
    if confidences is not None:
        write_json_atomic(paths["confidence"], confidences)
    make_plots(list(store), paths["confidence"], paths["plots"], config.name)
    write_report(list(store), config, paths)


def _first_look(config: ExperimentConfig, pretrained, data, ranks) -> dict:
    """Minutes before the sweep: does the pretrained model predict anything? (its PPL on two
    validation batches, with a warning printed and kept when it does not look plausible)."""
    looked, warning = first_look(
        pretrained, data.validation, model_sizes(config, pretrained, None).vocab_size, config.plausible_ppl
    )
    if warning and ranks.is_main:
        print(f"warning: {warning}")
    looked["warning"] = warning
    return looked


def _sweep_splits(config: ExperimentConfig, data):
    """(data without risk control's held-out batches, those batches, the batches the sweep calibrates,
    risk-controls and early-stops its exit rules on, the scored batches). Nothing but risk control
    sees the held-out batches: not training, calibration nor scoring."""
    data, risk_calibration = hold_out_validation(data, config.risk_batches)
    scored = data.test if config.eval_split == "test" else data.validation
    validation = data.validation[: config.validation_batches] if config.validation_batches else data.validation
    test = scored[: config.eval_batches] if config.eval_batches else scored
    return data, risk_calibration, validation, test


def _pretrained_cascade(config, pretrained, model_source, splits, paths: dict, ranks, progress: bool):
    """Blocks of the pretrained model, and their training summary: the exit study first when the
    config asks for one (rank 0 trains and saves the translators; the others load them), then the
    blocks on every rank alike (trained heads: rank 0's on every rank)."""
    data, validation, test = splits
    study = None
    if config.exit_layers:
        with main_first(ranks):
            studied = test[: config.exit_study_batches] if config.exit_study_batches else test
            study = run_exit_study(
                config, pretrained, data.train, validation, studied, paths["translators"], progress, model_source
            )
        if ranks.is_main:
            _write_exit_study(study.summary, paths, config.name)
    ensemble, training = pretrained_blocks(config, pretrained, data, progress, study)
    if model_source is not None:
        training["model_source"] = model_source
    if config.block_heads == "trained":
        with sharded(ranks):
            same_parameters([ensemble])
    return ensemble, training


def _run_conditions(config: ExperimentConfig, training: dict, measured: str, kv_runnable: bool) -> dict:
    """What every record of the run states about the experiment: its config and training key, how
    the cascade was trained, the seed, what was measured how, and what was not run."""
    return {
        "config": config.as_dict(),
        "training_key": config.training_key(),
        "training": training,
        "seed": config.seed,
        "call_overhead_slots": compaction.CALL_OVERHEAD_SLOTS,
        "measured": measured,
        "not_run": {} if kv_runnable or not config.kv_policies else {"kv[policy]": KV_POLICIES_NOT_RUN},
    }


#: Why a cascade with memory layers gets no K/V-policy points.
KV_POLICIES_NOT_RUN = (
    "K/V policies need every layer to cache each token's keys and values; memory "
    "layers fold finished segments into a fixed-size state"
)


def prepared_data(config: ExperimentConfig, paths: dict, pretrained, model_folder):
    """The run's corpus tokenized into windows and batches (the pretrained model's tokenizer with
    ``tokenizer = "model"``; windows no longer than its position table)."""
    if pretrained is not None:
        max_positions = getattr(pretrained.config, "max_position_embeddings", None)
        model_vocab = pretrained.get_output_embeddings().weight.shape[0]
    else:
        max_positions, model_vocab = STAGE_PRESETS[config.preset]["max_position_embeddings"], None
    return prepare_data(
        config.corpus,
        model_folder if config.tokenizer == "model" else config.tokenizer,
        config.seq_len,
        config.batch_size,
        config.eval_stride,
        config.corpus_config or None,
        cache_dir=paths["tokenizers"],
        max_positions=max_positions,
        model_vocab_size=model_vocab,
    )


def _save_blocks(sweep: Sweep, thresholds: list, folder: Path, tokenizer, training: dict) -> None:
    """The blocks at the anchor's ``thresholds`` under the run's own rule, once (the folder is keyed by
    everything that shapes them: ``saved_cascade_key``): what bench-generate --cascade and lm-eval's
    cascade= load from the run's config. Runs on one rank: no collective in here."""
    if (folder / "cascade.json").exists():
        return
    ensemble, calibrated = sweep.ensemble, sweep.ensemble.thresholds
    ensemble.set_thresholds(thresholds)
    save_ensemble(
        ensemble,
        folder,
        tokenizer=tokenizer,
        extra={**training, "thresholds_for": f"hard ratio {sweep.anchor:g}, {sweep.config.exit_rule}"},
    )
    ensemble.set_thresholds(calibrated)


def _write_exit_study(summary: dict, paths: dict, name: str) -> None:
    """The exit study's JSON, table (md/tex/csv) and figure."""
    write_json_atomic(paths["exit_study"], summary)
    write_table(
        exit_curve_table(summary),
        paths["tables"] / f"{name}.exit_curve",
        f"{name}: exit after each candidate layer, shared head vs trained translator",
    )
    plot_exit_curve(summary, paths["plots"] / f"{name}.exit_curve")


def _measurement_note(config: ExperimentConfig, timed: int, batches: int) -> str:
    anchor = anchor_ratio(config)
    counted = (
        "every point"
        if config.count_flops == "all"
        else f"the baselines and the routed/masked/K/V-policy points at hard ratio {anchor:g}"
    )
    where = (
        ""
        if config.timing_points == "all"
        else f" at the baselines and the routed/masked/K/V-policy points at hard ratio {anchor:g} only "
        f"(the other points have quality and FLOPs, no wall time)"
    )
    return (
        f"quality on all {batches} {config.eval_split} batches; FLOPs counted with FlopCounterMode on {counted}, the analytic "  # noqa: E501
        f"count (equal to the counted one wherever both exist: see the checks) everywhere; wall time{where}: median of "
        f"{config.timing_repeats} passes over the first {timed} of the {batches} {config.eval_split} batches after one "
        f"warm-up, and the ratio to the full cascade timed back to back on them, batch by batch "
        f"(median of {BACK_TO_BACK_PAIRS} pairs)"
    )


def _confidences(ensemble: Ensemble, batches, reuse: Optional[RuleReuse] = None) -> dict:
    """Histogram of each non-last stage's confidences on the test split (no exit: every token;
    ``reuse``: what the sweep kept for these batches under the cascade's own rule)."""

    def per_batch(indexed) -> tuple:
        index, batch = indexed
        out = evaluate_pass(ensemble, batch, reuse_for(reuse, index))
        confidence = out.stage_confidence[: len(ensemble) - 1]
        return tuple(conf[~torch.isnan(conf)] for conf in confidence)

    with evaluation_mode(ensemble), torch.inference_mode():
        values = concatenated(per_batch, list(enumerate(batches)))
    histograms = []
    for k, conf in enumerate(values):
        conf = conf.float()
        low, high = float(conf.min()), float(conf.max())
        counts = torch.histc(conf, bins=50, min=low, max=high if high > low else low + 1e-6)
        histograms.append(
            {
                "stage": k,
                "exit_rule": ensemble[k].exit_rule.name,
                "min": low,
                "max": high,
                "counts": counts.long().tolist(),
                "tokens": int(conf.numel()),
            }
        )
    return {"histograms": histograms}


def evaluate_pass(ensemble: Ensemble, batch: dict, reuse: Optional[BatchReuse] = None):
    return forward_cascade(
        ensemble,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch.get("targets"),
        thresholds=[math.inf] * len(ensemble),
        reuse=reuse,
    )
