"""Chat and prompting: turn templates built from a model's special tokens, sessions with a history window,
and zero-, one- and few-shot prompts.

The KoGPT-2 chatbot format of the seeds is `<s>{question}</s><s>{answer}</s>`: the model answers after the
prompt `<s>{question}</s><s>` and generation stops at the end marker `</s>`.

    from gptgen.chat import ChatSession
    session = ChatSession(lm, candidates=5, options=dict(do_sample=True, top_k=50, top_p=0.95,
                                                         bad_words=["<unk>"], max_new_tokens=64))
    session.ask("오늘 너무 피곤해")      # -> 5 answers; the first joins the history
    session.last_finished               # -> [True, True, ...]: which answers reached the end marker
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import GenerationError


@dataclass(frozen=True)
class ChatTemplate:
    """How user and assistant turns are written; `{text}` marks the turn's text."""

    user: str = "<s>{text}</s>"
    assistant: str = "<s>{text}</s>"
    system: str = ""

    def __post_init__(self) -> None:
        for name in ("user", "assistant"):
            if getattr(self, name).count("{text}") != 1:
                raise GenerationError(f"The chat template's {name} turn must contain {{text}} exactly once.")
        if not self.end_marker:
            raise GenerationError("The chat template's assistant turn must end with a marker after {text}, "
                                  "e.g. '<s>{text}</s>', so generation knows where an answer ends.")

    @property
    def assistant_prefix(self) -> str:
        return self.assistant.split("{text}")[0]

    @property
    def end_marker(self) -> str:
        """The text that closes an assistant turn; generation stops there."""
        return self.assistant.split("{text}")[1]

    def turn(self, role: str, text: str) -> str:
        # Plain replacement, not str.format: user text may contain braces.
        return getattr(self, role).replace("{text}", text)

    def render(self, history: Sequence[tuple[str, str]], question: str) -> str:
        """The prompt for the answer to `question` after the (question, answer) pairs of `history`."""
        parts = [self.system] if self.system else []
        for user, bot in history:
            parts.append(self.turn("user", user))
            parts.append(self.turn("assistant", bot))
        parts.append(self.turn("user", question))
        parts.append(self.assistant_prefix)
        return "".join(parts)

    @classmethod
    def for_tokenizer(cls, tokenizer, system: str = "") -> "ChatTemplate":
        """`<bos>{q}<eos><bos>{a}<eos>` with the tokenizer's own BOS/EOS (KoGPT-2's `<s>`/`</s>`)."""
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token
        if not eos or eos == bos:
            raise GenerationError(
                "The tokenizer has no end-of-sequence token distinct from its BOS; choose a template that ends "
                "each turn with a marker (e.g. --template plain, or --user-template/--assistant-template)."
            )
        return cls(user=f"{bos}{{text}}{eos}", assistant=f"{bos}{{text}}{eos}", system=system)


# Named templates. "kogpt2" is the seeds' format; "plain" works with any tokenizer ("\n" ends a turn).
TEMPLATES = {
    "kogpt2": ChatTemplate(),
    "plain": ChatTemplate(user="Q: {text}\n", assistant="A: {text}\n"),
}


def get_template(name_or_template, tokenizer=None) -> ChatTemplate:
    """A ChatTemplate from an instance, a name of TEMPLATES, or "auto" (the tokenizer's BOS/EOS)."""
    if isinstance(name_or_template, ChatTemplate):
        return name_or_template
    if name_or_template in (None, "auto"):
        if tokenizer is None:
            raise GenerationError("The 'auto' chat template needs the model's tokenizer.")
        return ChatTemplate.for_tokenizer(tokenizer)
    if name_or_template not in TEMPLATES:
        raise GenerationError(f"Unknown chat template {name_or_template!r}; choose auto, "
                              f"{', '.join(TEMPLATES)}, or give the turn templates.")
    return TEMPLATES[name_or_template]


def _special_marker_id(tokenizer, marker: str) -> int | None:
    """The id of `marker` when it is one special token of the tokenizer (like `</s>`), else None."""
    if marker not in tokenizer.special_tokens.values():
        return None
    return tokenizer.token_to_id(marker)


