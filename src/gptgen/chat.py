"""Chat and prompting: chat templates (Hugging Face Jinja `chat_template`s and turn formats built from a
model's special tokens), sessions with a history window, and zero-, one- and few-shot prompts.

Every template renders through one Jinja renderer set up as transformers' `apply_chat_template` sets it up
(a sandboxed environment with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, the tokenizer's `bos_token`/`eos_token`/... and `add_generation_prompt`), so a
model directory's own template gives the prompt transformers would give:

    from gptgen.chat import get_template
    template = get_template("chatml", lm.tokenizer)       # or "auto": the model directory's chat_template
    template.apply([{"role": "user", "content": "hi"}])   # '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'

The KoGPT-2 chatbot format of the seeds is `<s>{question}</s><s>{answer}</s>`: the model answers after the
prompt `<s>{question}</s><s>` and generation stops at the end marker `</s>`.

    from gptgen.chat import ChatSession
    session = ChatSession(lm, candidates=5, options=dict(do_sample=True, top_k=50, top_p=0.95,
                                                         bad_words=["<unk>"], max_new_tokens=64))
    session.ask("오늘 너무 피곤해")      # -> 5 answers; the first joins the history
    session.last_finished               # -> [True, True, ...]: which answers reached the end marker
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import GenerationError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
SYSTEM_ROLES = ("system", "developer")
# Text that closes a turn in common Hub templates; found in a template's source, it also ends an answer.
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


# The Jinja renderer ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _compile(source: str):
    """A compiled template, in an environment configured as transformers configures its own."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GenerationError("Jinja chat templates need jinja2; install it with pip install 'gptgen[serve]'.") \
            from None

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise GenerationError(f"The chat template is not valid Jinja: {exc.message} (line {exc.lineno}).") \
            from None


