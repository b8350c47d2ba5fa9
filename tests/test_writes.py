"""gptgen never destroys a user's files: it writes into new or empty directories, or replaces what it wrote.

Every directory gptgen writes holds a user's own files, checksummed before and after each command, with and
without --overwrite.
"""

import hashlib
import json
from pathlib import Path

import pytest

from gptgen.cli import main
from gptgen.errors import GptgenError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n".join(f"line {i} of the little corpus, with words that repeat and repeat {i % 7}" for i in range(80))


def _sums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _user_files(directory: Path, *names: str) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"the user's own {name}\n", "utf-8")
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def _unchanged(directory: Path, sums: dict) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name


def _code(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, "utf-8")
    return path


def test_tokenizer_train_never_replaces_a_users_tokenizer(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    mine = _user_files(out, "tokenizer.json", "notes.txt")
    argv = ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", "120", "-o", str(out)]
    for extra in ([], ["--overwrite"]):
        code, err = _code(capsys, argv + extra)
        assert code == 2 and "not a file gptgen wrote" in err and err.count("\n") == 0
        _unchanged(out, mine)
    # a directory of its own: written, then replaced only with --overwrite; the user's notes stay
    out2 = tmp_path / "tok2"
    notes = _user_files(out2, "notes.txt")
    assert _code(capsys, argv[:-1] + [str(out2)])[0] == 0
    first = _sums(out2)
    code, err = _code(capsys, argv[:-1] + [str(out2)])
    assert code == 2 and "--overwrite" in err
    assert _sums(out2) == first
    assert _code(capsys, argv[:-1] + [str(out2), "--overwrite", "--kind", "wordpiece"])[0] == 0
    assert _sums(out2) != first  # the new tokenizer replaced gptgen's own
    _unchanged(out2, notes)
    # a tokenizer.json the user edited after gptgen wrote it is theirs again
    (out2 / "tokenizer.json").write_text((out2 / "tokenizer.json").read_text() + " ", "utf-8")
    edited = _sums(out2)
    code, err = _code(capsys, argv[:-1] + [str(out2), "--overwrite"])
    assert code == 2 and "changed since" in err
    assert _sums(out2) == edited


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    from gptgen.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("t") / "tok"
    Tokenizer.train("bpe", [str(corpus)], 120).save(out)
    return out


def test_prepare_keeps_a_users_partial_directory_and_files_beside_the_shards(tmp_path, corpus, tokenizer_dir,
                                                                              capsys):
    parent = tmp_path / "DIR"
    theirs = _user_files(parent, "data.partial/keep.txt", "data.partial.old", "notes.txt")
    argv = ["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "-o", str(parent / "data"),
            "--shard-tokens", "300"]
    assert _code(capsys, argv)[0] == 0
    _unchanged(parent, theirs)
    assert (parent / "data" / "manifest.json").is_file()
    # a failing preparation (no text at all) deletes only its own temporary directory
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", "utf-8")
    code, err = _code(capsys, ["prepare", str(empty), "--tokenizer", str(tokenizer_dir), "-o", str(parent / "data2")])
    assert code == 2
    _unchanged(parent, theirs)
    assert sorted(p.name for p in parent.iterdir()) == ["data", "data.partial", "data.partial.old", "notes.txt"]
    # shards with the user's notes beside them: refused without --overwrite, kept with it
    data = parent / "data"
    notes = _user_files(data, "my_notes.txt", "sub/more.txt")
    before = _sums(data)
    code, err = _code(capsys, argv)
    assert code == 2 and "--overwrite" in err
    assert _sums(data) == before
    assert _code(capsys, argv[:-1] + ["200", "--overwrite"])[0] == 0
    _unchanged(data, notes)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["shard_tokens"] == 200
    listed = {s["file"] for s in manifest["shards"]}
    assert {p.name for p in data.glob("shard_*.bin")} == listed  # the earlier, longer shards are gone
    # with nothing of the user's, --overwrite replaces the whole directory
    only = tmp_path / "only"
    assert _code(capsys, argv[:-3] + [str(only), "--shard-tokens", "300"])[0] == 0
    assert _code(capsys, argv[:-3] + [str(only), "--shard-tokens", "250", "--overwrite"])[0] == 0
    assert json.loads((only / "manifest.json").read_text())["shard_tokens"] == 250
    assert not [p for p in tmp_path.iterdir() if "gptgen-" in p.name]


def _train_argv(corpus, tokenizer_dir, out, *extra):
    return ["train", "--preset", "gpt2", "--config", "n_layer=1", "--config", "n_embd=16", "--config", "n_head=2",
            "--config", "n_positions=32", "--tokenizer", str(tokenizer_dir), "--data", str(corpus), "--max-steps",
            "2", "--batch-size", "4", "--no-samples", "--no-progress", "--output", str(out), *extra]


def test_train_never_replaces_a_users_metrics_or_curves(tmp_path, corpus, tokenizer_dir, capsys):
    for names in (("metrics.jsonl",), ("curves.png",), ("metrics.jsonl", "curves.png")):
        out = tmp_path / "-".join(names)
        mine = _user_files(out, *names, "notes.txt")
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, err = _code(capsys, _train_argv(corpus, tokenizer_dir, out, *extra))
            assert code == 2, err
            assert "not a file gptgen wrote" in err or "no checkpoint" in err, err
            _unchanged(out, mine)
            assert not (out / "last").exists()


def test_train_overwrite_replaces_only_its_own_run(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "run"
    mine = _user_files(out, "notes.txt", "data/mine.txt")
    assert _code(capsys, _train_argv(corpus, tokenizer_dir, out))[0] == 0
    _unchanged(out, mine)
    assert (out / "metrics.jsonl").is_file()
    code, err = _code(capsys, _train_argv(corpus, tokenizer_dir, out))
    assert code == 2 and "--overwrite" in err
    assert _code(capsys, _train_argv(corpus, tokenizer_dir, out, "--overwrite"))[0] == 0
    _unchanged(out, mine)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("event") == "step"] == [1, 2]  # a new run's records only


def test_a_trained_tokenizer_never_goes_over_a_users_tokenizer_directory(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    mine = _user_files(out, "tokenizer/tokenizer.json")
    argv = _train_argv(corpus, "x", out)
    i = argv.index("--tokenizer")
    argv[i:i + 2] = ["--train-tokenizer", "bpe", "--vocab-size", "120"]
    code, err = _code(capsys, argv)
    assert code == 2 and "not a tokenizer gptgen wrote" in err
    _unchanged(out, mine)


@pytest.mark.parametrize("where", ["root", "home"])
def test_the_root_and_the_home_directory_are_refused(where, tmp_path, monkeypatch, corpus, tokenizer_dir, capsys):
    import gptgen

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = "/" if where == "root" else str(home)
    before = _sums(home)
    lm = gptgen.LanguageModel.from_preset("gpt2", gptgen.Tokenizer.from_pretrained(tokenizer_dir), n_layer=1,
                                          n_embd=16, n_head=2, n_positions=32)
    with pytest.raises(GptgenError, match="root|home directory"):
        lm.fit([TEXT[:200]] * 4, output_dir=target, max_steps=1)
    for argv in (_train_argv(corpus, tokenizer_dir, target),
                 ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", "120", "-o", target],
                 ["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "-o", target]):
        code, err = _code(capsys, argv)
        assert code == 2 and ("root" in err or "home directory" in err), err
    if where == "home":
        assert _sums(home) == before and not any(home.iterdir())
