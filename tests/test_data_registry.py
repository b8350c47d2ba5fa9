"""Named data sets from the local data directory, checksums, downloads from file:// URLs, and the CLI."""

import hashlib
import io
import json
import warnings
import zipfile

import numpy as np
import pytest

from gptgen.cli import main
from gptgen.data import registry
from gptgen.data.readers import InvalidUTF8Warning
from gptgen.data.registry import (ASSETS_DIR, DATASETS, DatasetSpec, Download, data_dir, download_dataset,
                                  resolve_dataset, verify_dataset)
from gptgen.data.shards import ShardDataset
from gptgen.errors import DataError


@pytest.fixture(autouse=True)
def quiet_utf8():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidUTF8Warning)
        yield


def test_books_is_the_quality_bar_data_set(data_dir):
    train, val = resolve_dataset("books", root=data_dir)
    assert (len(train), len(val)) == (3012, 329)
    assert min(map(len, train)) > 512 and min(map(len, val)) > 512
    everything = resolve_dataset("books", root=data_dir, split=None, min_length=0)
    assert set(val) <= set(everything[9::10]) and not set(val) & set(train)
    assert len(everything) == len(resolve_dataset("books", root=data_dir, split="every_nth:10", min_length=0)[0]) \
        + len(everything) // 10


def test_the_other_data_sets_resolve_from_the_data_dir(data_dir, monkeypatch):
    monkeypatch.setenv("GPTGEN_DATA_DIR", str(data_dir))
    assert data_dir.samefile(registry.data_dir())
    chat = resolve_dataset("chatbot-ko")
    assert len(chat) == 11823 and chat[0] == "<s>12시 땡!</s><s>하루가 또 가네요.</s>"
    poems = resolve_dataset("tang-poems")
    n_items = sum(len(json.loads(f.read_text("utf-8")))
                  for f in (data_dir / "chinese-poetry" / "tang").glob("poet.tang.*.json"))
    assert 0 < n_items - len(poems) < 0.01 * n_items  # poems with no text are the only ones skipped
    train, val = resolve_dataset("tinyshakespeare")
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.001
    assert all("\n" in s or ":" in s for s in train[:50])  # speeches keep their lines
    assert resolve_dataset("tinyshakespeare", seed=1)[1] != val


