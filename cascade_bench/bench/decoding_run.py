"""The ``bench-generate`` job: prompts (the embedded test split through a saved cascade's tokenizer,
or embedded bytes), thresholds calibrated to the forced exit share, every decoding policy timed
(``decoding.bench_decoding``), the K/V policies teacher-forced, the bars checked, the conditions
recorded, and everything written atomically as one JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.corpus import EMBEDDED_BYTES, embedded_byte_windows
from ..measure.environment import environment_conditions
from ..routing.calibration import calibrate_thresholds, hard_ratio_of_exit_ratio
from ..stages.ensemble import Ensemble
from .decoding import bench_decoding, decoding_checks, teacher_forced_policies, write_decoding_bench


def decode_prompts(cascade_folder: Optional[Path], prompt_len: int, rows: int) -> tuple[Tensor, list, list, str]:
    """(prompt rows, teacher-forced test batches, calibration batches, what the data is): the
    embedded test split through the saved cascade's tokenizer when it has one, else UTF-8 bytes."""
    if cascade_folder is not None and (cascade_folder / "tokenizer").is_dir():
        from ..data.prepare import prepare_data

        tokenizer = cascade_folder / "tokenizer"
        prepared = prepare_data("embedded", tokenizer=str(tokenizer), seq_len=prompt_len, batch_size=8)
        test = torch.cat(
            [
                b["input_ids"] if "attention_mask" not in b else b["input_ids"][b["attention_mask"].bool().all(dim=1)]
                for b in prepared.test
            ]
        )
        if test.shape[0] < rows:
            raise ValueError(
                f"the test split gives {test.shape[0]} prompts of {prompt_len} tokens, fewer than batch {rows}"
            )
        return test, prepared.test[:4], prepared.validation[:4], f"embedded corpus, test split through {tokenizer}"
    windows = embedded_byte_windows(rows + 16, prompt_len)
    return (
        windows[:rows],
        [windows[rows : rows + 8]],
        [windows[rows + 8 :]],
        f"{EMBEDDED_BYTES} (untrained weights unless loaded)",
    )


def run_decoding_bench(
    ensemble: Ensemble,
    origin: str,
    *,
    cascade_folder: Optional[Path] = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    prompt_len: int = 64,
    new_tokens: int = 65,
    exit_ratio: float = 0.5,
    rule: str = "max_prob",
    quorum: float = 1.0,
    draft_length: int = 4,
    repeats: int = 15,
    warmup: int = 1,
    seed: int = 0,
    json_path: Optional[Path] = None,
) -> tuple[list, list, list[tuple[str, bool]], dict]:
    """(rows, teacher-forced rows, checks, conditions) of the whole job; written to ``json_path``."""
    if new_tokens < 3:
        raise ValueError(f"--new-tokens must be at least 3, got {new_tokens}")
    prompt_rows, windows, calibration, data = decode_prompts(cascade_folder, prompt_len, max(batch_sizes))
    prompts = {b: prompt_rows[:b].to(ensemble.device) for b in batch_sizes}
    calibrate_thresholds(ensemble, calibration, hard_ratios=hard_ratio_of_exit_ratio(exit_ratio))
    teacher_forced = teacher_forced_policies(ensemble, windows)
    rows = bench_decoding(
        ensemble,
        prompts,
        new_tokens=new_tokens,
        rate=exit_ratio,
        rule=rule,
        quorum=quorum,
        draft_length=draft_length,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
    )
    checks = decoding_checks(rows, draft_length, exit_ratio)
    conditions = {
        **environment_conditions(ensemble.device, ensemble.dtype),
        "model": origin,
        "layers_per_stage": list(ensemble.layers_per_stage),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "data": data,
        "decoding": "greedy",
        "exit_ratio": exit_ratio,
        "rule": rule,
        "quorum": quorum,
        "draft_length": draft_length,
        "teacher_forced": f"thresholds calibrated so that {exit_ratio:.0%} of validation tokens exit "
        f"after stage 0 (hard ratio {hard_ratio_of_exit_ratio(exit_ratio):g}), "
        f"measured on {len(windows)} test batches",
    }
    if json_path is not None:
        write_decoding_bench(rows, teacher_forced, checks, conditions, json_path)
    return rows, teacher_forced, checks, conditions
