"""Recipe 3: Chinese poems (the KerasHub GPT-2 tutorial's last step).

GPT-2's own byte-level BPE (gpt2-tokenizer/encoder.json + vocab.bpe, unchanged) encodes 全唐诗: every
poet.tang.*.json file, each poem its `paragraphs` joined into one example, cut to 128 tokens as the
tutorial's preprocessor does. The model is fine-tuned with batch 16 and a linear decay from 5e-4 to 0,
then continues "昨夜雨疏风骤" (max_length 200). A Chinese character takes 2-3 byte-level tokens, so a
prefix can end inside a character: the generated text is always valid UTF-8 (an unfinished character is
held back, never printed as U+FFFD); the recipe counts replacement characters in what it generated.

No pretrained GPT-2 weights are reachable offline: without --base the recipe starts from a small
GPT-2-shaped model with random weights (`--base gpt2` fine-tunes GPT-2 124M from the Hugging Face Hub, or
--base DIR a GPT-2 directory saved by transformers).

    python recipes/chinese_poems.py --base gpt2 --max-steps 500       # the tutorial (GPU)
    python recipes/chinese_poems.py --limit 3000 --max-steps 300      # CPU demo
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import torch  # noqa: E402

from gptgen import LanguageModel, Tokenizer, load  # noqa: E402
from gptgen.config import parse_overrides  # noqa: E402
from gptgen.data import Corpus, data_dir, expand_paths, pack_examples, read_json, split_every_nth  # noqa: E402
from gptgen.options import resolve_device  # noqa: E402
from gptgen.training import PrintEpochs  # noqa: E402
from gptgen.generation import Sampler, get_sampler  # noqa: E402

PROMPT = "昨夜雨疏风骤"


def samplers(tokenizer) -> dict[str, dict]:
    """The recipe's samplers, each kept to valid UTF-8."""
    from gptgen.generation import GreedySampler, TopKSampler, TopPSampler

    inner = {"greedy": GreedySampler(), "top-k (10)": TopKSampler(k=10), "top-p (0.9)": TopPSampler(p=0.9)}
    return {name: dict(sampler=Utf8Constrained(s, tokenizer)) for name, s in inner.items()}
MODEL = dict(n_layer=4, n_embd=256, n_head=4)


# Valid UTF-8 from a byte-level model ----------------------------------------------------------------
# The states of a UTF-8 decoder: 0 expects a lead byte; the others expect `n` more continuation bytes,
# the next one in [lo, hi] (the narrow ranges after E0, ED, F0 and F4 exclude overlong forms, surrogates
# and code points above U+10FFFF, which a decoder also replaces with U+FFFD).
_STATES = [(0, 0, 0), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (3, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F),
           (3, 0x90, 0xBF), (3, 0x80, 0x8F)]
_INDEX = {s: i for i, s in enumerate(_STATES)}


def _utf8_step(state: int, b: int) -> int:
    """The decoder state after byte b, or -1 where b makes the text invalid."""
    n, lo, hi = _STATES[state]
    if n == 0:
        if b < 0x80:
            return 0
        if 0xC2 <= b <= 0xDF:
            return _INDEX[(1, 0x80, 0xBF)]
        if 0xE0 <= b <= 0xEF:
            return _INDEX[{0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F)}.get(b, (2, 0x80, 0xBF))]
        if 0xF0 <= b <= 0xF4:
            return _INDEX[{0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)}.get(b, (3, 0x80, 0xBF))]
        return -1
    if not lo <= b <= hi:
        return -1
    return 0 if n == 1 else _INDEX[(n - 1, 0x80, 0xBF)]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the others are
    mapped to code points from 256 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_TABLES: dict[int, torch.Tensor] = {}


def utf8_transitions(tokenizer) -> torch.Tensor:
    """(vocab, 8) table: the decoder state after each byte-level token from each state, -1 if invalid.
    Special tokens are allowed only between characters. Cached per tokenizer."""
    key = id(tokenizer.backend)
    if key in _TABLES:
        return _TABLES[key]
    decoder = _byte_decoder()
    specials = set(tokenizer.special_tokens.values())
    rows = [[-1] * len(_STATES) for _ in range(tokenizer.vocab_size)]
    for token, ident in tokenizer.get_vocab().items():
        if token in specials or any(c not in decoder for c in token):
            rows[ident][0] = 0
            continue
        data = [decoder[c] for c in token]
        for start in range(len(_STATES)):
            s = start
            for b in data:
                s = _utf8_step(s, b)
                if s < 0:
                    break
            rows[ident][start] = s
    _TABLES[key] = torch.tensor(rows, dtype=torch.long)
    return _TABLES[key]


