"""Recipe 5: zero-, one- and few-shot prompting (the KoGPT-2 practice).

Prompts are built from the model's own special tokens: each solved example is a turn pair
`<s>{input}</s><s>{output}</s>` and the query ends with `<s>{input}</s><s>`, so the model writes the
answer and generation stops at the template's end marker `</s>`. The tasks are the practice's: a
dialogue turn, sentiment labelling (ChatbotData's label: 0 일상, 1 이별(부정), 2 사랑(긍정)), a question
and a translation, each with 0, 1 and 3 shots. For sentiment the recipe measures the labelling accuracy
on held-out questions against the majority-label baseline.

Prompting needs a model that has learned the turn format; --model defaults to the chatbot that
recipes/korean_chatbot.py writes (runs/korean_chatbot/model). A plain-text template ("Q: ...\\nA: ...\\n")
shows the same with a text end marker.

    python recipes/korean_chatbot.py && python recipes/few_shot.py --model runs/korean_chatbot/model
    python recipes/few_shot.py --model skt/kogpt2-base-v2        # the practice's pretrained KoGPT-2
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import torch  # noqa: E402

from gptgen import load  # noqa: E402
from gptgen.chat import ChatTemplate, complete_few_shot, few_shot_prompt, get_template  # noqa: E402
from gptgen.data import data_dir, read_csv_pairs  # noqa: E402
from gptgen.options import resolve_device  # noqa: E402

LABELS = {"0": "일상", "1": "부정", "2": "긍정"}
TASKS = {
    "dialogue": dict(instruction="", examples=[("안녕하세요", "안녕하세요. 반가워요."),
                                               ("오늘 날씨 좋다", "산책 가기 좋은 날이에요."),
                                               ("심심해", "친구에게 연락해보세요.")], query="배고파"),
    "qa": dict(instruction="", examples=[("대한민국의 수도는?", "서울"), ("일본의 수도는?", "도쿄"),
                                         ("프랑스의 수도는?", "파리")], query="영국의 수도는?"),
    "translation": dict(instruction="", examples=[("사과", "apple"), ("고양이", "cat"), ("책", "book")],
                        query="강아지"),
}
SHOTS = (0, 1, 3)


def build_parser():
    p = C.parser("few_shot", __doc__.split("\n\n")[0], max_new_tokens=24)
    p.add_argument("--model", default="runs/korean_chatbot/model", help="model directory or Hub name")
    p.add_argument("--template", default="auto", help="auto (the tokenizer's <s>…</s>), kogpt2 or plain")
    p.add_argument("--queries", type=int, default=60, help="held-out questions for the sentiment accuracy")
    return p


def sentiment_rows(csv_path: Path) -> list[tuple[str, str]]:
    rows = read_csv_pairs(csv_path, template="{Q}\t{label}")
    return [(q, LABELS[l]) for q, l in (r.rsplit("\t", 1) for r in rows) if l in LABELS]


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model).to(resolve_device(args.device))
    template = get_template(args.template, lm.tokenizer)
    options = dict(sampler="greedy", max_new_tokens=args.max_new_tokens, bad_words=_unk(lm.tokenizer))
    tasks = {}
    for name, task in TASKS.items():
        for shots in SHOTS:
            examples = task["examples"][:shots]
            prompt = few_shot_prompt(examples, task["query"], template=template, instruction=task["instruction"])
            answer, finished, sent = complete_few_shot(lm, examples, task["query"], template=template,
                                                       instruction=task["instruction"], **options)
            kept = next(k for k in range(shots, -1, -1)
                        if sent == few_shot_prompt(examples[shots - k:], task["query"], template=template,
                                                   instruction=task["instruction"]))
            tasks[f"{name} {shots}-shot"] = {"prompt": prompt, "answer": answer, "finished": finished,
                                             "shots": shots, "shots_kept": kept}
    # Sentiment labelling: k solved examples (one per label for k = 3) before each held-out question.
    rows = sentiment_rows(Path(args.data_dir or data_dir()) / "chatbot-ko" / "ChatbotData.csv")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    pool, queries = rows[: len(rows) // 2], rows[len(rows) // 2:][: args.queries]
    by_label = {lab: [r for r in pool if r[1] == lab] for lab in LABELS.values()}
    accuracy, kept_shots = {}, {}
    for shots in SHOTS:
        correct = kept = 0
        for q, gold in queries:
            examples = [rng.choice(by_label[lab]) for lab in list(LABELS.values())[:shots]]
            rng.shuffle(examples)
            answer, _, sent = complete_few_shot(lm, examples, q, template=template,
                                                **{**options, "max_new_tokens": 4})
            correct += answer.strip() == gold
            kept += sum(template.turn("assistant", lab) in sent for _, lab in examples)
        accuracy[f"{shots}-shot"] = correct / len(queries)
        kept_shots[f"{shots}-shot"] = kept / len(queries)
    majority = Counter(g for _, g in queries).most_common(1)[0][1] / len(queries)
    # The same mechanism with a text end marker: the answer ends at the newline.
    # (Only where the tokenizer can write it: a Korean-only vocabulary may have no "Q", ":" or newline.)
    plain = ChatTemplate(user="Q: {text}\n", assistant="A: {text}\n")
    plain_prompt = few_shot_prompt(TASKS["qa"]["examples"], TASKS["qa"]["query"], template=plain)
    plain_result = None
    unk = lm.tokenizer.unk_token_id
    if unk is None or unk not in lm.tokenizer.encode(plain_prompt):
        plain_answer, plain_finished, _ = complete_few_shot(lm, TASKS["qa"]["examples"], TASKS["qa"]["query"],
                                                         template=plain, **options)
        plain_result = {"prompt": plain_prompt, "answer": plain_answer, "finished": plain_finished}
    if not args.quiet:
        for key, r in tasks.items():
            print(f"[{key}] {r['prompt']!r}\n    -> {r['answer']!r}" + ("" if r["finished"] else " [cut]") +
                  (f" (only {r['shots_kept']} shot(s) fit the context)" if r["shots_kept"] < r["shots"] else ""))
        print(f"\nsentiment labelling accuracy on {len(queries)} held-out questions: " +
              ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()) + f" (majority label: {majority:.2f}); "
              "shots that fit the context on average: " + ", ".join(f"{k} {v:.1f}" for k, v in kept_shots.items()))
        if plain_result is None:
            print("plain template: skipped, the tokenizer cannot encode 'Q:', 'A:' or the newline.")
        else:
            print(f"plain template: {plain_result['answer']!r} (ended by itself: {plain_result['finished']})")
    results = {"recipe": "few_shot", "model": args.model, "template": [template.user, template.assistant],
               "end_marker": template.end_marker, "tasks": tasks, "sentiment_accuracy": accuracy,
               "sentiment_majority_baseline": majority, "sentiment_shots_kept": kept_shots,
               "context": lm.config.n_positions, "sentiment_queries": len(queries),
               "plain_template": plain_result, "seconds": round(time.perf_counter() - start, 1)}
    C.save_results(out, results)
    return results


def _unk(tok) -> list[str] | None:
    return [tok.unk_token] if tok.unk_token and tok.token_to_id(tok.unk_token) is not None else None


if __name__ == "__main__":
    main()
