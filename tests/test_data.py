"""Tests for lensforge.data: sources, stdlib corpus, packing (exactness, resume, sharding),
self-distillation and AlpacaEval instructions. Tokenizers are trained here; no downloads."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lensforge.data import (
    BUILTIN_INSTRUCTIONS,
    PackedTokenStream,
    alpaca_instructions,
    format_chat,
    generate_documents,
    iter_documents,
    split_text,
    stdlib_document_names,
)
from lensforge.data.sources import iter_txt
from lensforge.data.stdlib_corpus import read_stdlib_document, split_names
from lensforge.errors import ConfigError, DataError, DataExhaustedError

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu nu xi omicron pi rho".split()


def random_docs(n: int, seed: int, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: piece-wise tokenization is exactly whole-doc tokenization."""
    vocab = {"[UNK]": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(random_docs(50, seed=1) + ["Hello, world! The quick fox."], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def reference_rows(docs: list[str], tokenizer, seq_len: int, bos: bool = False) -> list[list[int]]:
    """Slow reference: tokenize each whole document, join with EOS, cut into rows."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = seq_len - 1 if bos else seq_len
    prefix = [tokenizer.bos_token_id] if bos else []
    return [prefix + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]


# -- sources ---------------------------------------------------------------------------------


def test_file_types_gz_and_recursive_sorted_folder(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("plain text document\n")
    with gzip.open(tmp_path / "b" / "c.txt.gz", "wt") as f:
        f.write("gzipped text")
    (tmp_path / "b" / "a.jsonl").write_text(
        json.dumps({"body": "json one"}) + "\n\n" + json.dumps({"body": "json two"}) + "\n"
    )
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz json", "other": 1}) + "\n")
    table = pa.table({"body": [f"row {i}" for i in range(7)] + [None, "   "]})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=3)
    (tmp_path / "notes.md").write_text("ignored: unsupported suffix")
    (tmp_path / ".hidden.txt").write_text("ignored: hidden")

    docs = list(iter_documents(tmp_path, text_field="body"))
    expected = ["plain text document\n", "json one", "json two", "gzipped text", "gz json"]
    assert docs == expected + [f"row {i}" for i in range(7)]
    assert list(iter_documents(tmp_path / "e.parquet", text_field="body"))[-1] == "row 6"
    assert list(iter_documents(str(tmp_path / "b" / "c.txt.gz"))) == ["gzipped text"]


def test_large_txt_is_cut_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 + 1) + "\n" for i in range(60)]
    text = "\n".join(paragraphs)
    path = tmp_path / "big.txt"
    path.write_text(text)
    chunks = list(iter_txt(path, chunk_chars=100))
    assert len(chunks) > 5
    assert "".join(chunks) == text  # nothing lost or duplicated
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n\n") and len(chunk) >= 100


def test_jsonl_missing_field_names_field_and_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"'text'.*content|data\.jsonl.*'text'") as info:
        list(iter_documents(path))
    assert "data.jsonl" in str(info.value) and "'text'" in str(info.value)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(tmp_path / "p.parquet"))


def test_empty_and_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        list(iter_documents(tmp_path))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no readable data files"):
        iter_documents(tmp_path / "sub")
    with pytest.raises(DataError, match="does not exist"):
        iter_documents(tmp_path / "nope.txt")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match="datasets"):
            iter_documents("someone/some-dataset")


# -- stdlib corpus ---------------------------------------------------------------------------


def test_stdlib_split_is_deterministic_and_disjoint() -> None:
    names = stdlib_document_names()
    assert names == stdlib_document_names() and len(names) > 300
    assert not any("/test/" in n or n.startswith("module:test/") or "idlelib" in n for n in names)
    train, heldout = split_names("train"), split_names("heldout")
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(names)
    assert 0.02 < len(heldout) / len(names) < 0.10
    # Stable across processes (hash() would not be): recompute in a fresh interpreter.
    # run_path: only this module and lensforge.errors, not torch (keeps the test fast).
    code = (
        "import runpy; ns = runpy.run_path('lensforge/data/stdlib_corpus.py'); "
        "print(ns['split_names']('heldout'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).parent.parent,
    ).stdout  # fmt: skip
    assert eval(out) == heldout
    first = next(iter_documents("stdlib:heldout"))
    assert first == read_stdlib_document(heldout[0]) and first.strip()
    assert sum(len(read_stdlib_document(n)) for n in train[::50]) > 50_000


# -- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [False, True])
def test_packing_matches_slow_reference(word_tokenizer, bos: bool) -> None:
    docs = random_docs(40, seed=2) + [" ".join(WORDS * 30)]  # one long doc, split in pieces
    stream = PackedTokenStream(
        lambda: iter(docs), word_tokenizer, seq_len=13, bos=bos, docs_per_batch=7, chunk_chars=24
    )
    rows = [row.tolist() for row in stream]
    assert rows == reference_rows(docs, word_tokenizer, 13, bos=bos)
    assert all(len(r) == 13 for r in rows) and len(rows) > 20


def test_packing_bpe_and_split_text(bpe_tokenizer) -> None:
    docs = ["Hello, world!", "The quick fox.", ""] + random_docs(10, seed=3)
    rows = [r.tolist() for r in PackedTokenStream(lambda: iter(docs), bpe_tokenizer, seq_len=8)]
    assert rows == reference_rows(docs, bpe_tokenizer, 8)
    text = " ".join(WORDS * 5)
    pieces = list(split_text(text, 20))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 20


def test_resume_gives_the_same_batches(word_tokenizer) -> None:
    docs = random_docs(60, seed=4)

    def make() -> PackedTokenStream:
        return PackedTokenStream(lambda: iter(docs), word_tokenizer, seq_len=11, docs_per_batch=5)

    full = list(make().batches(3))
    assert len(full) > 6
    for k in (1, 4):
        first = make()
        batches = first.batches(3)
        for _ in range(k):
            next(batches)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(resumed.batches(3))
        assert len(rest) == len(full) - k
        assert all(torch.equal(a, b) for a, b in zip(rest, full[k:], strict=True))


def test_sharding_partitions_and_resumes_across_world_sizes(word_tokenizer) -> None:
    docs = random_docs(50, seed=5)

    def make(rank: int, world: int) -> PackedTokenStream:
        return PackedTokenStream(
            lambda: iter(docs), word_tokenizer, seq_len=9, rank=rank, world_size=world
        )

    global_rows = [r.tolist() for r in make(0, 1)]
    shards = [[r.tolist() for r in make(rank, 3)] for rank in range(3)]
    n = len(shards[0])
    assert all(len(s) == n for s in shards) and n == len(global_rows) // 3
    assert [shards[i % 3][i // 3] for i in range(3 * n)] == global_rows[: 3 * n]

    # Two ranks consume 4 rows each, then the run resumes on three ranks.
    streams = [make(rank, 2) for rank in range(2)]
    for rank, s in enumerate(streams):
        rows_iter = iter(s)
        assert [next(rows_iter).tolist() for _ in range(4)] == global_rows[rank:8:2]
    states = [s.state_dict() for s in streams]
    assert states[0] == states[1] and states[0]["sequences"] == 8
    resumed = [make(rank, 3) for rank in range(3)]
    for s in resumed:
        s.load_state_dict(states[0])
    rows = [[r.tolist() for r in s] for s in resumed]
    m = len(rows[0])
    assert [rows[i % 3][i // 3] for i in range(3 * m)] == global_rows[8 : 8 + 3 * m]


def test_take_tokens_and_exhaustion(word_tokenizer) -> None:
    docs = random_docs(30, seed=6)
    total_rows = len(reference_rows(docs, word_tokenizer, 10))
    stream = PackedTokenStream(lambda: iter(docs), word_tokenizer, seq_len=10)
    got = list(stream.take_tokens(45, batch_size=2))  # 45 tokens -> 3 batches of 2x10
    assert [b.shape for b in got] == [torch.Size([2, 10])] * 3
    assert stream.tokens_consumed == 60
    too_many = (total_rows + 1) * 10
    stream = PackedTokenStream(lambda: iter(docs), word_tokenizer, seq_len=10)
    with pytest.raises(DataExhaustedError, match=rf"of the requested {too_many:,}; add data"):
        list(stream.take_tokens(too_many, batch_size=1))
    assert stream.tokens_consumed == total_rows * 10


def test_packing_config_errors(word_tokenizer, bpe_tokenizer) -> None:
    docs = ["alpha beta"]
    no_eos = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer)
    with pytest.raises(ConfigError, match="no EOS"):
        PackedTokenStream(lambda: iter(docs), no_eos, seq_len=4)
    assert PackedTokenStream(lambda: iter(docs), no_eos, seq_len=4, eos_id=0).eos_id == 0
    with pytest.raises(ConfigError, match="callable"):
        PackedTokenStream(iter(docs), word_tokenizer, seq_len=4)  # type: ignore[arg-type]
    state = PackedTokenStream(lambda: iter(docs), word_tokenizer, seq_len=4).state_dict()
    with pytest.raises(ConfigError, match="seq_len"):
        PackedTokenStream(lambda: iter(docs), word_tokenizer, seq_len=5).load_state_dict(state)


# -- self-distillation and instructions ------------------------------------------------------


def test_generate_documents_is_seeded(bpe_tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=bpe_tokenizer.bos_token_id, eos_token_id=bpe_tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    prompts = ["Hello", "The quick"]

    def run(seed: int) -> list[str]:
        return list(
            generate_documents(model, bpe_tokenizer, 5, max_new_tokens=12, prompts=prompts,
                               seed=seed, batch_size=2)
        )  # fmt: skip

    rng_before = torch.get_rng_state()
    a = run(0)
    assert torch.equal(rng_before, torch.get_rng_state())  # global RNG untouched
    assert len(a) == 5 and a == run(0) and a != run(1)
    assert a[0].startswith("Hello") and a[1].startswith("The quick")


def test_alpaca_instructions_sources(tmp_path: Path) -> None:
    records = [{"instruction": f"do task {i}", "output": "..."} for i in range(4)]
    (tmp_path / "example").mkdir()
    (tmp_path / "example" / "outputs.json").write_text(json.dumps(records))
    expected = [r["instruction"] for r in records]
    assert alpaca_instructions(tmp_path) == expected
    assert alpaca_instructions(tmp_path / "example" / "outputs.json") == expected
    sdist = tmp_path / "alpaca_eval-0.6.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / "example" / "outputs.json", "alpaca_eval-0.6.6/example/outputs.json")
    assert alpaca_instructions(sdist) == expected
    with pytest.raises(DataError, match="does not exist"):
        alpaca_instructions(tmp_path / "missing.json")

    cache = tmp_path / "cache" / "outputs.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = alpaca_instructions(cache_path=cache, download=False)
    assert fallback == list(BUILTIN_INSTRUCTIONS) and len(fallback) >= 30
    assert any("built-in" in str(w.message) for w in caught)
    cache.parent.mkdir()
    cache.write_text(json.dumps(records[:2]))
    assert alpaca_instructions(cache_path=cache, download=False) == expected[:2]


def test_format_chat(word_tokenizer) -> None:
    assert format_chat(word_tokenizer, "say hi") == "say hi"
    templated = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer)
    templated.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_chat(templated, "say hi") == "<user>say hi<assistant>"
