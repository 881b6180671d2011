"""What a run measures, trained or loaded: the cascade under its protocol (stage 0 shared by runs
whose stage 0 trains identically), the dense baseline of the same depth, or a pretrained model cut
into blocks (with its exit heads trained, or translators from the exit study, if asked). Each
trained model is saved under ``models/<training key>/`` and loaded by later runs with the same
training settings; each comes with the summary of its training that every record carries."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..data.prepare import PreparedData
from ..stages.ensemble import Ensemble
from ..stages.families import register_own_families
from ..stages.model_source import resolve_model
from ..stages.presets import build_ensemble
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
from .exit_study import ExitStudy, auto_boundaries


def _dtype(config: ExperimentConfig) -> torch.dtype:
    return getattr(torch, config.dtype)


def _protocol(config: ExperimentConfig):
    protocol = dataclasses.replace(config.training_protocol, max_epochs=config.max_epochs, exit_rule=config.exit_rule)
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


def _started(config: ExperimentConfig, protocol, data: PreparedData) -> Ensemble:
    """The protocol's freshly initialised stages (the first of them for a staged protocol's prefix)."""
    return start_ensemble(
        protocol,
        config.preset,
        exit_rule=config.exit_rule,
        seed=config.seed,
        device=config.device,
        dtype=_dtype(config),
        vocab_size=len(data.tokenizer),
    )


def _train(
    config: ExperimentConfig, ensemble: Ensemble, protocol, data: PreparedData, progress: bool, trained_stages: int = 0
):
    """``train_protocol`` with the run's seed and step cap; ``trained_stages`` as there."""
    return train_protocol(
        ensemble,
        data.train,
        data.validation,
        protocol,
        seed=config.seed,
        max_steps_per_epoch=config.max_steps_per_epoch or None,
        progress=progress,
        trained_stages=trained_stages,
    )


def _trained_stage0(
    config: ExperimentConfig, protocol, data: PreparedData, folder: Path, progress: bool
) -> tuple[Ensemble, list[dict]]:
    """Stage 0 of a staged protocol, trained alone or loaded from ``folder`` (keyed by
    ``config.stage0_key()``: shared by runs whose stage 0 trains identically), with its summary."""
    if (folder / "cascade.json").exists():
        return load_ensemble(folder, config.device, _dtype(config)), load_manifest(folder)["extra"]["stages"]
    first = protocol.prefix(1)
    ensemble = _started(config, first, data)
    report = _train(config, ensemble, first, data, progress)
    stages = _stage_summary(first, report)
    save_ensemble(ensemble, folder, tokenizer=data.tokenizer, extra={"stages": stages})
    return ensemble, stages


def trained_cascade(config: ExperimentConfig, data: PreparedData, paths: dict, progress: bool) -> tuple[Ensemble, dict]:
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
        report = _train(config, ensemble, protocol, data, progress, trained_stages=1)
        summary["stages"] = stages + _stage_summary(protocol, report)
    else:
        ensemble = _started(config, protocol, data)
        report = _train(config, ensemble, protocol, data, progress)
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


def pretrained_model(config: ExperimentConfig, folder: Path, progress: bool):
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


def pretrained_blocks(
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
    ensemble = Ensemble.from_blocks(model, boundaries, exit_rule=config.exit_rule, heads=heads)
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


def trained_dense(
    config: ExperimentConfig, data: PreparedData, folder: Path, total_layers: int, progress: bool
) -> tuple[Ensemble, dict]:
    """The dense baseline (one model of the cascade's total depth, stage 0's recipe, all data) and
    its training summary."""
    if (folder / "cascade.json").exists():
        return load_ensemble(folder, config.device, _dtype(config)), load_manifest(folder)["extra"]
    dense = build_ensemble(
        config.preset,
        (total_layers,),
        exit_rule=config.exit_rule,
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
