"""The memory-layer LM family: Hugging Face registration, causality, memory state, compressive memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cascade_bench.models.memory_lm import MEMORY_PRESETS, MemoryLMConfig, create_model
from cascade_bench.models.memory_lm.compressive import CompressiveMemory

TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, segment_length=4)
MEMORY_TYPES = ("infini", "multi_memory", "hierarchical")


def tiny(name: str, **options):
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **options}).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MEMORY_PRESETS))
def test_presets_round_trip_through_the_auto_classes(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny(name)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_kinds == list(MEMORY_PRESETS[name])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    x = ids(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("layer_type", ("pythia", *MEMORY_TYPES))
def test_every_layer_type_is_causal(layer_type):
    model = tiny("pythia", layer_kinds=(layer_type, layer_type))
    x = ids(1, 13)  # three full segments of 4 and a partial one
    with torch.no_grad():
        base = model(x).logits
        for t in (2, 4, 9, 12):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % TINY["vocab_size"]
            out = model(changed).logits
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("layer_type", MEMORY_TYPES)
def test_two_segments_in_one_pass_equal_two_passes_carrying_the_memory(layer_type):
    # Memory layers only: a segment sees its own tokens and the memory of the earlier ones, so
    # splitting at a segment boundary and carrying the state changes nothing.
    model = tiny("pythia", layer_kinds=(layer_type, layer_type))
    x = ids(2, 8)
    with torch.no_grad():
        whole = model(x).logits
        first = model(x[:, :4])
        second = model(x[:, 4:], position_ids=torch.arange(4, 8)[None], memory_state=first.memory_state)
        empty = model(x[:, 4:], position_ids=torch.arange(4, 8)[None])
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole, rtol=0, atol=1e-5)
    assert not torch.allclose(empty.logits, second.logits)  # the memory carries something


def test_carry_memory_continues_from_the_models_own_state():
    model = tiny("infini")
    x = ids(1, 8)
    with torch.no_grad():
        model(x[:, :4])
        explicit = model(x[:, 4:], memory_state=model.get_memory_state()).logits
        model(x[:, :4])
        model.carry_memory = True
        carried = model(x[:, 4:]).logits
        model.reset_memory()
        fresh = model(x[:, 4:]).logits
    torch.testing.assert_close(carried, explicit, rtol=0, atol=0)
    assert not torch.allclose(fresh, carried)
    assert tiny("pythia")(x).memory_state is None  # no memory layers, no state


@pytest.mark.parametrize("name", MEMORY_TYPES)
def test_memory_updates_leave_no_graph(name):
    model = tiny(name).train()
    out = model(ids(2, 9), labels=ids(2, 9))
    out.loss.backward()  # one backward through the memory reads works

    def tensors(node):
        if isinstance(node, torch.Tensor):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from tensors(value)
        elif isinstance(node, list):
            for value in node:
                yield from tensors(value)

    found = list(tensors(out.memory_state))
    assert found and all(t.grad_fn is None and not t.requires_grad for t in found)
    assert model.model.layers[0].attention.qkv.weight.grad is not None


TRANSFER = r"""
import sys, torch
import cascade_bench.models.memory_lm  # registers the family: nothing else needed to load a saved memory model
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
model.set_memory_state(torch.load(f"{folder}/memory.pt"))  # the next forward starts from it
with torch.no_grad():
    logits = model(torch.load(f"{folder}/ids.pt")).logits
