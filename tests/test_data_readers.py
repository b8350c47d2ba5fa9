"""Readers on the real files of the shared data directory, checked against independent reference parsers."""

import csv
import json
import re
import warnings
from pathlib import Path

import pytest

from gptgen.data.readers import (InvalidUTF8Warning, apply_split, expand_paths, filter_min_length, read_csv_pairs,
                                 read_documents, read_json, read_jsonl, read_lines, read_paragraphs, read_texts,
                                 split_every_nth, split_fraction)
from gptgen.errors import DataError


def reference_paragraphs(path: Path) -> list[str]:
    """Blank-line paragraphs by regular expression: a different mechanism from the reader's line scan."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = re.sub(r"\r\n?", "\n", text)
    blocks = re.split(r"\n(?:[^\S\n]*\n)+", "\n" + text + "\n")
    out = []
    for block in blocks:
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        if lines:
            out.append(" ".join(lines))
    return out


@pytest.fixture(scope="module")
def books(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidUTF8Warning)
        return read_paragraphs(data_dir / "books")


def test_book_paragraphs_match_reference_parser(data_dir, books):
    files = sorted((data_dir / "books").glob("*.txt"))
    assert [p.name for p in expand_paths(data_dir / "books")] == [p.name for p in files]
    expected = [p for f in files for p in reference_paragraphs(f)]
    assert books == expected
    assert all("\n" not in p and "\r" not in p and "  \n" not in p for p in books)


def test_books_quality_bar_split_counts(books):
    # every 10th paragraph across all files (the 10th, 20th, ...) to validation, then drop <= 512 characters
    train, val = split_every_nth(books, 10)
    assert len(train) + len(val) == len(books) and len(val) == len(books) // 10
    train, val = filter_min_length(train, 512), filter_min_length(val, 512)
    assert (len(train), len(val)) == (3012, 329)
    assert min(map(len, train + val)) > 512


def test_hard_wrapped_lines_are_joined_with_one_space(data_dir):
    path = data_dir / "books" / "austen-persuasion.txt"
    raw_lines = path.read_text("ascii").split("\n")
    start = next(i for i, line in enumerate(raw_lines) if line.startswith("Sir Walter Elliot, of Kellynch Hall"))
    end = raw_lines.index("", start)
    paragraphs = read_paragraphs(path)
    assert " ".join(raw_lines[start:end]) in paragraphs
    assert read_paragraphs(path, join="\n")[paragraphs.index(" ".join(raw_lines[start:end]))] == \
        "\n".join(raw_lines[start:end])


def test_crlf_file_reads_like_its_lf_version(data_dir, tmp_path):
    crlf = data_dir / "books" / "melville-moby_dick.txt"
    assert b"\r\n" in crlf.read_bytes()
    lf = tmp_path / "moby.txt"
    lf.write_bytes(crlf.read_bytes().replace(b"\r\n", b"\n"))
    assert read_paragraphs(crlf) == read_paragraphs(lf)
    assert read_lines(crlf) == read_lines(lf)
    assert not any("\r" in line for line in read_lines(crlf))


def test_invalid_utf8_is_replaced_and_reported_with_file_count_and_line(data_dir):
    path = data_dir / "books" / "shakespeare-caesar.txt"
    raw = path.read_bytes()
    bad = [i for i in range(len(raw)) if raw[i] >= 0x80]  # ISO-8859 text: each high byte is one bad sequence
    with pytest.warns(InvalidUTF8Warning) as record:
        lines = read_lines(path)
    message = str(record[0].message)
    first_line = raw[: bad[0]].count(b"\n") + 1
    assert str(path) in message and f"replaced {len(bad)} " in message and f"line {first_line}" in message
    # nothing lost: the same lines as a latin-1 decode, with U+FFFD in place of each high byte
    latin = [line for line in raw.decode("latin-1").replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) == len(latin)
    assert sum(line.count("\ufffd") for line in lines) == len(bad)


def test_valid_utf8_gives_no_warning_and_keeps_a_genuine_replacement_char(tmp_path):
    f = tmp_path / "ok.txt"
    f.write_text("\ufeffgood line\nwith \ufffd inside\n", "utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_lines(f) == ["good line", "with \ufffd inside"]


def test_lines_match_tinyshakespeare_and_min_length(data_dir):
    path = data_dir / "tinyshakespeare" / "input.txt"
    raw = path.read_text("utf-8").split("\n")
    lines = read_lines(path)
    assert lines == [line for line in raw if line.strip()]
    long = read_lines(path, min_length=40)
    assert long == [line for line in lines if len(line) > 40]
    assert read_texts(path, "lines", min_length=40) == long


def test_tang_poems_one_example_per_poem(data_dir):
    files = sorted((data_dir / "chinese-poetry" / "tang").glob("poet.tang.*.json"))
    assert len(files) == 58
    poems = read_json(data_dir / "chinese-poetry" / "tang" / "poet.tang.*.json")
    expected = []
    for f in files:
        for item in json.loads(f.read_text("utf-8")):
            text = "".join(item["paragraphs"])
            if text.strip():
                expected.append(text)
    assert poems == expected
    first = json.loads(files[0].read_text("utf-8"))[0]
    assert poems[0] == "".join(first["paragraphs"])
    assert poems[0].startswith("秦川雄帝宅，函谷壯皇居。綺殿千尋起") and poems[0].endswith("風煙出綺疎。")
    titles = read_json(files[0], field="title")
    assert len(titles) == len(json.loads(files[0].read_text("utf-8")))


def test_chatbot_csv_through_the_template(data_dir):
    path = data_dir / "chatbot-ko" / "ChatbotData.csv"
    pairs = read_csv_pairs(path)
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(pairs) == len(rows) == 11823
    assert pairs == [f"<s>{r['Q']}</s><s>{r['A']}</s>" for r in rows]
    assert pairs[0] == "<s>12시 땡!</s><s>하루가 또 가네요.</s>"
    labelled = read_csv_pairs(path, template="{question} => {answer} ({label})",
                              columns={"question": "Q", "answer": "A"})
    assert labelled[0] == "12시 땡! => 하루가 또 가네요. (0)"


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path):
    f = tmp_path / "qa.csv"
    f.write_text('Q,A\n"a, b","line one\nline two"\nplain,answer\n', "utf-8")
    assert read_csv_pairs(f) == ["<s>a, b</s><s>line one\nline two</s>", "<s>plain</s><s>answer</s>"]


def test_jsonl_and_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n{"text": "second", "x": 1}\n{"body": "third"}\n', "utf-8")
    with pytest.raises(DataError, match=r"line 4 has no field 'text'"):
        read_jsonl(f)
    f.write_text('{"text": "first"}\n\n{"text": "second", "x": 1}\n', "utf-8")
    assert read_jsonl(f) == ["first", "second"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("  second doc\n\n", "utf-8")
    (tmp_path / "docs" / "a.txt").write_text("first doc\nline 2\n", "utf-8")
    (tmp_path / "docs" / ".hidden").write_text("skipped", "utf-8")
    (tmp_path / "docs" / "empty.txt").write_text("\n \n", "utf-8")
    assert read_documents(tmp_path / "docs") == ["first doc\nline 2", "second doc"]


def test_expand_paths_files_dirs_globs_in_order(data_dir):
    books = data_dir / "books"
    got = expand_paths([books / "whitman-leaves.txt", str(books / "austen-*.txt"), books / "austen-emma.txt"])
    assert [p.name for p in got] == ["whitman-leaves.txt", "austen-emma.txt", "austen-persuasion.txt",
                                     "austen-sense.txt"]


def test_split_fraction_is_seeded_disjoint_and_ordered():
    examples = [f"e{i}" for i in range(1000)]
    train, val = split_fraction(examples, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert sorted(train + val, key=lambda e: int(e[1:])) == examples
    assert val == sorted(val, key=lambda e: int(e[1:]))  # original order kept
    assert split_fraction(examples, 0.1, seed=3) == (train, val)
    assert split_fraction(examples, 0.1, seed=4)[1] != val
    assert split_fraction(examples[:5], 0.01)[1].__len__() == 1  # a positive fraction gives at least one
    assert apply_split(examples, "fraction:0.1", seed=3) == (train, val)


def test_split_every_nth_counts_from_one():
    train, val = split_every_nth(list(range(1, 26)), 10)
    assert val == [10, 20] and len(train) == 23
    assert apply_split(list(range(1, 26)), "every_nth:10") == (train, val)
    assert apply_split(list(range(3)), None) == [0, 1, 2]


# Bad input: each is one DataError sentence ----------------------------------------------------------
@pytest.mark.parametrize("content, call, pattern", [
    ("", lambda f: read_lines(f), r"holds no examples: it is empty"),
    ("\n  \n\n", lambda f: read_paragraphs(f), r"holds no examples: it is empty"),
    ("short\ntiny\n", lambda f: read_lines(f, min_length=10), r"All 2 examples .* 10 characters or shorter "
                                                                r"\(the longest has 5\); lower min_length"),
    ("[1, 2", lambda f: read_json(f), r"is not valid JSON \(line 1"),
    ('[{"title": "x"}]', lambda f: read_json(f), r"item 0 has no field 'paragraphs'"),
    ('[{"paragraphs": 3}]', lambda f: read_json(f), r"field 'paragraphs' is a int"),
    ('{"text": 1', lambda f: read_jsonl(f), r"line 1 is not valid JSON"),
    ("Q,B\nq,b\n", lambda f: read_csv_pairs(f), r"has no column 'A'; its columns are Q, B"),
    ("Q,A\nq,a\n", lambda f: read_csv_pairs(f, template="no fields"), r"has no \{column\} placeholder"),
    ("Q,A\nq,a\n", lambda f: read_csv_pairs(f, template="{0}"), r"name each one"),
    ("Q,A\nq\n", lambda f: read_csv_pairs(f), r"line 2 has 1 fields; the header has 2"),
    ("x\n", lambda f: read_texts(f, "xml"), r"Unknown reader mode 'xml'"),
    ("x\n", lambda f: read_texts(f, "lines", field="t"), r"lines reader does not take the option 'field'"),
])
def test_bad_input_raises_one_clear_data_error(tmp_path, content, call, pattern):
    f = tmp_path / "input.txt"
    f.write_text(content, "utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        call(f)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_missing_paths_and_bad_splits(tmp_path):
    with pytest.raises(DataError, match=r"Input file .*nope.txt does not exist"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"No file matches the pattern"):
        read_lines(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no files"):
        read_lines(tmp_path / "empty")
    with pytest.raises(DataError, match=r"No input files"):
        read_lines([])
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        split_fraction(["a", "b"], 1.5)
    with pytest.raises(DataError, match=r"leaves no training example"):
        split_fraction(["a"], 0.5)
    with pytest.raises(DataError, match=r"gives no validation example"):
        split_every_nth(["a", "b"], 10)
    with pytest.raises(DataError, match=r"Unknown split 'half'"):
        apply_split(["a", "b"], "half")


def test_mixed_line_ends_and_exact_invalid_byte_report(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"one\r\ntwo\rthree\n\n  \t\nfour \xff\xfe five\nsix\nseven \xe9\n")
    with pytest.warns(InvalidUTF8Warning, match=r"mixed.txt is not valid UTF-8: replaced 3 invalid byte "
                                                r"sequence\(s\) with U\+FFFD, the first on line 5\.") as record:
        lines = read_lines(f)
    assert len(record) == 1
    assert lines == ["one", "two", "three", "four \ufffd\ufffd five", "six", "seven \ufffd"]
    with pytest.warns(InvalidUTF8Warning, match=r"replaced 3 .* line 5\."):
        assert read_paragraphs(f) == ["one two three", "four \ufffd\ufffd five six seven \ufffd"]
    with pytest.warns(InvalidUTF8Warning, match=r"replaced 3 .* line 5\."):
        assert read_documents(f) == ["one\ntwo\nthree\n\n  \t\nfour \ufffd\ufffd five\nsix\nseven \ufffd"]


def test_streamed_lines_equal_whole_file_decoding(data_dir):
    # the line-by-line decoder and the whole-file decoder agree on every file of the books
    from gptgen.data.readers import iter_file_lines, read_text_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidUTF8Warning)
        for path in sorted((data_dir / "books").glob("*.txt")):
            text = read_text_file(path)
            expected = (text[:-1] if text.endswith("\n") else text).split("\n")
            assert list(iter_file_lines(path)) == expected