class Utf8Constrained(Sampler):
    """Wraps a sampler so that a byte-level model can only produce valid UTF-8: at every step the tokens
    whose bytes would break the character being written are masked out before the sampler chooses."""

    def __init__(self, inner, tokenizer) -> None:
        self.inner = get_sampler(inner) if isinstance(inner, str) else inner
        self.table = utf8_transitions(tokenizer)
        self.allowed = self.table >= 0  # (vocab, states)
        self._next = self.table.tolist()
        for attr in ("name", "row_stopping", "needs_hidden", "deterministic", "temperature"):
            setattr(self, attr, getattr(self.inner, attr))

    def _row_states(self, state) -> torch.Tensor:
        out = []
        for gen in state.row_generated():
            s = 0
            for t in gen:
                s = self._next[t][s] if s >= 0 else s
            out.append(max(s, 0))
        return torch.tensor(out, dtype=torch.long)

    def select(self, logits, hidden, state):
        allowed = self.allowed[:, self._row_states(state)].T  # (rows, vocab)
        vocab = min(allowed.shape[1], logits.shape[-1])
        masked = logits.clone()
        masked[:, :vocab] = masked[:, :vocab].masked_fill(~allowed[:, :vocab].to(logits.device), float("-inf"))
        return self.inner.select(masked, hidden, state)

    def rows_per_sequence(self, n):
        return self.inner.rows_per_sequence(n)

    def check(self, n):
        return self.inner.check(n)

    def start(self, state):
        return self.inner.start(state)

    def feed(self, tokens, logits, state):
        return self.inner.feed(tokens, logits, state)

    def is_done(self, state):
        return self.inner.is_done(state)

    def finalize(self, state):
        return self.inner.finalize(state)


def read_poems(root: Path, limit: int | None) -> list[str]:
    """One example per poem of the poet.tang.*.json files, reading only as many files as --limit needs."""
    poems: list[str] = []
    files = sorted(expand_paths([str(root / "chinese-poetry" / "tang" / "poet.tang.*.json")]),
                   key=lambda p: int(p.name.split(".")[2]))
    for path in files:
        poems += read_json(path, field="paragraphs", join="")
        if limit and len(poems) >= limit * 11 // 10 + 8:
            break
    return poems


def build_parser():
    p = C.parser("chinese_poems", __doc__.split("\n\n")[0], preset="gpt2", epochs=1, batch_size=16, lr=5e-4,
                 seq_len=128, max_new_tokens=None)
    p.add_argument("--base", help="a GPT-2 to fine-tune: a directory (Hugging Face or gptgen) or a Hub name such "
                                  "as gpt2; default: a new small GPT-2-shaped model with GPT-2's tokenizer")
    p.add_argument("--max-length", type=int, default=200, help="prompt plus generated tokens (tutorial: 200)")
    p.add_argument("--prompt", default=PROMPT)
    return p


def generate_table(lm, prompt: str, samplers: dict[str, dict], **common) -> dict[str, str]:
    """One continuation of `prompt` per named sampler setting."""
    return {name: lm.generate(prompt, include_prompt=False, **{**common, **options}) for name, options in samplers.items()}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data_dir or data_dir())
    poems = read_poems(root, args.limit)
    train_texts, val_texts = Corpus(*split_every_nth(poems, 10)).limit(args.limit)
    torch.manual_seed(args.seed)
    if args.base:
        lm = load(args.base).to(resolve_device(args.device))
    else:
        tok = Tokenizer.from_gpt2_files(root / "gpt2-tokenizer" / "encoder.json", root / "gpt2-tokenizer" / "vocab.bpe")
        lm = LanguageModel.from_preset(args.preset, tok, **{**MODEL, "n_positions": max(args.seq_len, 256),
                                                             **parse_overrides(args.config)})
    tok = lm.tokenizer
    seq_len = min(args.seq_len, lm.config.n_positions)

    def pack(texts):  # each poem a row: its first seq_len tokens, then <|endoftext|>, padding masked
        return pack_examples(tok.encode_batch(texts), seq_len, eos_id=tok.eos_token_id, pad_id=tok.eos_token_id)

    train_data, val_data = pack(train_texts), pack(val_texts)
    if not args.quiet:
        print(f"{len(train_texts):,} training / {len(val_texts):,} validation poems; GPT-2 byte-level BPE "
              f"({tok.vocab_size:,} tokens): {train_texts[0][:12]!r} -> {len(tok.encode(train_texts[0][:12]))} "
              f"tokens; model {lm.num_parameters():,} parameters.")
    before = lm.evaluate(val_data)
    gen_options = dict(max_length=args.max_length, seed=args.seed, truncate_prompt=True)
    table = samplers(tok)
    samples_before = generate_table(lm, args.prompt, table, **gen_options)
    result = lm.fit(train_data, val_data=val_data, schedule="linear", callbacks=[] if args.quiet else [PrintEpochs()],
                    **C.fit_options(args))
    model_dir = lm.save(out / "model", overwrite=args.overwrite)
    samples_after = generate_table(lm, args.prompt, table, **gen_options)
    texts = list(samples_before.values()) + list(samples_after.values())
    replacement = sum(t.count("\ufffd") for t in texts)
    if not args.quiet:
        for title, table in (("before", samples_before), ("after", samples_after)):
            print(f"\n{args.prompt} {title} fine-tuning:")
            for name, text in table.items():
                print(f"  {name:<12} | {text!r}")
        print(f"\nvalidation perplexity {before['perplexity']:.1f} -> {result.val['perplexity']:.1f}; "
              f"U+FFFD in the generated text: {replacement}.")
    results = {"recipe": "chinese_poems", "train_poems": len(train_texts), "val_poems": len(val_texts),
               "parameters": lm.num_parameters(), "steps": result.steps,
               "val_perplexity_before": before["perplexity"], "val_perplexity_after": result.val["perplexity"],
               "epochs": [r for r in result.history if r["event"] == "epoch"], "samples_before": samples_before, "samples_after": samples_after,
               "replacement_chars": replacement, "model_dir": str(model_dir), "seconds": round(time.perf_counter() - start, 1)}
    C.save_results(out, results)
    return results


if __name__ == "__main__":
    main()
