"""The memory-layer family benchmarked: training order, cost against context length, reversal curse.

Three parts, each on the four presets of ``models.memory_lm.MEMORY_PRESETS`` at the size of the
``memory-*`` stage presets (hidden 128, 4 heads, segments of 32, BPE 1,024 on the embedded corpus):

- ``training``: each preset trained on streams of the embedded corpus's train split cut into
  consecutive chunks (``training.memory_streams``), in stream order (``sequential``) and, for the
  memory presets, with lagged chunk memories (``lagged-chunks``), both to early stopping on the
  streamed validation PPL; time per epoch (median) and best validation PPL.
- ``context``: the trained models (lagged chunk memories for memory presets) at context lengths from 256 to 8,192
  tokens: sliding-window PPL over the test split (stride half the window; never independent
  segments: every scored token sees up to a window of context), and per token at that length the
  counted FLOPs of one full window, its wall time (median of ``repeats``), the peak live tensor
  bytes of that forward, and the bytes the decoding cache holds after a prefill of that length
  (K/V of attention layers; current segment and memories of memory layers).
- ``reversal``: a fresh model per preset trained on forward statements of a one-to-one relation
  from the standard library (``data.relations``), joined with EOS into one stream (never padded),
  until their answers' PPL stops improving; then forward PPL, backward PPL (the converse, never
  seen) and, as a control, backward statements with a wrong answer (another pair's), each over the
  answer tokens only; bytes as token ids.
- ``recurrent``: Lagged Cache Training as its seed describes it, against training through the
  recurrence, on a recurrent context model (``bench.lagged_cache_comparison``); not a memory-layer preset.

Models, histories and tables go under ``out``; a part that finds its trained model there reuses it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.batch import IGNORE_INDEX
from ..data.relations import entity_pairs, statement
from ..data.storage import write_json_atomic
from ..data.windows import sliding_windows
from ..experiment.plots import pyplot, save_figure
from ..measure.flops import count_flops
from ..measure.memory import peak_memory_bytes
from ..models.hf_compat import with_cache
from ..stages.families import register_own_families
from ..stages.presets import stage_config
from ..training.loops import EarlyStopping, train_epochs
from ..training.memory_streams import TRAINING_ORDERS, stream_chunks, train_on_streams
from .choices import MEMORY_PARTS, MEMORY_PRESETS
from .lagged_cache_comparison import recurrent_part

CONTEXT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def build_model(preset: str, seed: int = 0, **overrides):
    """A freshly initialised six-layer model of ``preset`` at the ``memory-<preset>`` stage preset's size."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = stage_config(f"memory-{preset}", **{"num_hidden_layers": 6, **overrides})
    return AutoModelForCausalLM.from_config(config)


