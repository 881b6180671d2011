"""The stage presets as plain data (no torch): per preset, a Hugging Face config in standard names
plus ``model_type``. ``presets`` builds models from them; the command line lists their names."""

from __future__ import annotations

#: Per-stage model configs, in standard Hugging Face config names (+ ``model_type``).
STAGE_PRESETS: dict[str, dict] = {
    # The CPU benchmark preset of the core issue: two of these make a 4+4-layer cascade.
    "gpt2-cpu": dict(
        model_type="gpt2",
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=8192,
        max_position_embeddings=1024,
    ),
    # The default experiment's stages: small enough that stages and the dense baseline train to convergence
    # within the run's 10-minute CPU budget (docs/results.md, "The default run"). Exact GELU instead of GPT-2's tanh
    # approximation and no dropout on attention probabilities: together a third of a CPU training step here,
    # for no loss of quality at this size; residual and embedding dropout (0.1) stay.
    "gpt2-mini": dict(
        model_type="gpt2",
        hidden_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        activation_function="gelu",
        attn_pdrop=0.0,
    ),
    # GPT-2-small-like stages for GPU benchmarks (6+6 layers = GPT-2 small depth).
    "gpt2-small": dict(
        model_type="gpt2",
        hidden_size=768,
        num_attention_heads=12,
        num_hidden_layers=6,
        vocab_size=50257,
        max_position_embeddings=1024,
    ),
    # Tiny configs for tests, one per supported family.
    "gpt2-tiny": dict(
        model_type="gpt2",
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "llama-tiny": dict(
        model_type="llama",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    # Gemma 3's text decoder (a family cut by the standard layout): sliding and full attention layers in
    # turn, a window shorter than test rows, local and global RoPE, q/k norms, scaled embeddings, tied head.
    "gemma3-tiny": dict(
        model_type="gemma3_text",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
        sliding_window=6,
        sliding_window_pattern=2,
    ),
    "gpt_neox-tiny": dict(
        model_type="gpt_neox",
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    # The memory-layer family (cascade_bench.models.memory_lm) for tests: every layer type, segments of 8
    # tokens so that test rows span several; stages take the list in order (blocks continue it).
    "memory-tiny": dict(
        model_type="cascade_memory_lm",
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
        segment_length=8,
        num_memories=2,
        layer_kinds=("infini", "multi_memory", "hierarchical", "pythia", "infini", "pythia"),
        num_hidden_layers=2,
    ),
    # The seed's four presets (models.memory_lm.MEMORY_PRESETS: six pythia layers, or one memory layer
    # then five pythia) at the default experiment's size (gpt2-mini: hidden 128, 4 heads, BPE 1024),
    # segments of 32 tokens; a cascade of n layers in all uses the first n of the six.
    **{
        f"memory-{name}": dict(
            model_type="cascade_memory_lm",
            hidden_size=128,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=1024,
            max_position_embeddings=16384,
            segment_length=32,
            layer_kinds=kinds,
            num_hidden_layers=2,
        )
        for name, kinds in (
            ("pythia", ("pythia",) * 6),
            ("infini", ("infini",) + ("pythia",) * 5),
            ("multi_memory", ("multi_memory",) + ("pythia",) * 5),
            ("hierarchical", ("hierarchical",) + ("pythia",) * 5),
        )
    },
}
