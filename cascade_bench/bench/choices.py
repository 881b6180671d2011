"""The bench commands' named choices, without torch (the command line lists them; the benches
import them from here): ``bench-decode``'s methods, ``bench-routing``'s default exit rules,
``bench-memory``'s parts and presets."""

from __future__ import annotations

#: bench-decode's methods, ours and the Hugging Face peers (``decode_suite``).
METHODS = (
    "ours-greedy",
    "hf-greedy",
    "ours-draft",
    "ours-lookup",
    "ours-lookup+draft",
    "ours-self-spec",
    "ours-self-spec-trained",
    "ours-lossy",
    "hf-assisted",
    "hf-prompt-lookup",
    "hf-early-exit",
)
#: The plain greedy baselines; the faster in a run is every row's baseline.
PLAIN = ("ours-greedy", "hf-greedy")
#: Methods that need a draft model (``--draft``).
NEEDS_DRAFT = ("ours-draft", "ours-lookup+draft", "ours-lossy", "hf-assisted")
#: Methods that need trained exits (``--exits``, from ``train-exits``).
NEEDS_EXITS = ("ours-self-spec-trained",)
#: Methods whose round yields at most its proposals: self-speculation verifies each draft with the
#: deeper layers over the draft stage's states, so the token after the last draft would need a pass
#: that has not run (``routing.speculative``). A draft model's round yields up to proposals + 1.
NO_BONUS_TOKEN = ("ours-self-spec", "ours-self-spec-trained")
#: Methods whose Hugging Face code path refuses batches larger than one.
BATCH_ONE_ONLY = ("hf-assisted", "hf-prompt-lookup", "hf-early-exit")
#: The exit rules ``bench-routing`` compares by default.
BENCH_RULES = ("max_prob", "cos_sim", "classifier", "lowrank:64", "topk:1024")
#: bench-memory's memory-layer presets and parts.
MEMORY_PRESETS = ("pythia", "infini", "multi_memory", "hierarchical")
MEMORY_PARTS = ("training", "context", "reversal", "recurrent")
