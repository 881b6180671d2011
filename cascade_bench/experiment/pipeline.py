"""``cascade-bench run``: from a config to results, tables, plots and ``report.md``.

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

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Callable, Optional

import torch

from ..cost.measurement import measure_cost
from ..data.prepare import PreparedData, hold_out_validation, prepare_data
from ..data.storage import write_json_atomic
from ..measure.distributed import (
    all_ranks,
    from_main,
    gathered,
    join_launch,
    main_first,
    same_parameters,
    shard,
    sharded,
)
from ..measure.environment import environment_conditions
from ..measure.timing import interleaved_ratio
from ..routing import compaction
from ..routing.calibration import calibrate_sweep
from ..routing.oracle import oracle_bound
from ..routing.passes import forward_cascade
from ..routing.risk_control import risk_controlled_thresholds, routed_violations
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.families import PER_TOKEN_CACHE_KINDS, layer_kinds, register_own_families
from ..stages.model_source import resolve_model
from ..stages.presets import STAGE_PRESETS, build_ensemble
from ..training.loops import TrainConfig
from ..training.persistence import load_ensemble, load_manifest, save_ensemble
from ..training.protocols import (
    exit_heads_ppl,
    start_ensemble,
    train_dense_baseline,
    train_exit_heads,
    train_protocol,
    with_leaky_seed_protocol,
)
from .config import ExperimentConfig
from .exit_study import ExitStudy, auto_boundaries, exit_curve_table, plot_exit_curve, run_exit_study, study_key
from .results_store import ResultsStore
from .rule_sweep import BuiltRule, build_rule, decision_agreement, stage0_confidences, using_rule


def experiment_paths(config: ExperimentConfig) -> dict[str, Path]:
    out = config.out_dir
    return {
        "results": out / "results" / f"{config.name}.jsonl",
        "confidence": out / "results" / f"{config.name}.confidence.json",
        "models": out / "models" / config.training_key(),
        "dense": out / "models" / config.dense_key() / "dense",
        "stage0": out / "models" / config.stage0_key() / "stage0",
        "tables": out / "results",
        "plots": out / "plots",
        "report": out / "report.md",
        "tokenizers": out / "cache" / "tokenizers",
        "converted": out / "models" / "converted",
        "translators": out / "models" / study_key(config),
        "exit_study": out / "results" / f"{config.name}.exit_study.json",
    }


def saved_cascade(spec: "Path | str") -> Path:
    """The folder of a saved cascade: ``spec`` itself, or for a run's TOML config the cascade that
    run saved (``models/<training key>/cascade`` under its ``out``)."""
    from .config import load_config_file, make_config

    spec = Path(spec)
    if spec.suffix == ".toml":
        return experiment_paths(make_config(load_config_file(spec)))["models"] / "cascade"
    return spec


def _dtype(config: ExperimentConfig) -> torch.dtype:
    return getattr(torch, config.dtype)


def _protocol(config: ExperimentConfig):
    protocol = dataclasses.replace(config.training_protocol, max_epochs=config.max_epochs, exit_fn=config.exit_fn)
    return with_leaky_seed_protocol(protocol) if config.leaky_seed_protocol else protocol


def _stage_summary(protocol, report) -> list[dict]:
    return [
        {
            "stage": s.stage,
            "layers": protocol.layers[s.stage],
            "lr": protocol.lrs[s.stage],
            "hard_tokens_trained_on": s.hard_tokens,
            "threshold_calibrated": s.threshold_before,
            "validation_ppl": s.validation.ppl,
            "validation_hard_ppl": s.validation.hard_ppl,
            "validation_hard_ppl_stage0": s.validation.hard_ppl_stage0,
            "trainable_parameters": s.trainable_parameters,
            "parameters": s.parameters,
            **s.selection,
            **s.history.summary(),
        }
        for s in report.stages
    ]


def _trained_stage0(
    config: ExperimentConfig, protocol, data: PreparedData, folder: Path, progress: bool
) -> tuple[Ensemble, list[dict]]:
    """Stage 0 of a staged protocol, trained alone or loaded from ``folder`` (keyed by
    ``config.stage0_key()``: shared by runs whose stage 0 trains identically), with its summary."""
    if (folder / "cascade.json").exists():
        return load_ensemble(folder, config.device, _dtype(config)), load_manifest(folder)["extra"]["stages"]
    first = protocol.prefix(1)
    ensemble = start_ensemble(
        first,
        config.preset,
        exit_fn=config.exit_fn,
        seed=config.seed,
        device=config.device,
        dtype=_dtype(config),
        vocab_size=len(data.tokenizer),
    )
    report = train_protocol(
        ensemble,
        data.train,
        data.validation,
        first,
        seed=config.seed,
        max_steps_per_epoch=config.max_steps_per_epoch or None,
        progress=progress,
    )
    stages = _stage_summary(first, report)
    save_ensemble(ensemble, folder, tokenizer=data.tokenizer, extra={"stages": stages})
    return ensemble, stages


def _trained_cascade(
    config: ExperimentConfig, data: PreparedData, paths: dict, progress: bool
) -> tuple[Ensemble, dict]:
    folder = paths["models"] / "cascade"
    if (folder / "cascade.json").exists():
        return load_ensemble(folder, config.device, _dtype(config)), load_manifest(folder)["extra"]
    protocol = _protocol(config)
    summary = {
        "protocol": protocol.name,
        "stage_kind": protocol.stage_kind,
        "training": protocol.training,
        "grows": protocol.grows,
        "hard_ratio": protocol.hard_ratio,
        "exit_head": protocol.exit_head,
        "lr_decay": protocol.lr_decay,
        "hard_examples": protocol.hard_examples,
    }
    if protocol.training == "staged":
        ensemble, stages = _trained_stage0(config, protocol, data, paths["stage0"], progress)
        report = train_protocol(
            ensemble,
            data.train,
            data.validation,
            protocol,
            seed=config.seed,
            max_steps_per_epoch=config.max_steps_per_epoch or None,
            progress=progress,
            trained_stages=1,
        )
        summary["stages"] = stages + _stage_summary(protocol, report)
    else:
        ensemble = start_ensemble(
            protocol,
            config.preset,
            exit_fn=config.exit_fn,
            seed=config.seed,
            device=config.device,
            dtype=_dtype(config),
            vocab_size=len(data.tokenizer),
        )
        report = train_protocol(
            ensemble,
            data.train,
            data.validation,
            protocol,
            seed=config.seed,
            max_steps_per_epoch=config.max_steps_per_epoch or None,
            progress=progress,
        )
        summary["stages"] = []
        summary["joint"] = {
            "layers": sum(protocol.layers),
            "lr": protocol.lrs[0],
            "layer_weights": list(protocol.layer_weights),
            "validation_ppl": report.validation.ppl,
            **report.joint.summary(),
        }
    save_ensemble(ensemble, folder, tokenizer=data.tokenizer, extra=summary)
    return ensemble, summary


def _pretrained_model(config: ExperimentConfig, folder: Path, progress: bool):
    """(the model, the folder it loaded from, its source record or None): ``config.model`` resolved
    (a GGUF file or distribution converted once into ``folder``) and loaded."""
    from transformers import AutoModelForCausalLM

    register_own_families()
    path, source = resolve_model(config.model, folder, progress=progress)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(config))
    except (OSError, ValueError) as error:
        raise ValueError(f"config key 'model': could not load {config.model!r} as a causal LM: {error}") from error
    return model.to(config.device).eval(), path, source


def _pretrained_blocks(
    config: ExperimentConfig, model, data: PreparedData, progress: bool, study: Optional[ExitStudy] = None
) -> tuple[Ensemble, dict]:
    """The pretrained model cut into blocks; with ``block_heads="trained"`` the non-last blocks'
    own exit heads are trained on the train split with the model frozen (retrained on every run:
    deterministic for a seed, so a resumed sweep measures the same heads); with ``"translator"``
    they exit through the exit study's translators at their boundaries."""
    heads = {"trained": "own", "translator": "translator"}.get(config.block_heads, "shared")
    boundaries = list(config.boundaries) or auto_boundaries(
        config.auto_boundaries, study.summary["translators"]["validation_curve"]
    )
    ensemble = Ensemble.from_blocks(model, boundaries, exit_fn=config.exit_fn, heads=heads)
    summary = {
        "model": config.model,
        "boundaries": boundaries,
        "boundaries_chosen_by": (
            f"auto_boundaries {list(config.auto_boundaries)} on the validation split's translator agreement"
            if config.auto_boundaries
            else "config"
        ),
        "layers_per_block": list(ensemble.layers_per_stage),
        "block_heads": config.block_heads,
    }
    if config.block_heads == "translator":
        for block, boundary in zip(ensemble, boundaries):
            block.head.translator.load_state_dict(study.translator(boundary).state_dict())
            block.head.translator.requires_grad_(False)
        # closed-form fits (or their own early stopping): reported in the exit study, not as a trained part
        summary["exit_translators"] = {
            key: study.summary["translators"].get(key)
            for key in ("fit", "train_tokens", "parameters_per_layer", "seconds")
        }
    if config.block_heads == "trained":
        before = exit_heads_ppl(ensemble, data.validation)
        history = train_exit_heads(
            ensemble,
            data.train,
            data.validation,
            TrainConfig(
                lr=1e-3,
                patience=1,
                max_epochs=config.max_epochs,
                seed=config.seed,
                max_steps_per_epoch=config.max_steps_per_epoch or None,
            ),
            progress=progress,
        )
        summary.update(
            exit_heads_val_ppl_before=list(before),
            exit_heads_val_ppl_after=list(exit_heads_ppl(ensemble, data.validation)),
            exit_heads=history.summary(),
        )
    return ensemble, summary


