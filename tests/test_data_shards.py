"""Memmap token shards: the tokens read back equal encode_batch of the texts; windows; dtype choice; errors."""

import json
import warnings

import numpy as np
import pytest
import torch

from gptgen import Tokenizer
from gptgen.data.readers import InvalidUTF8Warning, read_paragraphs
from gptgen.data.shards import MANIFEST, ShardDataset, choose_dtype, prepare_shards
from gptgen.errors import DataError


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return Tokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def shakespeare(data_dir):
    return [line for line in (data_dir / "tinyshakespeare" / "input.txt").read_text("utf-8").split("\n")
            if line.strip()][:6000]


def reference_stream(tok, texts, add_bos=False, add_eos=True):
    return np.concatenate([np.asarray(ids, dtype=np.int64)
                           for ids in tok.encode_batch(texts, add_bos=add_bos, add_eos=add_eos)])


def test_round_trip_equals_encode_batch_across_shards(gpt2, shakespeare, tmp_path):
    manifest = prepare_shards(shakespeare, gpt2, tmp_path / "s", shard_tokens=7_000, batch_texts=500)
    expected = reference_stream(gpt2, shakespeare)
    assert manifest["dtype"] == "uint16" and manifest["num_tokens"] == len(expected)
    assert manifest["num_documents"] == len(shakespeare)
    sizes = [s["num_tokens"] for s in manifest["shards"]]
    assert len(sizes) == -(-len(expected) // 7_000) and all(n == 7_000 for n in sizes[:-1])
    for shard in manifest["shards"]:  # raw files hold exactly their tokens, 2 bytes each
        assert (tmp_path / "s" / shard["file"]).stat().st_size == 2 * shard["num_tokens"]
    ds = ShardDataset(tmp_path / "s", seq_len=32)
    assert np.array_equal(ds.tokens(), expected)
    assert json.loads((tmp_path / "s" / MANIFEST).read_text()) == manifest
    assert Tokenizer.from_pretrained(ds.tokenizer_dir).encode("hello world") == gpt2.encode("hello world")


def test_worker_processes_give_the_same_stream(gpt2, shakespeare, tmp_path):
    texts = shakespeare[:1500]
    prepare_shards(texts, gpt2, tmp_path / "one", num_workers=1, add_bos=True, batch_texts=100)
    prepare_shards(texts, gpt2, tmp_path / "two", num_workers=2, add_bos=True, batch_texts=100)
    one, two = ShardDataset(tmp_path / "one", 8).tokens(), ShardDataset(tmp_path / "two", 8).tokens()
    assert np.array_equal(one, two)
    assert np.array_equal(one, reference_stream(gpt2, texts, add_bos=True))


def test_files_are_read_lazily_by_reader_mode(gpt2, data_dir, tmp_path):
    books = [data_dir / "books" / "blake-poems.txt", data_dir / "books" / "shakespeare-caesar.txt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidUTF8Warning)
        manifest = prepare_shards(books, gpt2, tmp_path / "p", mode="paragraphs", min_length=100, add_eos=False)
        paragraphs = read_paragraphs(books, min_length=100)
    assert manifest["num_documents"] == len(paragraphs)
    assert np.array_equal(ShardDataset(tmp_path / "p", 8).tokens(), reference_stream(gpt2, paragraphs, add_eos=False))


def test_dtype_choice_and_uint32_round_trip(gpt2_tokenizer_dir, tmp_path):
    assert choose_dtype(5_000) == np.uint16
    assert choose_dtype(65_536) == np.uint16  # ids 0..65535 fit
    assert choose_dtype(65_537) == np.uint32
    assert choose_dtype(50_257) == np.uint16
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_special_tokens([f"<x{i}>" for i in range(65_537 - tok.vocab_size)])
    last = f"<x{65_537 - 50_257 - 1}>"
    assert tok.token_to_id(last) == 65_536
    texts = [f"a {last} b", "plain text", f"{last}{last}"]
    manifest = prepare_shards(texts, tok, tmp_path / "u32")
    assert manifest["dtype"] == "uint32"
    stream = ShardDataset(tmp_path / "u32", 2).tokens()
    assert np.array_equal(stream, reference_stream(tok, texts))
    assert int(stream.max()) == 65_536  # would wrap to 0 in uint16
    assert (tmp_path / "u32" / "shard_00000.bin").stat().st_size == 4 * len(stream)


def test_random_windows_are_slices_of_the_stream_and_reproducible(gpt2, shakespeare, tmp_path):
    prepare_shards(shakespeare, gpt2, tmp_path / "w", shard_tokens=5_000)
    ds = ShardDataset(tmp_path / "w", seq_len=16, seed=7)
    stream = ds.tokens()
    sizes = [s["num_tokens"] for s in ds.manifest["shards"]]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    assert len(ds) == len(stream) // 16
    again = ShardDataset(tmp_path / "w", seq_len=16, seed=7)
    other = ShardDataset(tmp_path / "w", seq_len=16, seed=8)
    starts, shard_hits = [], np.zeros(len(sizes))
    for i in range(400):
        item = ds[i]
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])
        assert item["loss_mask"].all() and item["input_ids"].dtype == torch.long
        k, start = ds._locate(i)
        assert start + 17 <= sizes[k]  # never crosses a shard boundary
        flat = offsets[k] + start
        assert np.array_equal(np.concatenate([item["input_ids"].numpy(), item["labels"][-1:].numpy()]),
                              stream[flat: flat + 17])
        assert torch.equal(again[i]["input_ids"], item["input_ids"])
        starts.append(flat)
        shard_hits[k] += 1
    assert sum(torch.equal(other[i]["input_ids"], ds[i]["input_ids"]) for i in range(400)) < 5
    # shards are drawn in proportion to their window starts: a chi-square test at a generous threshold
    counts = np.maximum(np.array(sizes) - 16, 0)
    expected = 400 * counts / counts.sum()
    chi2 = float(((shard_hits - expected) ** 2 / expected).sum())
    assert chi2 < 3 * len(sizes) + 30
    ds[0]  # opens a memmap in this process; worker processes open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = [b for _, b in zip(range(3), loader)]
    assert [b["input_ids"].shape for b in batches] == [(8, 16)] * 3
    assert torch.equal(batches[2]["input_ids"], torch.stack([ds[i]["input_ids"] for i in range(16, 24)]))


