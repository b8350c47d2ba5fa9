"""gptgen.train: the pipeline the CLI runs, from Python; recipes as data; corpus loading in one call; the
import graph of the package (no circles, the CLI on top)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import gptgen
from gptgen.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 64}
TINY_FLAGS = [a for k, v in TINY.items() for a in ("--config", f"{k}={v}")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def book(data_dir) -> Path:
    return data_dir / "books" / "austen-persuasion.txt"


@pytest.fixture(scope="module")
def tok_dir(book, tmp_path_factory):
    """One tokenizer for the runs compared (a tokenizer trained twice need not come out the same)."""
    from gptgen.data import read_paragraphs

    path = tmp_path_factory.mktemp("tok")
    gptgen.Tokenizer.train("wordpiece", read_paragraphs([book]), 400, lowercase=True,
                           reserved_tokens=["[PAD]", "[UNK]", "[BOS]"]).save(path)
    return path


def _records(out: Path, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in rows if r["event"] == event]


def test_api_and_cli_run_the_recipe_with_identical_losses(book, tok_dir, tmp_path, capsys):
    steps = dict(seq_len=64, batch_size=8, max_steps=6, eval_every=3, seed=5)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    code = main(["train", "--recipe", "keras-mini", "--data", str(book), "--tokenizer", str(tok_dir), *TINY_FLAGS,
                 "--seq-len", "64", "--batch-size", "8", "--max-steps", "6", "--eval-every", "3", "--seed", "5",
                 "--threads", "1", "--no-progress", "--output", str(cli_out)])
    assert code == 0, capsys.readouterr().err
    run = gptgen.train("keras-mini", data=book, tokenizer=tok_dir, config=TINY, threads=1, progress=False,
                       output_dir=api_out, print_fn=None, **steps)
    cli_steps, api_steps = _records(cli_out, "step"), _records(api_out, "step")
    assert len(cli_steps) == 6 and api_steps == cli_steps  # every step's loss, lr, tokens, bit for bit
    assert [r["loss"] for r in api_steps] == run.step_losses()
    assert len({r["loss"] for r in api_steps}) == 6  # the losses move: the comparison is not of constants
    assert _records(api_out, "eval") == _records(cli_out, "eval") and len(_records(api_out, "eval")) == 2
    # The recipe's settings were used: Adam eps 1e-7, lr 1e-3, [BOS] first, paragraphs of more than 512
    # characters after taking every 10th to validation.
    assert run.settings["eps"] == 1e-7 and run.settings["lr"] == 1e-3 and api_steps[0]["lr"] == 1e-3
    from gptgen.data import read_paragraphs, split_every_nth

    train, val = split_every_nth(read_paragraphs([book]), 10)
    assert run.train_examples == sum(len(t) > 512 for t in train)
    assert run.val_examples == sum(len(t) > 512 for t in val)
    assert run.lm.config.extra["add_bos"] is True
    assert gptgen.load(run.last_dir).config.extra["add_bos"] is True


def test_train_from_python_with_plain_settings_and_a_trained_tokenizer(book, tmp_path):
    lines: list[str] = []
    run = gptgen.train(data=[book], reader="paragraphs", split="fraction:0.1", limit=64, preset="mini", config=TINY,
                       train_tokenizer="bpe", vocab_size=300, seq_len=32, batch_size=16, epochs=2, lr=3e-3,
                       threads=1, progress=False, sample_tokens=5, output_dir=tmp_path, print_fn=lines.append)
    assert (run.train_examples, run.val_examples) == (64, 8)  # limit: 64 texts, and 8 for validation
    assert run.steps == 8 and run.result.epochs == 2
    assert run.lm.tokenizer.vocab_size <= 300 and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    epochs = [line for line in lines if line.startswith("epoch ")]
    samples = [line for line in lines if line.startswith("[epoch ")]
    assert len(epochs) == 2 and len(samples) == 2
    assert run.summary()["best"] == str((tmp_path / "best").resolve())
    # The run's validation numbers are the model's on the 8 validation texts the limit kept; evaluate_corpus
    # reads the whole split.
    from gptgen.data import read_corpus

    corpus = read_corpus([book], reader="paragraphs", split="fraction:0.1")
    assert run.lm.evaluate(corpus.limit(64).val, seq_len=32)["loss"] == pytest.approx(run.val["loss"], rel=1e-5)
    full = gptgen.pipeline.evaluate_corpus(run.last_dir, data=[book], reader="paragraphs", split="fraction:0.1",
                                           seq_len=32)
    assert full["examples"] == len(corpus.val)
    assert full["loss"] == pytest.approx(run.lm.evaluate(corpus.val, seq_len=32)["loss"], rel=1e-5)


def test_quickstart_is_a_recipe_call(tok_dir, tmp_path):
    run = gptgen.train("quickstart", tokenizer=tok_dir, config=TINY, max_steps=2, batch_size=8, threads=1,
                       progress=False, samples=False, output_dir=tmp_path, print_fn=None)
    assert run.settings["dataset"] == "quickstart" and run.settings["early_stopping"] == 2
    assert run.steps == 2 and run.seq_len == 64 and run.lm.config.extra["add_bos"] is True


def test_corpus_in_one_call_matches_the_steps_by_hand(book, tok_dir):
    from gptgen.data import filter_min_length, load_corpus, pack_examples, read_paragraphs, split_every_nth

    tok = gptgen.Tokenizer.from_pretrained(tok_dir)
    packed = load_corpus(book, reader="paragraphs", split="every_nth:10", min_length=300, tokenizer=tok,
                         seq_len=48, add_bos=True)
    train, val = split_every_nth(read_paragraphs([book]), 10)
    for got, texts in ((packed.train, train), (packed.val, val)):
        want = pack_examples(tok.encode_batch(filter_min_length(texts, 300)), 48, bos_id=tok.bos_token_id,
                             pad_id=tok.pad_token_id)
        assert got.input_ids.equal(want.input_ids) and got.loss_mask.equal(want.loss_mask)
    with pytest.raises(gptgen.DataError, match="seq_len"):
        load_corpus(book, tokenizer=tok, seq_len=0)
    with pytest.raises(gptgen.DataError, match="No data given"):
        load_corpus(tokenizer=tok, seq_len=8)


def test_unknown_setting_and_recipe_are_refused():
    with pytest.raises(gptgen.ConfigError, match="Unknown training setting.*batchsize"):
        gptgen.train("keras-mini", batchsize=3)
    with pytest.raises(gptgen.ConfigError, match="Unknown recipe 'nope'"):
        gptgen.train("nope")


# The import graph ------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "gptgen").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a gptgen module by another, at module level or inside functions (not under
    `if TYPE_CHECKING:`); `from pkg import name` counts as an import of pkg.name when that is a module."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text("utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for s in node.body for n in ast.walk(s)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        edges.add(f"{base}.{alias.name}")
                    elif base in mods:
                        edges.add(base)
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_gptgen():
    graph = _imports(_modules())
    assert "gptgen.lm" in graph["gptgen.pipeline"] and "gptgen.training" in graph["gptgen.lm"]  # the walk sees
    assert _cycles(graph) == []


def test_layering_model_training_decoding_cli():
    graph = _imports(_modules())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    # The model knows nothing of training, decoding or the CLI; training does not import lm.py.
    assert not {m for m in reach("gptgen.model") if m.startswith(("gptgen.training", "gptgen.generation",
                                                                  "gptgen.cli", "gptgen.lm"))}
    assert not {m for m in reach("gptgen.training") if m in ("gptgen.lm", "gptgen.pipeline")}
    assert not {m for m in reach("gptgen.generation") if m.startswith("gptgen.training")}
    # Nothing below imports the CLI.
    assert [m for m in graph if not m.startswith(("gptgen.cli", "gptgen.__main__")) and
            any(w.startswith("gptgen.cli") for w in graph[m])] == []
    # The training commands are flags and calls of the public API: no trainer, data, tokenizer or torch.
    assert graph["gptgen.cli.train"] <= {"gptgen.pipeline", "gptgen.recipes", "gptgen.options", "gptgen.config",
                                         "gptgen.lm"}
    source = (SRC / "gptgen" / "cli" / "train.py").read_text("utf-8")
    assert "import torch" not in source
