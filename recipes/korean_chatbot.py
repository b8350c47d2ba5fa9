"""Recipe 4: a Korean chatbot (the KoGPT-2 chatbot practice).

A SentencePiece-style BPE tokenizer with <s> </s> <pad> <unk> is trained on the Q and A columns of
ChatbotData.csv (or --base gives a Korean GPT-2 directory with its own tokenizer); each pair becomes
`<s>Q</s><s>A</s>`, padded and truncated to --max-len tokens (128 in the seeds); the model is trained
on it with AdamW, then answers questions with 5 candidates sampled with top-k 50 + top-p 0.95, stopping
at `</s>`, with `<unk>` banned. The model is saved for `gptgen chat --model OUTPUT/model`.

    python recipes/korean_chatbot.py --output runs/korean_chatbot              # full size (GPU)
    python recipes/korean_chatbot.py --base skt/kogpt2-base-v2                 # from KoGPT-2, as the seeds
    python recipes/korean_chatbot.py --limit 300 --epochs 1 --max-len 32 ...   # toy size (tests)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from gptgen import LanguageModel, Tokenizer, load  # noqa: E402
from gptgen.chat import ChatSession  # noqa: E402
from gptgen.config import parse_overrides  # noqa: E402
from gptgen.data import Corpus, data_dir, pack_examples, read_csv_pairs, split_fraction  # noqa: E402
from gptgen.options import resolve_device  # noqa: E402
from gptgen.training import PrintEpochs  # noqa: E402

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
TEMPLATE = "<s>{Q}</s><s>{A}</s>"
QUESTIONS = ["오늘 너무 피곤해", "배고프다", "여행 가고 싶어", "헤어졌어", "좋아하는 사람이 생겼어"]
# A GPT-2-shaped model small enough to train on a CPU in minutes; --config and --preset change it.
MODEL = dict(n_layer=4, n_embd=256, n_head=4)


def turns(dialogue: str) -> list[str]:
    """The Q and A texts of one `<s>Q</s><s>A</s>` example."""
    return [t for t in dialogue.replace("<s>", "").split("</s>") if t.strip()]


def pack(tok, texts: list[str], max_len: int):
    """Rows of max_len tokens (inputs max_len - 1 + the shifted label), right-padded with <pad>, loss
    masked on padding; the texts already hold their <s> and </s>."""
    return pack_examples(tok.encode_batch(texts), max_len - 1, pad_id=tok.pad_token_id)


def build_parser():
    p = C.parser("korean_chatbot", __doc__.split("\n\n")[0], preset="gpt2", epochs=3, batch_size=32, lr=5e-4,
                 max_new_tokens=40)
    p.add_argument("--base", help="start from this model (a directory or Hub name with <s> </s> <pad> <unk> "
                                  "tokens, e.g. skt/kogpt2-base-v2) instead of a new model and tokenizer")
    p.add_argument("--max-len", type=int, default=128, help="tokens per padded example (seeds: 128)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tokenizer-kind", choices=["bpe", "byte-bpe"], default="bpe",
                   help="bpe: SentencePiece-style (default); byte-bpe: GPT-2 style byte-level")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--answer-with", metavar="DIR",
                   help="skip training: answer the questions with a chatbot this recipe saved before")
    p.add_argument("--questions", nargs="+", default=QUESTIONS)
    return p


def train_chatbot(args, out: Path):
    """Tokenizer (or --base), packing, training; returns (numbers, model directory, reloaded model)."""
    csv_path = Path(args.data_dir or data_dir()) / "chatbot-ko" / "ChatbotData.csv"
    dialogues = read_csv_pairs(csv_path, template=TEMPLATE)
    train_texts, val_texts = Corpus(*split_fraction(dialogues, args.val_fraction, seed=args.seed)).limit(args.limit)
    torch.manual_seed(args.seed)
    if args.base:
        lm = load(args.base)
        tok = lm.tokenizer
        missing = [t for t in SPECIALS.values() if tok.token_to_id(t) is None]
        if missing:
            raise SystemExit(f"{args.base}'s tokenizer lacks {', '.join(missing)}; the chat format needs them.")
    else:
        sentences = [t for d in train_texts for t in turns(d)]
        tok = Tokenizer.train(args.tokenizer_kind, sentences, args.vocab_size, special_tokens=dict(SPECIALS),
                              reserved_tokens=list(SPECIALS.values()))
        lm = LanguageModel.from_preset(args.preset, tok, **{**MODEL, "n_positions": args.max_len,
                                                             **parse_overrides(args.config)})
    train_data, val_data = pack(tok, train_texts, args.max_len), pack(tok, val_texts, args.max_len)
    if not args.quiet:
        print(f"{len(train_texts):,} training / {len(val_texts):,} validation dialogues as {args.max_len}-token "
              f"rows; tokenizer {tok.vocab_size:,} tokens; model {lm.num_parameters():,} parameters.")
        print("example:", train_texts[0], "->", tok.encode(train_texts[0])[:16], "...")
    before = lm.evaluate(val_data)
    result = lm.fit(train_data, val_data=val_data, weight_decay=0.01, schedule="constant",
                    callbacks=[] if args.quiet else [PrintEpochs()], **C.fit_options(args))
    model_dir = lm.save(out / "model", overwrite=args.overwrite)
    trained = {"train_dialogues": len(train_texts), "val_dialogues": len(val_texts), "max_len": args.max_len,
               "vocab_size": tok.vocab_size, "parameters": lm.num_parameters(),
               "val_perplexity_before": before["perplexity"], "val_perplexity_after": result.val["perplexity"],
               "val_accuracy_after": result.val["accuracy"], "steps": result.steps,
               "epochs": [r for r in result.history if r["event"] == "epoch"]}
    return trained, model_dir, load(model_dir).to(resolve_device(args.device))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.answer_with:
        trained, model_dir = {}, Path(args.answer_with)
        lm = load(model_dir).to(resolve_device(args.device))
        tok = lm.tokenizer
    else:
        trained, model_dir, lm = train_chatbot(args, out)
        tok = lm.tokenizer
    options = dict(do_sample=True, top_k=50, top_p=0.95, max_new_tokens=args.max_new_tokens,
                   bad_words=[tok.unk_token], seed=args.seed)  # question i is answered with seed + i
    session = ChatSession(lm, history_turns=0, candidates=args.candidates, options=options)
    answers, unk_seen = [], 0
    for q in args.questions:
        cands = session.ask(q)
        unk_seen += sum(tok.unk_token in raw for raw in session.last_raw)
        answers.append({"question": q, "answers": cands, "finished": session.last_finished})
        if not args.quiet:
            print(f"\nQ: {q}")
            for j, (a, done) in enumerate(zip(cands, session.last_finished), 1):
                print(f"  A{j}: {a}" + ("" if done else "  [cut at max_new_tokens]"))
    finished = [f for a in answers for f in a["finished"]]
    results = {"recipe": "korean_chatbot", **trained, "answers": answers,
               "finished_fraction": sum(finished) / len(finished), "unk_in_answers": unk_seen,
               "model_dir": str(model_dir), "seconds": round(time.perf_counter() - start, 1)}
    C.save_results(out, results)
    if not args.quiet:
        if trained:
            print(f"\nvalidation perplexity {trained['val_perplexity_before']:.1f} -> "
                  f"{trained['val_perplexity_after']:.2f}")
        print(f"{results['finished_fraction']:.0%} of the answers ended at </s>; <unk> generated {unk_seen} times; "
              f"{results['seconds']} s.")
        print(f"Chat with it: gptgen chat --model {model_dir} --do-sample --top-k 50 --top-p 0.95 "
              f"--candidates {args.candidates} --bad-words '<unk>' --max-new-tokens {args.max_new_tokens}")
    return results


if __name__ == "__main__":
    main()
