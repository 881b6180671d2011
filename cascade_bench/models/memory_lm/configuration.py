"""The configuration of the memory-layer LM family (``model_type = "cascade_memory_lm"``)."""

from __future__ import annotations

from transformers import PretrainedConfig

#: Layer types, each its own module (``layers.py`` maps them to classes).
LAYER_KINDS = ("pythia", "infini", "multi_memory", "hierarchical")
#: The layer types that carry a compressive memory across segments.
MEMORY_LAYER_KINDS = ("infini", "multi_memory", "hierarchical")


#: Names the seed code used for this family's options -> the names used here (refused, never stored
#: as stray attributes that change nothing).
SEED_NAMES = {"use_delta_rule": "delta_rule", "num_banks": "num_memory_banks", "segment_len": "segment_length"}


class MemoryLMConfig(PretrainedConfig):
    """A causal LM of ``layer_kinds`` (one entry per layer, drawn from ``LAYER_KINDS``).

    Attention (every layer): ``num_attention_heads`` heads, rotary positions on the first
    ``rotary_pct`` of each head's dims (Pythia: 0.25). Memory layers split their input into
    segments of ``segment_length`` tokens: softmax attention inside a segment, a compressive
    memory (linear attention, ELU+1 features, one head of dim ``hidden_size``, no positions)
    across segments. ``delta_rule``: write only what the memory does not already return.
    ``num_memory_banks`` / ``segments_per_bank``: the memory is a ring of banks, each written for
    ``segments_per_bank`` segments (0 = one bank, never reset); reads pool the banks, and the
    oldest bank is cleared when the ring wraps. ``num_memories``: independent memories of a
    ``multi_memory`` layer; ``hierarchical`` layers keep a coarse memory of segment summaries and
    a fine token-level one."""

    model_type = "cascade_memory_lm"

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 128,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        layer_kinds=("pythia",) * 6,
        max_position_embeddings: int = 16384,
        rotary_pct: float = 0.25,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        segment_length: int = 64,
        delta_rule: bool = False,
        num_memory_banks: int = 1,
        segments_per_bank: int = 0,
        num_memories: int = 4,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        for seed_name, ours in SEED_NAMES.items():
            if seed_name in kwargs:
                raise TypeError(f"MemoryLMConfig got {seed_name}={kwargs[seed_name]!r}: this family calls it {ours}")
        layer_kinds = tuple(layer_kinds)
        num_hidden_layers = kwargs.pop("num_hidden_layers", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_kinds = list(layer_kinds)
        # The model builds layer_kinds[:num_hidden_layers]: Hugging Face (and ``Block.new_stage_after``)
        # change a model's depth through this attribute.
        self.num_hidden_layers = len(layer_kinds) if num_hidden_layers is None else num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.rotary_pct = rotary_pct
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.segment_length = segment_length
        self.delta_rule = delta_rule
        self.num_memory_banks = num_memory_banks
        self.segments_per_bank = segments_per_bank
        self.num_memories = num_memories
        self.initializer_range = initializer_range
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        def bad(key: str, expected: str):
            raise ValueError(f"MemoryLMConfig {key}: expected {expected}, got {getattr(self, key)!r}")

        for key in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "segment_length",
            "num_memory_banks",
            "num_memories",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(key, "a positive int")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"a multiple of num_attention_heads ({self.num_attention_heads})")
        if not self.layer_kinds or any(t not in LAYER_KINDS for t in self.layer_kinds):
            bad("layer_kinds", f"a non-empty list drawn from {list(LAYER_KINDS)}")
        if (
            isinstance(self.num_hidden_layers, bool)
            or not isinstance(self.num_hidden_layers, int)
            or not 1 <= self.num_hidden_layers <= len(self.layer_kinds)
        ):
            bad("num_hidden_layers", f"an int in [1, len(layer_kinds) = {len(self.layer_kinds)}]")
        if not 0.0 <= self.rotary_pct <= 1.0:
            bad("rotary_pct", "a fraction in [0, 1]")
        if (
            isinstance(self.segments_per_bank, bool)
            or not isinstance(self.segments_per_bank, int)
            or self.segments_per_bank < 0
        ):
            bad("segments_per_bank", "a non-negative int (0 = one bank, never reset)")
