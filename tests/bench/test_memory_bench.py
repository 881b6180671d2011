"""Pieces of the memory-family benchmark (``bench.memory_family``): cache bytes, sliding-window PPL,
the relation stream of the reversal-curse evaluation."""

from __future__ import annotations

import math

import torch

from cascade_bench.bench.memory_family import EOS_BYTE, build_model, cache_bytes, relation_stream, sliding_ppl
from cascade_bench.data.relations import entity_pairs, statement
from cascade_bench.models.memory_lm import create_model

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32, segment_length=4)


def _prefilled(model, length):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, length)), cache=cache, use_cache=True)
    return cache


def test_cache_bytes_grow_with_context_for_attention_and_stay_bounded_for_memory_layers():
    d, floats = 16, 4
    pythia = create_model("pythia", **TINY, layer_kinds=("pythia",) * 2).eval()
    assert cache_bytes(_prefilled(pythia, 10)) == 2 * (2 * 10 * d) * floats  # layers x (K + V) x tokens x d
    infini = create_model("infini", **TINY, layer_kinds=("infini", "pythia")).eval()
    for length, in_segment in ((10, 2), (12, 0), (30, 2)):
        # the infini layer: K/V of the current segment, its pending keys, values and inputs, the memory (d x d + d)
        expected = (2 * in_segment * d + 3 * in_segment * d + d * d + d) * floats + 2 * length * d * floats
        assert cache_bytes(_prefilled(infini, length)) == expected


def test_sliding_ppl_scores_every_token_but_the_first_once():
    model = create_model("infini", **TINY).eval()
    stream = torch.randint(0, 64, (37,), generator=torch.Generator().manual_seed(0))
    ppl, scored = sliding_ppl(model, stream, 16, 8)
    assert scored == 36 and math.isfinite(ppl)
    whole, _ = sliding_ppl(model, stream, 64, 64)  # one window: the plain forward
    with torch.no_grad():
        logits = model(input_ids=stream[None]).logits[0, :-1]
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits, stream[1:])))
    assert math.isclose(whole, expected, rel_tol=1e-5)


def test_the_relation_stream_is_every_forward_statement_once_joined_by_eos():
    pairs = entity_pairs()
    stream = relation_stream(pairs, torch.Generator().manual_seed(0))
    assert int((stream == EOS_BYTE).sum()) == len(pairs) and int(stream[-1]) == EOS_BYTE
    pieces = bytes(stream[stream != EOS_BYTE].tolist()).decode()  # no padding anywhere: bytes and EOS only
    texts = [bytes(t).decode() for t in _split(stream.tolist())]
    assert sorted(texts) == sorted("".join(statement(*pair, "forward")) for pair in pairs)
    assert len(pieces) == sum(map(len, texts))


def _split(ids):
    piece = []
    for i in ids:
        if i == EOS_BYTE:
            yield piece
            piece = []
        else:
            piece.append(i)


def test_benchmark_models_are_the_six_layer_presets():
    model = build_model("hierarchical")
    assert model.config.layer_kinds[: model.config.num_hidden_layers] == ["hierarchical"] + ["pythia"] * 5
    assert model.config.hidden_size == 128 and model.config.segment_length == 32


def test_a_saved_benchmark_model_loads_in_a_fresh_process(tmp_path):
    """The context part can run alone: loading a trained model must not rely on an earlier import
    having registered the family."""
    import subprocess
    import sys

    from cascade_bench.bench.memory_family import _save

    _save(create_model("infini", **TINY), tmp_path / "m", {"epochs": 1})
    code = (
        "import sys; from cascade_bench.bench.memory_family import _saved; "
        "model, history = _saved(__import__('pathlib').Path(sys.argv[1])); print(type(model).__name__, history)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "MemoryLMForCausalLM"
