"""Model families of the toolkit's own (below ``stages``: they know nothing of cascades).

``memory_lm``: one causal LM built from a list of layers, softmax-attention (``pythia``) and
compressive-memory layers (``infini``, ``multi_memory``, ``hierarchical``), registered with the
Hugging Face Auto classes so every tool that loads a causal LM loads it. Import
``cascade_bench.models.memory_lm`` for it (importing this package alone loads no transformers).
"""