def _saved(folder: Path):
    from transformers import AutoModelForCausalLM

    register_own_families()  # a part run alone (context) loads models nothing else has registered yet
    if (folder / "history.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder).eval(), json.loads((folder / "history.json").read_text())
    return None, None


def _save(model, folder: Path, history: dict) -> None:
    model.save_pretrained(folder)
    write_json_atomic(folder / "history.json", history)


# -- data ----------------------------------------------------------------------------------------------


def corpus_streams(tokenizer: str = "bpe:1024", cache_dir: "Path | str | None" = None):
    """(tokenizer, {split: 1-D token stream}) of the embedded corpus, documents joined with EOS."""
    from ..data.corpus import load_corpus
    from ..data.tokenization import load_tokenizer
    from ..data.windows import encode_documents

    corpus = load_corpus("embedded")
    tok = load_tokenizer(tokenizer, corpus.documents("train"), cache_dir=cache_dir)
    return tok, {split: encode_documents(tok, corpus.documents(split)) for split in ("train", "validation", "test")}


# -- training: sequential vs lagged chunk memories ---------------------------------------------------------------------


def training_part(
    streams: dict,
    out: Path,
    presets: Sequence[str] = MEMORY_PRESETS,
    chunk_len: int = 256,
    train_streams: int = 32,
    train_chunks: int = 8,
    batch_size: int = 8,
    max_epochs: int = 20,
    patience: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train each preset in each order (pythia: sequential only; it has no memory to lag); rows of the
    table, models saved under ``out/models/<preset>-<order>``."""
    train = stream_chunks(streams["train"], train_streams, chunk_len, train_chunks)
    validation = stream_chunks(streams["validation"], 8, chunk_len, 4)
    rows = []
    for preset in presets:
        for order in ("sequential",) if preset == "pythia" else TRAINING_ORDERS:
            folder = out / "models" / f"{preset}-{order}"
            model, history = _saved(folder)
            if model is None:
                model = build_model(preset, seed)
                trained = train_on_streams(
                    model,
                    train,
                    validation,
                    order,
                    batch_size=batch_size,
                    patience=patience,
                    max_epochs=max_epochs,
                    seed=seed,
                )
                history = {
                    "order": order,
                    "epoch_seconds": trained.epoch_seconds,
                    "validation_ppl": trained.validation_ppl,
                    "best_epoch": trained.best_epoch,
                    "stopped_by": trained.stopped_by,
                    "steps_per_epoch": trained.steps_per_epoch,
                    "train_tokens_per_epoch": int(train.numel()),
                }
                _save(model, folder, history)
            seconds = statistics.median(history["epoch_seconds"])
            rows.append(
                {
                    "preset": preset,
                    "order": order,
                    "epochs": len(history["epoch_seconds"]),
                    "best epoch": history["best_epoch"],
                    "stopped by": history["stopped_by"],
                    "s / epoch": seconds,
                    "tokens / s": history["train_tokens_per_epoch"] / seconds,
                    "validation PPL": history["validation_ppl"][history["best_epoch"] - 1],
                }
            )
            if progress:
                print(f"[training] {preset}/{order}: {rows[-1]}", flush=True)
    return rows


# -- context length -----------------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes of every tensor a decoding cache holds (K/V of attention layers; a memory layer's current
    segment, pending inputs and memories)."""
    from ..models.memory_lm.segment_cache import SegmentLayer

    total = 0
    for layer in cache.layers:
        if isinstance(layer, SegmentLayer):
            total += layer.nbytes()
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, Tensor))
    return total


@torch.no_grad()
def sliding_ppl(model, stream: Tensor, context_len: int, stride: int) -> tuple[float, int]:
    """PPL of ``stream`` by sliding windows of ``context_len`` (``data.windows.sliding_windows``: each
    token scored once, with the most context a window gives it); (PPL, scored tokens)."""
    nll, tokens = 0.0, 0
    for batch in sliding_windows(stream, context_len, stride, batch_size=1):
        ids, targets = batch["input_ids"], batch["targets"]
        logits = model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits
        scored = targets != IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored], reduction="sum"))
        tokens += int(scored.sum())
    return math.exp(nll / tokens), tokens


@torch.no_grad()
def context_costs(model, ids: Tensor, repeats: int = 3) -> dict:
    """Per-token costs of one forward over ``ids`` (1, C) and the cache a prefill of it leaves."""
    from transformers import DynamicCache

    length = ids.shape[1]
    counted, _ = count_flops(model, input_ids=ids)
    peak, how, _ = peak_memory_bytes(lambda: model(input_ids=ids), "cpu")
    model(input_ids=ids)  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids)
        seconds.append(time.perf_counter() - started)
    cache = DynamicCache()
    model(input_ids=ids, use_cache=True, **with_cache(cache))
    return {
        "FLOPs / token": counted.flops / length,
        "ms / token": 1e3 * statistics.median(seconds) / length,
        "peak MB": peak / 2**20,
        "cache KB": cache_bytes(cache) / 2**10,
        "peak_measured_as": how,
    }