def _trained_dense(
    config: ExperimentConfig, data: PreparedData, folder: Path, total_layers: int, progress: bool
) -> tuple[Ensemble, dict]:
    """The dense baseline (one model of the cascade's total depth, stage 0's recipe, all data) and
    its training summary."""
    if (folder / "cascade.json").exists():
        return load_ensemble(folder, config.device, _dtype(config)), load_manifest(folder)["extra"]
    dense = build_ensemble(
        config.preset,
        (total_layers,),
        exit_fn=config.exit_fn,
        seed=config.seed,
        device=config.device,
        dtype=_dtype(config),
        vocab_size=len(data.tokenizer),
    )
    lr, patience = config.dense_recipe
    history = train_dense_baseline(
        dense[0],
        data.train,
        data.validation,
        TrainConfig(
            lr=lr,
            patience=patience,
            max_epochs=config.max_epochs,
            seed=config.seed,
            max_steps_per_epoch=config.max_steps_per_epoch or None,
        ),
        progress=progress,
    )
    summary = {"baseline": "dense", "layers": total_layers, "lr": lr, **history.summary()}
    save_ensemble(dense, folder, extra=summary)
    return dense, summary


def _record(point_id: str, method: str, cost, hard_ratio: Optional[float] = None, **extra) -> dict:
    q = cost.quality
    return {
        "point_id": point_id,
        "method": method,
        "hard_ratio": hard_ratio,
        "thresholds": list(q.thresholds),
        "layers_per_stage": list(q.layers_per_stage),
        "tokens": q.tokens,
        "routed_tokens": q.routed_tokens,
        "ppl": q.ppl,
        "accuracy": q.accuracy,
        "hard_ppl": q.hard_ppl,
        "easy_ppl": q.easy_ppl,
        "hard_ppl_stage0": q.hard_ppl_stage0,
        "hard_tokens": q.hard_tokens,
        "exit_ratios": list(q.exit_ratios),
        "tokens_entered": list(q.tokens_entered),
        "tokens_exited": list(q.tokens_exited),
        "layer_cost": q.layer_cost,
        "padding_waste": list(q.padding_waste),
        "flops": cost.flops,
        "flops_analytic": cost.flops_analytic,
        "time_median_s": cost.time_median_s,
        "time_iqr_s": cost.time_iqr_s,
        "tokens_per_s": cost.tokens_per_s,
        "peak_memory_bytes": cost.peak_memory_bytes,
        "memory_measure": cost.memory_measure,
        "decision_flops": cost.decision_flops,
        "counting_overhead": cost.counting_overhead,
        "conditions": cost.conditions,
        **extra,
    }