def _render(source: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
            variables: Mapping[str, Any]) -> str:
    import jinja2

    # As transformers: keys whose value is None are dropped from each message.
    plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        return _compile(source).render(messages=plain, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:
        raise GenerationError(f"The chat template refused the messages: {exc}") from None


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja expression printing it verbatim (Jinja unescapes string literals like Python)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def special_token_variables(tokenizer) -> dict[str, str]:
    """The variables transformers passes a template from a tokenizer: bos_token, eos_token, pad_token, ..."""
    if tokenizer is None:
        return {}
    return {f"{role}_token": token for role, token in tokenizer.special_tokens.items() if token}


class _Rendering:
    """What both kinds of template share: apply() renders messages, render() a (history, question) prompt."""

    source: str
    variables: Mapping[str, Any]

    def apply(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
              **variables: Any) -> str:
        """The prompt for `messages` ({"role", "content"} dicts), as transformers' apply_chat_template(
        messages, tokenize=False, add_generation_prompt=...) renders the same template."""
        return _render(self.source, messages, add_generation_prompt, {**self.variables, **variables})

    def render(self, history: Sequence[tuple[str, str]], question: str, system: str | None = None) -> str:
        """The prompt for the answer to `question` after the (question, answer) pairs of `history`."""
        return self.apply(conversation(history, question, system))

    @property
    def end_marker(self) -> str:
        return self.end_markers[0]


def conversation(history: Sequence[tuple[str, str]], question: str, system: str | None = None) -> list[dict]:
    """OpenAI-style messages for a system text, (question, answer) pairs and a new question."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, bot in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]
    messages.append({"role": "user", "content": question})
    return messages


@dataclass(frozen=True)
class ChatTemplate(_Rendering):
    """A template of turn formats: how user, assistant and system turns are written (`{text}` marks the
    turn's text). `system` is fixed text put first when the messages have no system message. It renders
    through its Jinja form (`.source`), so it can be saved as a model's `chat_template`."""

    user: str = "<s>{text}</s>"
    assistant: str = "<s>{text}</s>"
    system: str = ""
    system_turn: str = "{text}"

    def __post_init__(self) -> None:
        for name in ("user", "assistant", "system_turn"):
            if getattr(self, name).count("{text}") != 1:
                raise GenerationError(f"The chat template's {name} turn must contain {{text}} exactly once.")
        if not self.assistant.split("{text}")[1]:
            raise GenerationError("The chat template's assistant turn must end with a marker after {text}, "
                                  "e.g. '<s>{text}</s>', so generation knows where an answer ends.")

    @property
    def variables(self) -> Mapping[str, Any]:
        return {}

    @property
    def assistant_prefix(self) -> str:
        return self.assistant.split("{text}")[0]

    @property
    def end_markers(self) -> tuple[str, ...]:
        """The text that closes an assistant turn; generation stops there."""
        return (self.assistant.split("{text}")[1],)

    def turn(self, role: str, text: str) -> str:
        # Plain replacement, not str.format: user text may contain braces.
        return getattr(self, role).replace("{text}", text)

    @property
    def source(self) -> str:
        """This template in Jinja, as a model directory's `chat_template` holds it."""
        def turn(fmt: str) -> str:
            before, after = fmt.split("{text}")
            return (_jinja_literal(before) if before else "") + "{{ message['content'] }}" + \
                (_jinja_literal(after) if after else "")

        roles = "['" + "', '".join(SYSTEM_ROLES) + "']"
        out = ""
        if self.system:
            out += ("{% if not (messages | selectattr('role', 'in', " + roles + ") | list) %}"
                    + _jinja_literal(self.system) + "{% endif %}")
        out += ("{% for message in messages %}"
                "{% if message['role'] in " + roles + " %}" + turn(self.system_turn)
                + "{% elif message['role'] == 'user' %}" + turn(self.user)
                + "{% elif message['role'] == 'assistant' %}" + turn(self.assistant)
                + "{% else %}{{ raise_exception('This chat template knows the roles system, user and "
                  "assistant, not ' + message['role'] + '.') }}{% endif %}{% endfor %}")
        if self.assistant_prefix:
            out += "{% if add_generation_prompt %}" + _jinja_literal(self.assistant_prefix) + "{% endif %}"
        return out

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


@dataclass(frozen=True)
class JinjaChatTemplate(_Rendering):
    """A Hugging Face `chat_template` (Jinja source) with the tokenizer's special tokens as variables.

    Answers end at `end_markers`: the turn-closing markers the source writes literally (ChatML's
    `<|im_end|>`, Llama-3's `<|eot_id|>`, ...) and the tokenizer's EOS."""

    source: str
    variables: Mapping[str, Any] = field(default_factory=dict)
    markers: tuple[str, ...] = ()
    name: str = "jinja"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise GenerationError("The chat template is empty.")
        _compile(self.source)  # a syntax error shows now, not at the first request

    def bind(self, tokenizer) -> "JinjaChatTemplate":
        """This template with `tokenizer`'s special tokens (bos_token, eos_token, ...) as variables."""
        return JinjaChatTemplate(self.source, {**special_token_variables(tokenizer), **self.variables},
                                 self.markers, self.name)

    @property
    def end_markers(self) -> tuple[str, ...]:
        found = list(self.markers) + [m for m in KNOWN_END_MARKERS if m in self.source]
        eos = self.variables.get("eos_token")
        if eos:
            found.append(eos)
        out = tuple(dict.fromkeys(found))
        if not out:
            raise GenerationError(f"The chat template {self.name!r} has no end marker and the tokenizer no EOS "
                                  "token, so an answer could not end; give a template that closes turns.")
        return out


# The built-in templates. "kogpt2" is the seeds' format; "plain" works with any tokenizer ("\n" ends a
# turn); "chatml" is the <|im_start|>role ... <|im_end|> format (Qwen, OpenHermes, ...).
CHATML_SOURCE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
TEMPLATES = {
    "kogpt2": ChatTemplate(),
    "plain": ChatTemplate(user="Q: {text}\n", assistant="A: {text}\n", system_turn="{text}\n"),
    "chatml": JinjaChatTemplate(CHATML_SOURCE, markers=("<|im_end|>",), name="chatml"),
}
TEMPLATE_CHOICES = "auto (the model directory's chat_template, else <bos>{text}<eos>), " + \
    ", ".join(TEMPLATES) + ", or the path of a Jinja file or model directory"


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The Jinja `chat_template` of a model or tokenizer directory (chat_template.jinja, else
    tokenizer_config.json's "chat_template"; of a list of named templates, "default"), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text("utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def template_from_pair_format(fmt: str | None) -> ChatTemplate | None:
    """The chat template of a two-field training format such as the chatbot data set's
    "<s>{Q}</s><s>{A}</s>" or "Q: {question}\nA: {answer}\n" (the text between the fields is the user turn's
    end then the assistant turn's start); None for any other format."""
    import re

    if not fmt:
        return None
    parts = re.split(r"\{[A-Za-z_][A-Za-z0-9_]*\}", fmt)
    if len(parts) != 3:
        return None
    prefix, middle, suffix = parts
    if not suffix or not middle.startswith(suffix) or "{" in fmt.replace("{", "", 2):
        return None
    try:
        return ChatTemplate(user=prefix + "{text}" + suffix, assistant=middle[len(suffix):] + "{text}" + suffix)
    except GenerationError:
        return None


def template_source(template) -> str:
    """The Jinja source to save as a model's chat_template, from a template or a built-in name."""
    return get_template(template).source


def get_template(name_or_template, tokenizer=None):
    """A chat template from an instance, a name of TEMPLATES, "auto", a Jinja file or a model directory.

    "auto" (and None) is the tokenizer's own `chat_template` (read from its model directory), else
    `<bos>{text}<eos>` with the tokenizer's BOS/EOS. Jinja templates are bound to the tokenizer's special
    tokens."""
    if isinstance(name_or_template, ChatTemplate):
        return name_or_template
    if isinstance(name_or_template, JinjaChatTemplate):
        return name_or_template.bind(tokenizer) if tokenizer is not None else name_or_template
    if name_or_template in (None, "auto"):
        if tokenizer is None:
            raise GenerationError("The 'auto' chat template needs the model's tokenizer.")
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return JinjaChatTemplate(own, name="the model's chat_template").bind(tokenizer)
        return ChatTemplate.for_tokenizer(tokenizer)
    if not isinstance(name_or_template, (str, os.PathLike)):
        raise GenerationError(f"A chat template is a name, a path or a template object, got {name_or_template!r}.")
    if name_or_template in TEMPLATES:
        return get_template(TEMPLATES[name_or_template], tokenizer)
    path = Path(name_or_template)
    if path.is_dir():
        source = read_chat_template(path)
        if source is None:
            raise GenerationError(f"{path} holds no chat_template (chat_template.jinja or tokenizer_config.json).")
    elif path.is_file():
        try:
            source = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationError(f"Cannot read the chat template file {path}: {exc}.") from None
    else:
        raise GenerationError(f"Unknown chat template {str(name_or_template)!r}; choose {TEMPLATE_CHOICES}.")
    return get_template(JinjaChatTemplate(source, name=str(path)), tokenizer)


def check_template_name(name: str | None) -> None:
    """Refuse a template name that names neither a built-in nor a file (before a model is loaded)."""
    if name in (None, "auto", "none") or name in TEMPLATES or Path(name).exists():
        return
    raise GenerationError(f"Unknown chat template {name!r}; choose {TEMPLATE_CHOICES}.")


def chat(lm, messages: Sequence[Mapping[str, Any]], *, template=None, add_generation_prompt: bool = True,
         **options) -> str | list[str]:
    """The assistant's answer to OpenAI-style `messages` ({"role", "content"} dicts) through the chat
    template (default "auto": the model directory's own), stopping at the template's end markers.
    `options` are generate() options; num_return_sequences > 1 gives a list."""
    tmpl = get_template(template, lm.tokenizer)
    prompt = tmpl.apply(messages, add_generation_prompt=add_generation_prompt)
    tok = lm.tokenizer
    stop, eos = list(options.pop("stop", None) or []), options.pop("eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for marker in tmpl.end_markers:
        marker_id = special_marker_id(tok, marker)
        if marker_id is not None:
            eos.append(marker_id)
        else:
            stop.append(marker)
    if eos and tok.eos_token_id is not None:
        eos.append(tok.eos_token_id)
    if eos:
        options["eos_token_id"] = sorted(set(eos))
    if stop:
        options["stop"] = stop
    if tok.bos_token and prompt.startswith(tok.bos_token):
        options.setdefault("add_bos", False)  # the template wrote BOS itself
    options.setdefault("include_prompt", False)
    options.setdefault("skip_special_tokens", True)
    return lm.generate(prompt, **options)


def special_marker_id(tokenizer, marker: str) -> int | None:
    """The id of `marker` when it is one special token of the tokenizer (like `</s>`), else None."""
    specials = set(tokenizer.special_tokens.values())
    try:  # tokens added as special (ChatML's <|im_end|>) count too
        specials |= {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    except AttributeError:
        pass
    if marker not in specials:
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
    system: str = ""  # a system message put before the conversation (its own turn in the template)

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
            prompt = self.template.render(window, question, self.system or None)
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
        seed = options.get("seed")
        if seed is None:  # the model directory's default
            seed = getattr(getattr(self.lm, "generation_config", None), "seed", None)
        if seed is not None:
            # Reproducible conversations whose turns still draw different samples.
            options["seed"] = int(seed) + self.turns_asked
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
        marker_id = special_marker_id(tok, marker)
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

        default = getattr(self.lm, "generation_config", None)  # the model directory's default
        return int(self.options.get("max_new_tokens") or (default and default.max_new_tokens) or DEFAULT_MAX_NEW_TOKENS)

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
    system = ""
    if isinstance(base, ChatTemplate):
        base = ChatTemplate(user=base.user, assistant=base.assistant, system=instruction + base.system,
                            system_turn=base.system_turn)
    else:
        system = instruction  # a Jinja template writes it as a system turn
    session = ChatSession(lm, template=base, history_turns=max(1, len(examples)), history=list(examples),
                          options=options, system=system)
    answer = session.ask(query)[0]
    return answer, session.last_finished[0], session.last_prompt