def test_sequential_windows_count_every_label_once(gpt2, shakespeare, tmp_path):
    prepare_shards(shakespeare[:800], gpt2, tmp_path / "q", shard_tokens=3_000)
    ds = ShardDataset(tmp_path / "q", seq_len=50, sequential=True)
    sizes = [s["num_tokens"] for s in ds.manifest["shards"]]
    assert len(ds) == sum((n - 1) // 50 for n in sizes)
    stream = ds.tokens()
    first = ds[0]
    assert np.array_equal(first["input_ids"].numpy(), stream[:50])
    assert np.array_equal(first["labels"].numpy(), stream[1:51])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shard_errors(gpt2, tmp_path):
    (tmp_path / "src.txt").write_text("short line\nanother\n")
    with pytest.raises(DataError, match="The corpus is empty"):
        prepare_shards([], gpt2, tmp_path / "empty")
    assert not (tmp_path / "empty").exists() and not (tmp_path / "empty.partial").exists()
    with pytest.raises(DataError, match="tokenises to 0 token"):
        prepare_shards(["", ""], gpt2, tmp_path / "blank", add_eos=False)
    with pytest.raises(DataError, match="The corpus is empty.*min_length"):
        prepare_shards(tmp_path / "src.txt", gpt2, tmp_path / "short", min_length=50)
    with pytest.raises(DataError, match="takes strings or paths"):
        prepare_shards([1, 2], gpt2, tmp_path / "ints")
    prepare_shards(["one two three four five"], gpt2, tmp_path / "ok")
    with pytest.raises(DataError, match="already holds prepared shards"):
        prepare_shards(["again"], gpt2, tmp_path / "ok")
    prepare_shards(["again and again"], gpt2, tmp_path / "ok", overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare_shards(["text"], gpt2, tmp_path / "busy")
    with pytest.raises(DataError, match="lower seq_len"):
        ShardDataset(tmp_path / "ok", seq_len=100)
    with pytest.raises(DataError, match="holds no manifest.json; prepare it first"):
        ShardDataset(tmp_path / "busy", seq_len=4)
    shard = tmp_path / "ok" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="missing or truncated"):
        ShardDataset(tmp_path / "ok", seq_len=2)
    with pytest.raises(DataError, match="Unknown reader mode"):
        prepare_shards(tmp_path / "busy", gpt2, tmp_path / "x", mode="xml")
    with pytest.raises(DataError, match="apply only to paths"):
        prepare_shards(["text"], gpt2, tmp_path / "y", min_length=3)