def _check_resumable(store: ResultsStore, config: ExperimentConfig) -> None:
    """Stored points are reused only when they were measured under this very config."""
    current = {k: v for k, v in config.as_dict().items() if k != "out"}
    for record in store:
        stored = {k: v for k, v in ((record.get("conditions") or {}).get("config") or {}).items() if k != "out"}
        differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if differ:
            raise ValueError(
                f"{store.path} holds points measured with another config (keys {differ}: stored "
                f"{[stored.get(k) for k in differ]}, now {[current.get(k) for k in differ]}); give this "
                f"run another --name or --out, or delete that file to start over"
            )


def _anchor_ratio(config: ExperimentConfig) -> float:
    """The swept hard ratio nearest 0.5: its routed and masked points are counted with FlopCounterMode."""
    return min(config.hard_ratios, key=lambda r: (abs(r - 0.5), r))


def _risk_calibration_note(config: ExperimentConfig) -> str:
    """Which batches risk control calibrated and tested on, and what else used them."""
    if config.risk_batches:
        return (
            f"held out: the last {config.risk_batches} validation batches, which nothing else uses "
            f"(training, early stopping, calibration and scoring never see them)"
        )
    return (
        "shared: the validation batches that also early-stopped training and calibrated the sweep "
        "(risk_batches = 0), so the guarantee rests on reused data"
    )