@dataclass
class ChatSession:
    """A conversation with a LanguageModel; keeps the last `history_turns` exchanges in the prompt.

    `options` are generate() options (sampler, top_k, top_p, max_new_tokens, bad_words, seed, ...); with a
    seed, the n-th question (counting from 0) is answered with seed + n.
    After ask(), `last_finished[i]` tells whether answer i ended by itself, at the template's end marker
    or the model's EOS (False: max_new_tokens or the context cut it); `last_raw[i]` is its generated text
    with special tokens kept (when the end marker is a special token); `last_prompt` is the prompt sent.
    The answer budget shrinks to what the context leaves after the prompt; the prompt is never cut
    while older turns can be dropped instead.
    """

    lm: Any
    template: ChatTemplate | str | None = None
    history_turns: int = 3
    candidates: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    last_finished: list[bool] = field(default_factory=list)
    last_raw: list[str] = field(default_factory=list)
    last_prompt: str = ""
    turns_asked: int = 0

    def __post_init__(self) -> None:
        self.template = get_template(self.template, self.lm.tokenizer)
        self.set_history(self.history_turns)
        self.set_candidates(self.candidates)
        for key in ("num_return_sequences", "include_prompt", "skip_special_tokens"):
            if key in self.options:
                raise GenerationError(f"ChatSession sets {key} itself; use candidates= for the number of answers.")

    def set_candidates(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GenerationError(f"The number of candidates must be a positive integer, got {n!r}.")
        self.candidates = n

    def set_history(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise GenerationError(f"The history window must be 0 or more turns, got {n!r}.")
        self.history_turns = n

    def reset(self) -> None:
        self.history.clear()

    def prompt_for(self, question: str) -> str:
        """The prompt for the next answer; the oldest turns are dropped until it leaves room to answer."""
        window = self.history[-self.history_turns:] if self.history_turns else []
        ctx = self.lm.config.n_positions
        limit = ctx - min(self._budget(), ctx // 2)
        while True:
            prompt = self.template.render(window, question)
            if not window or len(self.lm.tokenizer.encode(prompt)) <= limit:
                return prompt
            window = window[1:]

    def ask(self, question: str) -> list[str]:
        """Answer candidates for `question`; the first one joins the history."""
        question = question.strip()
        if not question:
            raise GenerationError("The question is empty.")
        tok = self.lm.tokenizer
        marker = self.template.end_marker
        prompt = self.prompt_for(question)
        self.last_prompt = prompt
        options = dict(self.options)
        options.setdefault("truncate_prompt", True)
        if options.get("seed") is not None:
            # Reproducible conversations whose turns still draw different samples.
            options["seed"] = int(options["seed"]) + self.turns_asked
        self.turns_asked += 1
        # The template writes BOS itself; a model trained with add_bos must not get a second one.
        if tok.bos_token and prompt.startswith(tok.bos_token):
            options["add_bos"] = False
        # Shorten the answer rather than the question: a prompt plus max_new_tokens longer than the
        # context would otherwise lose the start of the prompt to truncation.
        if options.get("max_length") is None:
            used = len(tok.encode(prompt, add_bos=bool(options.get("add_bos", self.lm.config.extra.get("add_bos")))))
            options["max_new_tokens"] = max(1, min(self._budget(), self.lm.config.n_positions - used))
        n = self.candidates
        marker_id = _special_marker_id(tok, marker)
        if marker_id is not None:
            # A special-token marker (KoGPT-2's </s>): end at that token as well as at the model's EOS,
            # and keep the specials in the text to see whether each answer reached it.
            eos = options.get("eos_token_id")
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            if not eos and tok.eos_token_id is not None:
                eos.append(tok.eos_token_id)
            options["eos_token_id"] = sorted(set(eos) | {marker_id})
            raw = _as_list(self.lm.generate(prompt, num_return_sequences=n, include_prompt=False,
                                            skip_special_tokens=False, **options))
            ends = [m for m in (marker, tok.eos_token) if m]
            finished = [any(text.endswith(m) for m in ends) for text in raw]
            answers = [_strip_specials(text, tok) for text in raw]
        else:
            # A text marker ("\n"): a stop string ends the answer and the text is cut before it. An answer
            # reached the marker when answer + marker fit in the token budget (counted by re-encoding).
            options["stop"] = list(options.get("stop") or []) + [marker]
            raw = answers = _as_list(self.lm.generate(prompt, num_return_sequences=n, include_prompt=False,
                                                      **options))
            finished = [self._reached_text_marker(prompt, a, options) for a in answers]
        self.last_raw = list(raw)
        answers = [a.strip() for a in answers]
        self.last_finished = finished
        if self.history_turns:
            self.history.append((question, answers[0]))
        return answers

    def _budget(self) -> int:
        from .generation import DEFAULT_MAX_NEW_TOKENS

        return int(self.options.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    def _reached_text_marker(self, prompt: str, answer: str, options: dict[str, Any]) -> bool:
        """Whether a text-marker answer ended at the marker rather than at the token budget."""
        budget = options["max_new_tokens"] if options.get("max_new_tokens") else self._budget()
        used = len(self.lm.tokenizer.encode(prompt + answer + self.template.end_marker)) - \
            len(self.lm.tokenizer.encode(prompt))
        return used <= int(budget)


def _as_list(texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _strip_specials(text: str, tokenizer) -> str:
    for token in set(tokenizer.special_tokens.values()):
        text = text.replace(token, "")
    return text


def few_shot_prompt(examples: Sequence[tuple[str, str]], query: str, *,
                    template: ChatTemplate | str | None = None, instruction: str = "", tokenizer=None) -> str:
    """A zero-, one- or few-shot prompt: the instruction, solved examples as turns, then the query.

    With the default KoGPT-2 template, `few_shot_prompt([("좋아", "긍정")], "싫어")` gives
    `<s>좋아</s><s>긍정</s><s>싫어</s><s>`; generate with stop at `template.end_marker` (or use
    complete_few_shot()).
    """
    template = get_template(template, tokenizer) if template is not None else TEMPLATES["kogpt2"]
    return instruction + template.render(list(examples), query)


def complete_few_shot(lm, examples: Sequence[tuple[str, str]], query: str, *,
                      template: ChatTemplate | str | None = None, instruction: str = "",
                      **options) -> tuple[str, bool, str]:
    """Generate the answer to a few-shot prompt, stopping at the template's end marker.

    The solved examples play the conversation so far; the oldest are dropped when the prompt would not
    leave room for max_new_tokens in the model's context. Returns (answer, finished, prompt): finished is
    False when max_new_tokens cut the answer; prompt is the prompt actually sent."""
    base = get_template(template if template is not None else "auto", lm.tokenizer)
    session = ChatSession(lm, template=ChatTemplate(user=base.user, assistant=base.assistant,
                                                    system=instruction + base.system),
                          history_turns=max(1, len(examples)), history=list(examples), options=options)
    answer = session.ask(query)[0]
    return answer, session.last_finished[0], session.last_prompt
