"""The ``bench-generate`` job: prompts (a corpus's test split, the embedded one by default, through
the model's own tokenizer; embedded bytes for untrained preset stages), thresholds calibrated to the
forced exit share, every decoding policy timed (``decoding.bench_decoding``), the K/V policies
teacher-forced, the bars checked, the conditions recorded, and everything written atomically as one
JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.corpus import EMBEDDED_BYTES, embedded_byte_windows
from ..measure.environment import environment_conditions
from ..routing.calibration import calibrate_thresholds
from ..stages.ensemble import Ensemble
from .decoding import (
    DecodingSettings,
    bench_decoding,
    decoding_checks,
    peers_not_run,
    teacher_forced_policies,
    write_decoding_bench,
)


def decode_prompts(
    tokenizer: Optional[Path],
    prompt_len: int,
    rows: int,
    corpus: "str | Path" = "embedded",
    corpus_config: Optional[str] = None,
    prompts_file: Optional[Path] = None,
) -> tuple[Tensor, list, list, str]:
    """(prompt rows, teacher-forced test batches, calibration batches, what the data is): the test
    split of ``corpus`` (``data.corpus.load_corpus``: "embedded", a text file, a folder) through
    ``tokenizer`` (a folder); without one (untrained preset stages), the embedded text as UTF-8
    bytes, which only the embedded corpus may be. ``prompts_file`` (JSON lines ``{"text": ...}``, as
    bench-decode's ``--prompts``) replaces the prompt rows with the last ``prompt_len`` tokens of each
    of the user's prompts; the teacher-forced and calibration batches still come from ``corpus``."""
    if prompts_file is not None and tokenizer is None:
        raise ValueError("--prompts needs a tokenizer, and these stages have none (untrained preset stages read bytes)")
    if tokenizer is not None:
        from ..data.prepare import prepare_data

        prepared = prepare_data(
            corpus, tokenizer=str(tokenizer), seq_len=prompt_len, batch_size=8, config=corpus_config or None
        )
        test = torch.cat(
            [
                b["input_ids"] if "attention_mask" not in b else b["input_ids"][b["attention_mask"].bool().all(dim=1)]
                for b in prepared.test
            ]
        )
        data = f"{prepared.corpus.name}, test split through {tokenizer}"
        if prompts_file is not None:
            test = _user_prompt_rows(Path(prompts_file), prepared.tokenizer, prompt_len, rows)
            data = f"prompts {prompts_file} through {tokenizer}; teacher-forced and calibration text: {data}"
        if test.shape[0] < rows:
            raise ValueError(
                f"the test split of {prepared.corpus.name} gives {test.shape[0]} prompts of {prompt_len} tokens, "
                f"fewer than batch {rows}: give more text, or smaller --prompt-len / --batch-sizes"
            )
        return test, prepared.test[:4], prepared.validation[:4], data
    if str(corpus) != "embedded":
        raise ValueError(
            f"--corpus {corpus}: text other than the embedded corpus needs a tokenizer, and these stages have "
            "none (untrained preset stages read UTF-8 bytes); give --model, --stage or --cascade folders that hold one"
        )
    windows = embedded_byte_windows(rows + 16, prompt_len)
    return (
        windows[:rows],
        [windows[rows : rows + 8]],
        [windows[rows + 8 :]],
        f"{EMBEDDED_BYTES} (untrained weights unless loaded)",
    )


def _user_prompt_rows(path: Path, tokenizer, prompt_len: int, rows: int) -> Tensor:
    """The last ``prompt_len`` tokens of every prompt in ``path`` that has that many; ValueError when
    fewer than ``rows`` do."""
    from ..data.prompt_suite import read_prompts_file

    prompts = [p for group in read_prompts_file(path, tokenizer, max(prompt_len, 1024)).values() for p in group]
    long_enough = [p.ids[-prompt_len:] for p in prompts if len(p.ids) >= prompt_len]
    if len(long_enough) < rows:
        raise ValueError(
            f"--prompts {path}: {len(long_enough)} of its {len(prompts)} prompts have at least {prompt_len} tokens, "
            f"fewer than batch {rows}; give longer prompts or a smaller --prompt-len / --batch-sizes"
        )
    return torch.tensor(long_enough, dtype=torch.long)


def run_decoding_bench(
    ensemble: Ensemble,
    origin: str,
    *,
    tokenizer: Optional[Path] = None,
    corpus: "str | Path" = "embedded",
    corpus_config: Optional[str] = None,
    prompts_file: Optional[Path] = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    prompt_len: int = 64,
    new_tokens: int = 65,
    hard_ratio: float = 0.5,
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
    prompt_rows, windows, calibration, data = decode_prompts(
        tokenizer, prompt_len, max(batch_sizes), corpus, corpus_config, prompts_file
    )
    prompts = {b: prompt_rows[:b].to(ensemble.device) for b in batch_sizes}
    calibrate_thresholds(ensemble, calibration, hard_ratio)
    # the forced rule exits the rest: 1 - hard_ratio of decode tokens (or steps)
    settings = DecodingSettings(new_tokens, 1.0 - hard_ratio, rule, quorum, draft_length, repeats, warmup, seed)
    teacher_forced = teacher_forced_policies(ensemble, windows)
    rows = bench_decoding(ensemble, prompts, settings)
    checks = decoding_checks(rows, draft_length, settings.rate)
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
        "hard_ratio": hard_ratio,
        "rule": rule,
        "quorum": quorum,
        "draft_length": draft_length,
        "teacher_forced": f"thresholds calibrated so that {hard_ratio:.0%} of validation tokens continue "
        f"past stage 0, measured on {len(windows)} test batches",
        "not_run": peers_not_run(ensemble),
    }
    if json_path is not None:
        write_decoding_bench(rows, teacher_forced, checks, conditions, json_path)
    return rows, teacher_forced, checks, conditions
