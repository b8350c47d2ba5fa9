import shutil

import pytest

from gptgen import Tokenizer, TokenizerError
from gptgen.tokenizer import KINDS

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 반갑습니다. 오늘 날씨가 좋네요!",
    "昨夜雨疏风骤，浓睡不消残酒。",
    "Emoji: 😀👍🏽🇰🇷 and a family 👨‍👩‍👧",
    "  leading spaces\n\n\ttabs and   runs of   spaces   \r\n trailing  ",
    "code: def f(x):\n    return x ** 2  # 제곱",
    "it's, we'll, they're... <|endoftext|> after",
]


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    return Tokenizer.from_gpt2_files(gpt2_tokenizer_dir / "encoder.json", gpt2_tokenizer_dir / "vocab.bpe")


@pytest.fixture(scope="module")
def hf_gpt2_tok(gpt2_tokenizer_dir, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hfgpt2")
    shutil.copy(gpt2_tokenizer_dir / "encoder.json", d / "vocab.json")
    shutil.copy(gpt2_tokenizer_dir / "vocab.bpe", d / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(str(d))


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_tokenizer_matches_transformers_and_round_trips(gpt2_tok, hf_gpt2_tok, text):
    ids = gpt2_tok.encode(text)
    assert ids == hf_gpt2_tok.encode(text)
    assert gpt2_tok.decode(ids) == text
    assert len(hf_gpt2_tok) == gpt2_tok.vocab_size == 50257


def test_gpt2_tokenizer_batch_and_special_roles(gpt2_tok, hf_gpt2_tok):
    assert gpt2_tok.encode_batch(SAMPLES) == [hf_gpt2_tok.encode(t) for t in SAMPLES]
    assert gpt2_tok.eos_token_id == gpt2_tok.bos_token_id == 50256
    assert gpt2_tok.token_to_id("Hello") == 15496 and gpt2_tok.id_to_token(15496) == "Hello"
    with pytest.raises(TokenizerError, match="no pad token"):
        gpt2_tok.encode("x", padding=True, max_length=4)


def test_wordpiece_like_compute_word_piece_vocabulary(data_dir):
    books = sorted((data_dir / "books").glob("*.txt"))[:3]
    tok = Tokenizer.train("wordpiece", books, 2000, reserved_tokens=["[PAD]", "[UNK]", "[BOS]"], lowercase=True)
    assert [tok.id_to_token(i) for i in range(3)] == ["[PAD]", "[UNK]", "[BOS]"]
    assert tok.vocab_size == 2000
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.encode("Emma WOODHOUSE") == tok.encode("emma woodhouse")
    ids = tok.encode("Emma was handsome", add_bos=True, max_length=8, padding=True)
    assert ids[0] == 2 and len(ids) == 8 and ids[-1] == 0
    assert tok.decode(tok.encode("emma was handsome, clever, and rich")) == "emma was handsome, clever, and rich"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "wordpiece"])
def test_train_each_kind_round_trips(kind, data_dir):
    lines = (data_dir / "tinyshakespeare" / "input.txt").read_text().splitlines()[:4000]
    tok = Tokenizer.train(kind, lines, 600)
    assert 300 < tok.vocab_size <= 600
    text = "First Citizen: Before we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert len(ids) < len(text) / 1.5  # merges learned: fewer tokens than characters
    assert tok.decode(ids) == text
    assert tok.bos_token_id is not None and tok.eos_token_id is not None


def test_byte_bpe_never_needs_unk():
    tok = Tokenizer.train("byte-bpe", ["hello world"] * 50, 300)
    text = "완전히 새로운 글자 🚀"
    assert tok.decode(tok.encode(text)) == text


def test_add_special_tokens_and_batch_padding():
    tok = Tokenizer.train("bpe", ["the cat sat on the mat"] * 20, 200)
    added = tok.add_special_tokens({"pad": "<PAD2>"})
    assert added == 1 and tok.pad_token_id == tok.vocab_size - 1
    assert tok.add_special_tokens(["<sep>"]) == 1
    assert tok.encode("<sep>") == [tok.token_to_id("<sep>")]
    batch = tok.encode_batch(["the cat", "the cat sat on the mat"], padding="longest", add_eos=True)
    assert len(batch[0]) == len(batch[1]) and batch[0][-1] == tok.pad_token_id
    assert batch[1][-1] == tok.eos_token_id
    truncated = tok.encode_batch(["the cat sat on the mat"], max_length=3)
    assert len(truncated[0]) == 3


def test_save_load_round_trip(tmp_path):
    tok = Tokenizer.train("unigram", ["some text to learn from, over and over"] * 30, 100)
    tok.add_special_tokens({"pad": "<pad>"})
    tok.save(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.special_tokens == tok.special_tokens and back.kind == "unigram"
    assert back.encode("learn from text") == tok.encode("learn from text")


def test_vocab_merges_pair_kogpt2_style(tmp_path):
    lines = ["안녕하세요 반갑습니다", "오늘 날씨가 좋네요", "저는 학생입니다"] * 40
    tok = Tokenizer.train("bpe", lines, 150)
    tok.backend.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    back = Tokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    for text in lines[:3]:
        assert back.encode(text) == tok.encode(text)
    assert back.special_tokens["eos"] == "</s>"
    assert Tokenizer.from_pretrained(tmp_path).encode(lines[0]) == tok.encode(lines[0])


def test_sentencepiece_model_matches_sentencepiece(tmp_path, data_dir):
    spm = pytest.importorskip("sentencepiece")
    csv = (data_dir / "chatbot-ko" / "ChatbotData.csv").read_text("utf-8").splitlines()[1:3000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line.rsplit(",", 1)[0] for line in csv), "utf-8")
    for model_type in ("unigram", "bpe"):
        prefix = tmp_path / model_type
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=2000,
                                       model_type=model_type, character_coverage=1.0,
                                       pad_id=3, bos_id=1, eos_id=2, unk_id=0)
        sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
        tok = Tokenizer.from_sentencepiece(str(prefix) + ".model")
        assert tok.special_tokens == {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
        unseen = [line.rsplit(",", 1)[0] for line in
                  (data_dir / "chatbot-ko" / "ChatbotData.csv").read_text("utf-8").splitlines()[5000:5200]]
        for text in ["12시 땡!", "SD카드 망가졌어", "  오늘   하루도 수고 많았어요 ", "여행은 언제나 좋죠.", *unseen]:
            assert tok.encode(text) == sp.encode(text), (model_type, text)
            if tok.unk_token_id not in tok.encode(text):  # sentencepiece renders <unk> as " ⁇ "
                assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="Unknown tokenizer kind"):
        Tokenizer.train("charpiece", ["x"], 100)
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train("bpe", [], 100)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="No tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