def run_experiment(
    config: ExperimentConfig, progress: bool = True, on_point: Optional[Callable[[str], None]] = None
) -> dict[str, Path]:
    """Run (or resume) the experiment; returns the paths it wrote. ``on_point(point_id)`` is called
    after each new point is stored (tests use it to interrupt a sweep)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    ranks = join_launch(config.device)
    progress = progress and ranks.is_main
    paths = experiment_paths(config)
    store = ResultsStore(paths["results"])
    _check_resumable(store, config)
    pretrained, model_folder, model_source = (
        _pretrained_model(config, paths["converted"], progress) if config.model else (None, None, None)
    )
    if pretrained is not None:
        max_positions = getattr(pretrained.config, "max_position_embeddings", None)
        model_vocab = pretrained.get_output_embeddings().weight.shape[0]
    else:
        max_positions, model_vocab = STAGE_PRESETS[config.preset]["max_position_embeddings"], None
    with main_first(ranks):  # rank 0 trains (or reads) the tokenizer cache the others then read
        tokenizer = model_folder if config.tokenizer == "model" else config.tokenizer
        data = prepare_data(
            config.corpus,
            tokenizer,
            config.seq_len,
            config.batch_size,
            config.eval_stride,
            config.corpus_config or None,
            cache_dir=paths["tokenizers"],
            max_positions=max_positions,
            model_vocab_size=model_vocab,
        )
    # risk control's own batches: nothing below (training, calibration, scoring) sees them
    data, risk_calibration = hold_out_validation(data, config.risk_batches)
    scored = data.test if config.eval_split == "test" else data.validation
    # what the sweep calibrates, risk-controls and early-stops its exit rules on
    validation = data.validation[: config.validation_batches] if config.validation_batches else data.validation
    test = scored[: config.eval_batches] if config.eval_batches else scored
    study = None
    if pretrained is not None and config.exit_layers:
        with main_first(ranks):  # rank 0 trains and saves the translators; the others load them
            study = run_exit_study(
                config, pretrained, data.train, validation, test, paths["translators"], progress, model_source
            )
        if ranks.is_main:
            _write_exit_study(study.summary, paths, config.name)
    if pretrained is not None:
        cascade, training = _pretrained_blocks(config, pretrained, data, progress, study)  # on every rank alike
        if model_source is not None:
            training["model_source"] = model_source
        saved = paths["models"] / "cascade"
        if config.block_heads == "trained":
            with sharded(ranks):
                same_parameters([cascade])  # rank 0's trained heads on every rank
    else:
        with main_first(ranks):  # rank 0 trains and saves; the others load what it saved
            cascade, training = _trained_cascade(config, data, paths, progress)
    calibrated = cascade.thresholds
    not_run = {}
    if config.kv_policies and any(
        kind not in PER_TOKEN_CACHE_KINDS for stage in cascade for kind in layer_kinds(stage.config)
    ):
        not_run["kv[policy]"] = (
            "K/V policies need every layer to cache each token's keys and values; memory "
            "layers fold finished segments into a fixed-size state"
        )
    timed = min(config.timing_batches, len(test)) if config.timing_batches else len(test)
    conditions = {
        **data.conditions,
        "split": config.eval_split,
        "config": config.as_dict(),
        "training_key": config.training_key(),
        "training": training,
        "seed": config.seed,
        "call_overhead_slots": compaction.CALL_OVERHEAD_SLOTS,
        "measured": _measurement_note(config, timed, len(test)),
        "not_run": not_run,
        **ranks.summary(),
    }
    common = dict(
        warmup=1, repeats=config.timing_repeats, fvcore=False, spans=False, conditions=conditions, timing_batches=timed
    )
    anchor = _anchor_ratio(config)

    def counted(ratio: Optional[float] = None) -> bool:
        return config.count_flops == "all" or ratio is None or ratio == anchor

    def is_timed(ratio: Optional[float] = None) -> bool:
        return config.timing_points == "all" or ratio is None or ratio == anchor

    main_rule = config.exit_fn
    built: dict[str, BuiltRule] = {}

    def rule(spec: str) -> Optional[BuiltRule]:
        """The built rule for ``spec``, None for the rule the cascade was trained with (already in place)."""
        if spec == main_rule:
            return None
        if spec not in built:
            built[spec] = build_rule(
                spec,
                cascade,
                data.train,
                validation,
                config.classifier_target,
                config.seed,
                progress,
                max_epochs=config.max_epochs,
                max_steps_per_epoch=config.max_steps_per_epoch or None,
                max_tokens=config.exit_train_tokens or None,
                anchor_ratio=anchor,
            )
        return built[spec]

    thresholds_cache: dict[tuple[str, float], list[float]] = {}

    def thresholds_at(ratio: float, spec: str = main_rule) -> list[float]:
        """Quantile thresholds on the validation batches under ``spec`` (the rule in place when
        called), calibrated for every swept ratio at once (``calibrate_sweep``)."""
        if (spec, ratio) not in thresholds_cache:
            ratios = sorted(set(config.hard_ratios) | {ratio})
            for r, thresholds in calibrate_sweep(cascade, validation, ratios).items():
                thresholds_cache[(spec, r)] = list(thresholds)
        return thresholds_cache[(spec, ratio)]

    exact: dict[str, torch.Tensor] = {}

    def agreement_with_max_prob(ratio: float, spec: str) -> float:
        """Stage-0 decisions of an approximate max-prob rule vs exact max_prob's, each at its own
        thresholds for ``ratio``, over the scored test tokens."""
        cheap = stage0_confidences(cascade, test)
        with using_rule(cascade, BuiltRule("max_prob", ["max_prob"] * (len(cascade) - 1))):
            if "max_prob" not in exact:
                exact["max_prob"] = stage0_confidences(cascade, test)
            reference = thresholds_at(ratio, "max_prob")[0]
        return decision_agreement(cheap, thresholds_at(ratio, spec)[0], exact["max_prob"], reference)

    def routed_point(spec: str, ratio: float) -> dict:
        point_id = f"routed@{ratio:g}" if spec == main_rule else f"routed[{spec}]@{ratio:g}"
        cost = measure_cost(
            cascade,
            test,
            "routed",
            thresholds=thresholds_at(ratio, spec),
            batching=config.batching,
            count_flops=counted(ratio),
            timed=is_timed(ratio),
            **common,
        )
        extra = {"exit_rule": spec}
        if spec in built:
            extra["rule_training"] = built[spec].training
            if built[spec].approximates_max_prob:
                extra["agreement_with_max_prob"] = agreement_with_max_prob(ratio, spec)
        return _record(point_id, "routed", cost, hard_ratio=ratio, **extra)

    def risk_point(spec: str) -> dict:
        result = risk_controlled_thresholds(
            cascade,
            risk_calibration or validation,
            config.risk_delta,
            config.risk_epsilon,
            config.risk,
            config.risk_nll_tolerance,
            batching=config.batching,
        )
        cost = measure_cost(
            cascade,
            test,
            "routed",
            thresholds=list(result.thresholds),
            batching=config.batching,
            count_flops=False,
            timed=config.timing_points == "all",
            **common,
        )
        violations, tokens = routed_violations(
            cascade, test, result.thresholds, config.risk, config.risk_nll_tolerance, batching=config.batching
        )
        return _record(
            f"risk[{spec}]",
            "risk_controlled",
            cost,
            hard_ratio=result.hard_ratio,
            exit_rule=spec,
            risk_control={**result.summary(), "calibration": _risk_calibration_note(config)},
            realised_risk=violations / tokens,
            realised_violations=violations,
            **({"rule_training": built[spec].training} if spec in built else {}),
        )

    def kv_point(policy: str) -> dict:
        cost = measure_cost(
            cascade,
            test,
            "routed",
            thresholds=thresholds_at(anchor),
            batching="padded",
            kv_policy=policy,
            count_flops=True,
            **common,
        )
        q = cost.quality
        return _record(
            f"kv[{policy}]@{anchor:g}",
            "kv_routed",
            cost,
            hard_ratio=anchor,
            exit_rule=main_rule,
            kv_policy=policy,
            batching="padded",
            tokens_computed=list(q.tokens_computed),
            tokens_propagated=list(q.tokens_propagated),
        )

    points: list[tuple[str, Callable[[], dict], str]] = []
    if "full" in config.baselines:
        points.append(
            ("full", lambda: _record("full", "full", measure_cost(cascade, test, "full", **common)), main_rule)
        )
    if "prefix" in config.baselines:
        for k in range(len(cascade) - 1):
            points.append(
                (
                    f"prefix-{k}",
                    lambda k=k: _record(
                        f"prefix-{k}",
                        "prefix",
                        measure_cost(cascade, test, "full", num_stages=k + 1, **common),
                        stages=k + 1,
                    ),
                    main_rule,
                )
            )
    if "dense" in config.baselines and pretrained is None:  # blocks: the unsplit model is the "full" point

        def dense_point():
            with main_first(ranks):
                dense, summary = _trained_dense(config, data, paths["dense"], sum(cascade.layers_per_stage), progress)
            record = _record("dense", "dense", measure_cost(dense, test, "full", **common))
            record["conditions"] = {**record["conditions"], "dense_training": summary}
            return record

        points.append(("dense", dense_point, main_rule))
    for ratio in config.hard_ratios:
        points.append((f"routed@{ratio:g}", lambda ratio=ratio: routed_point(main_rule, ratio), main_rule))
        if "masked" in config.baselines:
            points.append(
                (
                    f"masked@{ratio:g}",
                    lambda ratio=ratio: _record(
                        f"masked@{ratio:g}",
                        "masked",
                        measure_cost(
                            cascade,
                            test,
                            "masked",
                            thresholds=thresholds_at(ratio),
                            count_flops=counted(ratio),
                            timed=is_timed(ratio),
                            **common,
                        ),
                        hard_ratio=ratio,
                        exit_rule=main_rule,
                    ),
                    main_rule,
                )
            )
    for spec in config.exit_rules:
        if spec != main_rule:
            for ratio in config.hard_ratios:
                points.append(
                    (f"routed[{spec}]@{ratio:g}", lambda ratio=ratio, spec=spec: routed_point(spec, ratio), spec)
                )
    if config.risk:
        for spec in dict.fromkeys((main_rule, *config.exit_rules)):
            points.append((f"risk[{spec}]", lambda spec=spec: risk_point(spec), spec))
    for policy in () if "kv[policy]" in not_run else config.kv_policies:
        points.append((f"kv[{policy}]@{anchor:g}", lambda policy=policy: kv_point(policy), main_rule))
    if "oracle" in config.baselines:

        def oracle_point():
            result = oracle_bound(cascade, test, config.oracle_tolerance)
            parameter = next(iter(cascade.parameters()))
            return {
                "point_id": "oracle",
                "method": "oracle",
                "hard_ratio": None,
                "ppl": result.ppl,
                "accuracy": None,
                "exit_ratios": list(result.exit_ratios),
                "tokens_entered": list(result.tokens_entered),
                "layer_cost": result.layer_cost,
                "flops": None,
                "flops_analytic": result.flops_analytic,
                "time_median_s": None,
                "tokens": result.tokens,
                "oracle_tolerance": result.tolerance,
                "layers_per_stage": list(cascade.layers_per_stage),
                "conditions": {
                    **conditions,
                    **environment_conditions(parameter.device, parameter.dtype),
                    "note": "analytic cost only; per-stage NLL from the no-exit "
                    "cascade (later stages see full context)",
                },
            }

        points.append(("oracle", oracle_point, main_rule))

    timed_test = test[:timed]  # each rank reruns its share of them for the back-to-back ratio

    def full_pass() -> list[Callable[[], object]]:
        """The full cascade on this rank's timed batches, one call per batch (so each point's batch and
        the full cascade's same batch are timed back to back)."""
        return [
            lambda batch=batch: forward_cascade(
                cascade, batch["input_ids"], batch.get("attention_mask"), batch.get("targets"), method="full"
            )
            for batch in shard(timed_test)
        ]

    def with_back_to_back_ratio(make: Callable[[], dict]) -> dict:
        """The point's record plus its wall time over the full cascade's, timed back to back."""
        record = make()
        untimed = not (record.get("conditions") or {}).get("timed", True)
        # the full cascade against itself is 1 by definition (the report writes 1.000): not timed twice
        rerun = (
            None
            if untimed or record["method"] == "full"
            else _pass_of(record, cascade, shard(timed_test), config, paths, data, progress)
        )
        if rerun is not None:
            with evaluation_mode(cascade), torch.inference_mode():
                ratio = interleaved_ratio(rerun, full_pass(), pairs=3)
            record["wall_ratio_interleaved"] = statistics.median(all_ranks(ratio))
        return record

    with sharded(ranks):
        todo_ids = from_main([pid for pid, _, _ in points if pid not in store])  # before rank 0 appends any
        todo = [(pid, make, spec) for pid, make, spec in points if pid in todo_ids]
        for point_id, make, spec in tqdm(todo, desc=f"sweep {config.name}", unit="point", disable=not progress):
            with using_rule(cascade, rule(spec)):
                record = with_back_to_back_ratio(make)
            if ranks.is_main:
                store.append(record)
            if on_point is not None:
                on_point(point_id)
        cascade.set_thresholds(calibrated)
        if pretrained is not None and ranks.is_main and not (saved / "cascade.json").exists():
            # what bench-generate --cascade and lm-eval's cascade= load: the blocks at the anchor's thresholds
            with using_rule(cascade, rule(main_rule)):
                cascade.set_thresholds(thresholds_at(anchor))
                save_ensemble(
                    cascade,
                    saved,
                    tokenizer=data.tokenizer,
                    extra={**training, "thresholds_for": f"hard ratio {anchor:g}, {main_rule}"},
                )
            cascade.set_thresholds(calibrated)
        confidences = None if paths["confidence"].exists() else _confidences(cascade, test)
    if not ranks.is_main:
        return paths
    if confidences is not None:
        write_json_atomic(paths["confidence"], confidences)
    from .plots import make_plots
    from .reports import write_report

    make_plots(list(store), paths["confidence"], paths["plots"], config.name)
    write_report(list(store), config, paths)
    return paths