def test_data_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("GPTGEN_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir() == tmp_path / ".cache" / "gptgen" / "data"


def test_packaged_quickstart_needs_no_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTGEN_DATA_DIR", str(tmp_path / "nothing"))
    train, val = resolve_dataset("quickstart")
    lines = [line for line in (ASSETS_DIR / "persuasion.txt").read_text("utf-8").splitlines() if line]
    assert len(train) + len(val) == len(lines) and val == lines[9::10]
    size = sum(p.stat().st_size for p in ASSETS_DIR.iterdir())
    assert size < 1_000_000
    assert "Gutenberg" in (ASSETS_DIR / "README.md").read_text()


def test_every_spec_is_complete():
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.files and spec.url.startswith("https://") and spec.license
        if not spec.packaged:
            assert spec.downloads and set(d.path for d in spec.downloads) == set(spec.sha256)
            assert all(len(h) == 64 for h in spec.sha256.values())


def test_shared_data_matches_the_recorded_checksums(data_dir):
    for name in ("books", "tinyshakespeare", "chatbot-ko", "tang-poems"):
        assert verify_dataset(name, data_dir) == {}


def test_unknown_and_missing_data_sets(tmp_path):
    with pytest.raises(DataError, match=r"Unknown data set 'wiki'; choose one of books, "):
        resolve_dataset("wiki")
    with pytest.raises(DataError, match=r"'books' is not in .*; set GPTGEN_DATA_DIR .* "
                                        r"`gptgen datasets download books`"):
        resolve_dataset("books", root=tmp_path)
    assert verify_dataset("chatbot-ko", tmp_path) == {"chatbot-ko/ChatbotData.csv": "missing"}


def _spec_with(tmp_path, downloads, sha256):
    return DatasetSpec("toy", "a toy", files=("toy/*.txt",), mode="lines", url="https://example.org",
                       license="none", downloads=downloads, sha256=sha256)


def test_download_from_file_urls_checks_sha256(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    plain, member = b"first line\nsecond line\n", b"zipped line\n"
    (src / "plain.txt").write_bytes(plain)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("corpus/inner.txt", member)
    (src / "pack.zip").write_bytes(buf.getvalue())
    downloads = (Download("toy/a.txt", (src / "plain.txt").as_uri()),
                 Download("toy/b.txt", (src / "pack.zip").as_uri(), "corpus/inner.txt"))
    sha = {"toy/a.txt": hashlib.sha256(plain).hexdigest(), "toy/b.txt": hashlib.sha256(member).hexdigest()}
    spec = _spec_with(tmp_path, downloads, sha)
    root = tmp_path / "data"
    assert download_dataset(spec, root) == root
    assert (root / "toy" / "a.txt").read_bytes() == plain and (root / "toy" / "b.txt").read_bytes() == member
    assert resolve_dataset(spec, root=root) == ["first line", "second line", "zipped line"]
    assert verify_dataset(spec, root) == {}
    (root / "toy" / "a.txt").write_bytes(b"tampered\n")
    assert verify_dataset(spec, root) == {"toy/a.txt": "checksum mismatch"}
    download_dataset(spec, root)  # repairs the file that no longer matches
    assert verify_dataset(spec, root) == {}

    bad = _spec_with(tmp_path, downloads, {**sha, "toy/a.txt": "0" * 64})
    with pytest.raises(DataError, match=r"sha256 .* expected 000000000000.*was not written"):
        download_dataset(bad, tmp_path / "other")
    assert not (tmp_path / "other" / "toy" / "a.txt").exists()
    gone = _spec_with(tmp_path, (Download("toy/c.txt", (src / "missing.txt").as_uri()),), {})
    with pytest.raises(DataError, match=r"Cannot download .*missing.txt"):
        download_dataset(gone, tmp_path / "third")


def test_a_spec_with_separate_validation_files(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.txt").write_text("a long training line\nshort\nanother training line\n")
    (tmp_path / "toy" / "valid.txt").write_text("a validation line\n")
    spec = DatasetSpec("toy", "a toy", files=("toy/train.txt",), val_files=("toy/valid.txt",), mode="lines",
                       min_length=5)
    assert resolve_dataset(spec, root=tmp_path) == (["a long training line", "another training line"],
                                                    ["a validation line"])
    assert resolve_dataset(spec, root=tmp_path, split=None) == ["a long training line", "another training line"]
    (tmp_path / "toy" / "valid.txt").unlink()
    with pytest.raises(DataError, match=r"'toy' is not in .*looked for toy/valid.txt"):
        resolve_dataset(spec, root=tmp_path)


# The CLI ------------------------------------------------------------------------------------------
def test_cli_prepare_files_with_validation_split(gpt2_tokenizer_dir, tmp_path, capsys):
    from gptgen import Tokenizer

    corpus = tmp_path / "corpus.txt"
    lines = [f"line number {i} of the corpus" for i in range(200)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    rc = main(["prepare", str(corpus), "--tokenizer", str(gpt2_tokenizer_dir), "-o", str(out),
               "--split", "every_nth:10", "--shard-tokens", "1000"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "of 180 documents" in printed and "of 20 documents" in printed and "uint16" in printed
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    val = ShardDataset(out / "val", seq_len=4).tokens()
    expected = np.concatenate([ids for ids in tok.encode_batch(lines[9::10], add_eos=True)])
    assert np.array_equal(val, expected)


def test_cli_prepare_dataset_and_errors(data_dir, gpt2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTGEN_DATA_DIR", str(data_dir))
    rc = main(["prepare", "--dataset", "chatbot-ko", "--tokenizer", str(gpt2_tokenizer_dir),
               "-o", str(tmp_path / "chat"), "--no-eos"])
    assert rc == 0 and "of 11,823 documents" in capsys.readouterr().out
    assert ShardDataset(tmp_path / "chat", 16).manifest["add_eos"] is False
    rc = main(["prepare", "--dataset", "nope", "--tokenizer", str(gpt2_tokenizer_dir), "-o", str(tmp_path / "n")])
    assert rc == 2 and "Unknown data set 'nope'" in capsys.readouterr().err
    rc = main(["prepare", "--tokenizer", str(gpt2_tokenizer_dir), "-o", str(tmp_path / "n")])
    assert rc == 2 and "either input files or --dataset" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["prepare", str(empty), "--tokenizer", str(gpt2_tokenizer_dir), "-o", str(tmp_path / "e")])
    assert rc == 2 and "The corpus is empty" in capsys.readouterr().err


def test_cli_datasets_list_and_verify(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("GPTGEN_DATA_DIR", str(data_dir))
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DATASETS) and "missing" not in out
    assert main(["datasets", "verify", "chatbot-ko"]) == 0
    assert "match their sha256" in capsys.readouterr().out