torch.save(logits, f"{folder}/logits.pt")
"""


@pytest.mark.parametrize("name", MEMORY_TYPES)
def test_memory_state_saved_here_gives_the_same_logits_in_a_fresh_process(name, tmp_path):
    model = tiny(name)
    x = ids(2, 12)
    with torch.no_grad():
        model(x[:, :8])
        state = model.get_memory_state()
        expected = model(x[:, 8:], memory_state=state).logits
    model.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "memory.pt")
    torch.save(x[:, 8:], tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", TRANSFER, str(tmp_path)], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_state_size_of_one_infini_bank_at_hidden_512():
    model = create_model("infini", hidden_size=512, num_attention_heads=8, intermediate_size=64, vocab_size=16)
    with torch.no_grad():
        model(ids(1, 5) % 16)
    # One bank, batch 1, float32: a 512 x 512 matrix and a 512 normaliser.
    assert model.memory_state_bytes() == (512 * 512 + 512) * 4


def test_pythia_decodes_with_its_kv_cache_as_without():
    model = tiny("pythia")
    x = ids(2, 6)
    cached = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    plain = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("kind", MEMORY_TYPES)
@pytest.mark.parametrize("chunks", [(11, 1, 1, 1, 1), (3, 5, 2, 6)])
def test_memory_layers_decode_with_a_fixed_size_cache_as_without_one(kind, chunks):
    """Prefill and later calls of any size (crossing segment boundaries of 4) give the logits of one
    uncached forward; the layer's cache never holds more than one segment."""
    from transformers import DynamicCache

    from cascade_bench.models.memory_lm.segment_cache import SegmentLayer

    model = tiny(kind, layer_kinds=(kind, "pythia", kind), delta_rule=kind == "infini")
    x = ids(2, sum(chunks))
    with torch.no_grad():
        whole = model(x).logits
        cache, parts, start = DynamicCache(), [], 0
        for size in chunks:
            out = model(x[:, start : start + size], cache=cache, use_cache=True)
            parts.append(out.logits)
            start += size
            slots = [layer for layer in cache.layers if isinstance(layer, SegmentLayer)]
            assert len(slots) == 2 and all(slot.keys is None or slot.keys.shape[2] < 4 for slot in slots)
            assert cache.get_seq_length() == start
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_memory_layers_generate_with_a_cache_as_without_and_refuse_padding():
    model = tiny("hierarchical")
    x = ids(2, 7)
    real = torch.ones_like(x)
    cached = model.generate(x, attention_mask=real, max_new_tokens=9, do_sample=False, use_cache=True, pad_token_id=0)
    plain = model.generate(x, attention_mask=real, max_new_tokens=9, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)
    padded = torch.ones(2, 7, dtype=torch.long)
    padded[0, :2] = 0
    with pytest.raises(NotImplementedError, match="every row has a real token"):
        model(x, attention_mask=padded, use_cache=True)


# -- the compressive memory, by hand -------------------------------------------------------------


def test_one_written_token_is_returned_for_any_query():
    memory = CompressiveMemory.empty(1, 3, 1, "cpu", torch.float32)
    assert torch.equal(memory.read(torch.randn(1, 2, 3)), torch.zeros(1, 2, 3))  # nothing written: zero
    k, v = torch.randn(1, 1, 3), torch.tensor([[[1.0, -2.0, 0.5]]])
    memory = memory.written(k, v, None, delta_rule=False, segments_per_bank=0)
    # phi(q) phi(k)^T v / (phi(q) . phi(k)) = v
    torch.testing.assert_close(memory.read(torch.randn(1, 4, 3)), v.expand(1, 4, 3), rtol=0, atol=1e-5)


def test_the_delta_rule_does_not_write_what_the_memory_already_returns():
    k, v = torch.randn(1, 1, 3), torch.randn(1, 1, 3)
    once = CompressiveMemory.empty(1, 3, 1, "cpu", torch.float32).written(k, v, None, True, 0)
    twice = once.written(k, v, None, True, 0)
    torch.testing.assert_close(twice.memory, once.memory, rtol=0, atol=1e-5)
    plain = once.written(k, v, None, False, 0)
    torch.testing.assert_close(plain.memory, 2 * once.memory)  # without it, the same write counts twice