def _write_exit_study(summary: dict, paths: dict, name: str) -> None:
    """The exit study's JSON, table (md/tex/csv) and figure."""
    from .reports import write_table

    write_json_atomic(paths["exit_study"], summary)
    write_table(
        exit_curve_table(summary),
        paths["tables"] / f"{name}.exit_curve",
        f"{name}: exit after each candidate layer, shared head vs trained translator",
    )
    plot_exit_curve(summary, paths["plots"] / f"{name}.exit_curve")


def _measurement_note(config: ExperimentConfig, timed: int, batches: int) -> str:
    counted = (
        "every point"
        if config.count_flops == "all"
        else f"the baselines and the routed/masked/K/V-policy points at hard ratio {_anchor_ratio(config):g}"
    )
    where = (
        ""
        if config.timing_points == "all"
        else f" at the baselines and the routed/masked/K/V-policy points at hard ratio {_anchor_ratio(config):g} only "
        f"(the other points have quality and FLOPs, no wall time)"
    )
    return (
        f"quality on all {batches} {config.eval_split} batches; FLOPs counted with FlopCounterMode on {counted}, the analytic "  # noqa: E501
        f"count (equal to the counted one wherever both exist: see the checks) everywhere; wall time{where}: median of "
        f"{config.timing_repeats} passes over the first {timed} of the {batches} {config.eval_split} batches after one "
        f"warm-up, "
        f"and the ratio to the full cascade timed back to back on them, batch by batch (median of 3 pairs)"
    )