def context_part(
    streams: dict,
    out: Path,
    presets: Sequence[str] = MEMORY_PRESETS,
    lengths: Sequence[int] = CONTEXT_LENGTHS,
    eval_tokens: int = 16385,
    repeats: int = 3,
    progress: bool = True,
) -> list[dict]:
    """The trained models (``training_part``) at each context length: rows of the table."""
    test = streams["test"][:eval_tokens]
    if test.numel() < max(lengths) + 1:
        raise ValueError(f"the test split has {test.numel()} tokens, fewer than the longest context {max(lengths)} + 1")
    rows = []
    for preset in presets:
        model, _ = _saved(out / "models" / f"{preset}-{'sequential' if preset == 'pythia' else 'lagged-chunks'}")
        if model is None:
            raise ValueError(f"no trained {preset} model under {out / 'models'}: run the training part first")
        for length in lengths:
            ppl, scored = sliding_ppl(model, test, length, length // 2)
            row = {
                "preset": preset,
                "context": length,
                "PPL": ppl,
                "scored tokens": scored,
                **context_costs(model, test[None, :length], repeats),
            }
            rows.append(row)
            if progress:
                print(f"[context] {preset} @ {length}: {row}", flush=True)
    return rows


def plot_context(rows: Sequence[dict], stem: Path) -> list[Path]:
    """Cost against context length per model type: FLOPs, wall time, cache bytes and PPL per token."""
    plt = pyplot()
    panels = (
        ("FLOPs / token", "counted FLOPs per token"),
        ("ms / token", "wall ms per token (CPU)"),
        ("cache KB", "decoding cache after prefill (KB)"),
        ("PPL", "sliding-window PPL"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (column, title) in zip(axes, panels):
        for preset in dict.fromkeys(r["preset"] for r in rows):
            mine = [r for r in rows if r["preset"] == preset]
            ax.plot([r["context"] for r in mine], [r[column] for r in mine], marker="o", label=preset)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


# -- reversal curse -----------------------------------------------------------------------------------

EOS_BYTE = 256  # bytes are ids 0..255; EOS is the next id


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def relation_stream(pairs, generator: torch.Generator) -> Tensor:
    """Forward statements in a shuffled order, each followed by EOS, as one 1-D stream of byte ids."""
    ids = []
    for j in torch.randperm(len(pairs), generator=generator).tolist():
        prompt, answer = statement(*pairs[j], "forward")
        ids += _encode(prompt + answer) + [EOS_BYTE]
    return torch.tensor(ids)


@torch.no_grad()
def answer_ppl(model, statements: Sequence[tuple[str, str]], batch_size: int = 64) -> float:
    """PPL of the answers given their prompts, each statement alone after an EOS (as in the stream)."""
    model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(statements), batch_size):
        group = statements[start : start + batch_size]
        encoded = [([EOS_BYTE] + _encode(p), _encode(a)) for p, a in group]
        length = max(len(p) + len(a) for p, a in encoded)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        targets = torch.full((len(group), length), IGNORE_INDEX)
        for row, (p, a) in enumerate(encoded):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            mask[row, : len(p) + len(a)] = 1
            targets[row, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)  # position t predicts token t + 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        scored = targets != IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored], reduction="sum"))
        tokens += int(scored.sum())
    return math.exp(nll / tokens)


def train_on_relation(
    model,
    pairs,
    window: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    patience: int = 3,
    max_epochs: int = 150,
    seed: int = 0,
) -> dict:
    """Train on forward statements (a freshly shuffled EOS-joined stream each epoch, cut into windows,
    never padded) until the forward answers' PPL has not improved for ``patience`` epochs."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    forward = [statement(*pair, "forward") for pair in pairs]
    stopping, history = EarlyStopping([model], patience, min_delta=1e-4), []

    def epoch_steps(epoch: int):
        stream = relation_stream(pairs, generator)
        windows = stream[: stream.numel() // window * window].view(-1, window)
        windows = windows[torch.randperm(windows.shape[0], generator=generator)]
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            yield lambda ids=ids: (model(input_ids=ids, labels=ids).loss, ids.numel())

    def validate(epoch: int, stats) -> float:
        history.append(answer_ppl(model, forward))
        return history[-1]

    train_epochs([model], optimizer, range(1, max_epochs + 1), epoch_steps, validate, stopping)
    return {
        "forward_answer_ppl_per_epoch": history,
        "epochs": len(history),
        "stopped_by": stopping.stop_reason,
    }


def reversal_part(
    out: Path, presets: Sequence[str] = MEMORY_PRESETS, max_epochs: int = 150, seed: int = 0, progress: bool = True
) -> list[dict]:
    pairs = entity_pairs()
    forward = [statement(*pair, "forward") for pair in pairs]
    backward = [statement(*pair, "backward") for pair in pairs]
    shift = len(pairs) // 2  # a wrong answer: the pair half the list away
    mismatched = [(backward[i][0], backward[(i + shift) % len(pairs)][1]) for i in range(len(pairs))]
    rows = []
    for preset in presets:
        folder = out / "models" / f"reversal-{preset}"
        model, history = _saved(folder)
        if model is None:
            model = build_model(preset, seed)
            history = train_on_relation(model, pairs, max_epochs=max_epochs, seed=seed)
            _save(model, folder, history)
        f, b, m = answer_ppl(model, forward), answer_ppl(model, backward), answer_ppl(model, mismatched)
        rows.append(
            {
                "preset": preset,
                "epochs": history["epochs"],
                "stopped by": history["stopped_by"],
                "forward PPL": f,
                "backward PPL": b,
                "gap (nats)": math.log(b) - math.log(f),
                "backward, wrong answer PPL": m,
            }
        )
        if progress:
            print(f"[reversal] {preset}: {rows[-1]}", flush=True)
    return rows


def run_memory_bench(
    out: "Path | str" = "memory_bench",
    parts: Sequence[str] = MEMORY_PARTS,
    presets: Sequence[str] = MEMORY_PRESETS,
    lengths: Sequence[int] = CONTEXT_LENGTHS,
    max_epochs: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the named parts; write ``results/memory_<part>.{md,tex,csv}`` and ``plots/memory_context.*``
    under ``out``; return the paths."""
    import pandas as pd

    from ..experiment.reports import write_table
    from ..measure.environment import environment_conditions

    unknown = sorted(set(parts) - set(MEMORY_PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; expected some of {list(MEMORY_PARTS)}")
    bad = sorted(set(presets) - set(MEMORY_PRESETS))
    if bad:
        raise ValueError(f"unknown presets {bad}; expected some of {list(MEMORY_PRESETS)}")
    out = Path(out)
    results = out / "results"
    written: dict[str, Path] = {}
    captions = {
        "training": "memory-layer presets: sequential vs lagged chunk memories",
        "recurrent": "recurrent context model: Lagged Cache Training vs training through the recurrence",
        "context": "memory-layer presets: cost and PPL against context length",
        "reversal": "memory-layer presets: reversal curse on HTML entities",
    }
    streams = None
    if {"training", "context", "recurrent"} & set(parts):
        tokenizer, streams = corpus_streams(cache_dir=out / "tokenizers")
    for part in MEMORY_PARTS:
        if part not in parts:
            continue
        epochs = {} if max_epochs is None else {"max_epochs": max_epochs}
        if part == "training":
            rows = training_part(streams, out, presets, progress=progress, **epochs)
        elif part == "context":
            rows = context_part(streams, out, presets, lengths, progress=progress)
            written.update({f"plot_{p.suffix[1:]}": p for p in plot_context(rows, out / "plots" / "memory_context")})
        elif part == "recurrent":
            rows = recurrent_part(streams, len(tokenizer), progress=progress, **epochs)
        else:
            rows = reversal_part(out, presets, progress=progress, **epochs)
        frame = pd.DataFrame(rows).drop(columns=["peak_measured_as"], errors="ignore")
        for path in write_table(frame, results / f"memory_{part}", captions[part]):
            written[f"{part}_{path.suffix[1:]}"] = path
        write_json_atomic(
            results / f"memory_{part}.json",
            {"rows": rows, "conditions": environment_conditions(torch.device("cpu"), torch.float32)},
        )
    return written