def test_banks_form_a_ring_that_forgets_the_oldest():
    k = torch.ones(1, 1, 2)  # equal keys: a read averages the values still held
    values = [torch.tensor([[[float(i), 0.0]]]) for i in (1, 2, 3)]
    memory = CompressiveMemory.empty(1, 2, 2, "cpu", torch.float32)
    for v in values:
        memory = memory.written(k, v, None, False, segments_per_bank=1)
    # bank 0 took 1, bank 1 took 2, then bank 0 was cleared and took 3: (2 + 3) / 2
    assert (memory.bank, memory.filled) == (0, 1)
    torch.testing.assert_close(memory.read(torch.randn(1, 1, 2)), torch.tensor([[[2.5, 0.0]]]), rtol=0, atol=1e-5)


def test_padding_writes_nothing():
    memory = CompressiveMemory.empty(2, 3, 1, "cpu", torch.float32)
    valid = torch.tensor([[False, False], [True, False]])
    memory = memory.written(torch.randn(2, 2, 3), torch.randn(2, 2, 3), valid, False, 0)
    assert memory.memory[0, 0].abs().sum() == 0 and memory.normaliser[0, 0].abs().sum() == 0
    assert memory.memory[0, 1].abs().sum() > 0


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(layer_kinds=("pythia", "mamba")), "layer_kinds"),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(segment_length=0), "segment_length"),
        (dict(segments_per_bank=-1), "segments_per_bank"),
    ],
)
def test_bad_config_values_name_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        MemoryLMConfig(**options)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="unknown memory-LM preset 'mamba'.*hierarchical"):
        create_model("mamba")


def test_unknown_keywords_are_refused_not_swallowed():
    """A keyword the model does not know (a misspelling, or a name a future transformers passes)
    is a TypeError naming it: a generate() that hands the cache under a new name fails loudly
    instead of decoding without its cache (what happened on transformers 5.24)."""
    model = tiny("infini")
    x = ids(1, 5)
    with pytest.raises(TypeError, match="update_memroy"):
        model(x, update_memroy=False)
    with pytest.raises(TypeError, match="bogus"):
        model.model(x, bogus=1)


def test_the_cache_is_one_argument_under_either_name():
    from transformers import DynamicCache

    model = tiny("pythia")
    x = ids(1, 6)
    with torch.no_grad():
        new, old = DynamicCache(), DynamicCache()
        a = model(x[:, :4], cache=new, use_cache=True)
        b = model(x[:, :4], past_key_values=old, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits)
        assert new.get_seq_length() == old.get_seq_length() == 4
        with pytest.raises(ValueError, match="not both"):
            model(x[:, 4:], cache=new, past_key_values=old, use_cache=True)


@pytest.mark.parametrize("name", MEMORY_TYPES)
def test_every_parameter_that_shapes_the_output_learns(name):
    """After one backward every parameter of every layer kind gets a gradient: the projections
    that only write the memories (multi_memory's memory_keys_values) learn through the later
    segments' reads in the same forward (they used to get none: writes were detached)."""
    model = tiny(name).train()
    x = ids(2, 13)  # segments of 4: three writes read by later segments
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"


def test_the_seeds_names_are_refused_with_the_name_to_use():
    with pytest.raises(TypeError, match="this family calls it delta_rule"):
        MemoryLMConfig(use_delta_rule=True)
    model = tiny("infini")
    with pytest.raises(TypeError, match="update_memory .* get_memory_state"):
        model(ids(1, 5), update_memory=False)


def test_a_state_set_is_the_state_the_next_forward_starts_from():
    model = tiny("infini")  # carry_memory stays False
    x = ids(1, 8)
    with torch.no_grad():
        state = model(x[:, :4]).memory_state
        explicit = model(x[:, 4:], memory_state=state).logits
        model.set_memory_state(state)
        from_set = model(x[:, 4:]).logits
        after = model(x[:, 4:]).logits  # not carried on without carry_memory: starts empty again
        fresh = model.__class__(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        empty = fresh(x[:, 4:]).logits
    torch.testing.assert_close(from_set, explicit, rtol=0, atol=0)
    torch.testing.assert_close(after, empty, rtol=0, atol=0)