def _pass_of(
    record: dict, cascade: Ensemble, batches, config: ExperimentConfig, paths, data, progress: bool
) -> Optional[list[Callable[[], None]]]:
    """Calls, one per batch, that rerun the pass a record measured over ``batches`` (None for the oracle,
    which never runs)."""
    method = record["method"]
    if method == "oracle":
        return None
    if method == "dense":
        model, _ = _trained_dense(config, data, paths["dense"], sum(cascade.layers_per_stage), progress)
        kwargs = dict(method="full")
    elif method == "prefix":
        model, kwargs = cascade, dict(method="full", num_stages=record["stages"])
    elif method == "full":
        model, kwargs = cascade, dict(method="full")
    elif method == "kv_routed":
        model, kwargs = (
            cascade,
            dict(method="routed", thresholds=record["thresholds"], batching="padded", kv_policy=record["kv_policy"]),
        )
    else:
        model = cascade
        method = "routed" if method == "risk_controlled" else method
        kwargs = dict(
            method=method,
            thresholds=record["thresholds"],
            **({"batching": config.batching} if method == "routed" else {}),
        )

    return [
        lambda batch=batch: forward_cascade(
            model, batch["input_ids"], batch.get("attention_mask"), batch.get("targets"), **kwargs
        )
        for batch in batches
    ]


def _confidences(cascade: Ensemble, batches) -> dict:
    """Histogram of each non-last stage's confidences on the test split (no exit: every token)."""
    values = [[] for _ in range(len(cascade) - 1)]
    with evaluation_mode(cascade), torch.inference_mode():
        for batch in shard(batches):
            out = evaluate_pass(cascade, batch)
            for k in range(len(cascade) - 1):
                conf = out.stage_confidence[k]
                values[k].append(conf[~torch.isnan(conf)])
    histograms = []
    for k, parts in enumerate(values):
        conf = gathered(torch.cat(parts)).float()
        low, high = float(conf.min()), float(conf.max())
        counts = torch.histc(conf, bins=50, min=low, max=high if high > low else low + 1e-6)
        histograms.append(
            {
                "stage": k,
                "exit_fn": cascade[k].exit_function.name,
                "min": low,
                "max": high,
                "counts": counts.long().tolist(),
                "tokens": int(conf.numel()),
            }
        )
    return {"histograms": histograms}


def evaluate_pass(cascade: Ensemble, batch: dict):
    return forward_cascade(
        cascade,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch.get("targets"),
        thresholds=[math.inf] * len(cascade),
    )
