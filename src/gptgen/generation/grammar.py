"""Structured output: token masks that keep a row's text inside a JSON schema, a regular expression or a
grammar, through llguidance (a maintained grammar engine; `pip install 'gptgen[structured]'`).

    constraint = compile_constraint(lm.tokenizer, {"type": "json_schema", "json_schema": {"schema": {...}}})
    row = constraint.new_row()           # one per generated sequence
    mask = row.allowed_mask(vocab_size)  # a bool tensor: the tokens that keep the text valid
    row.accept(token_id)                 # after the token is chosen
    row.is_finished()                    # the text is complete: only the end of sequence is left

`response_format` is OpenAI's: {"type": "json_object"} (any JSON object), {"type": "json_schema",
"json_schema": {"schema": {...}}}; and gptgen's {"type": "regex", "regex": "..."} and {"type": "grammar",
"grammar": "..."} (Lark or llama.cpp's GBNF). {"type": "text"} or None means no constraint.

llguidance was chosen over xgrammar by measured per-token cost on a Hugging Face `tokenizers` vocabulary
(bench/bench_grammar.py; figures in docs/serving.md) and because it installs alone (xgrammar pulls triton).
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from typing import Any

import torch

from ..errors import GenerationError

_BITS = torch.arange(32, dtype=torch.int32)
# JSON is written as json.dumps writes it (", " and ": ", no other white space): free white space lets a model
# pad forever without closing the document. A schema's "x-guidance" options override this.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")
_lock = threading.Lock()
_ll_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GenerationError("Structured output (response_format) needs llguidance; install it with "
                              "pip install 'gptgen[structured]'.") from None
    return llguidance


def _ll_tokenizer(tokenizer):
    """llguidance's view of a gptgen Tokenizer (built once per tokenizer: about a second for 50k tokens)."""
    with _lock:
        cached = _ll_tokenizers.get(tokenizer)
        if cached is not None:
            return cached
    ll = _llguidance()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GenerationError("Structured output needs a tokenizer with an end-of-sequence token, and this one "
                              "has none.")
    try:
        made = ll.LLTokenizer(_llguidance_json(tokenizer), n_vocab=tokenizer.vocab_size, eos_token=eos)
    except ValueError as exc:
        raise GenerationError(f"Structured output cannot read this tokenizer ({kind_of(tokenizer)}): {exc}; "
                              "byte-level BPE (GPT-2's) and SentencePiece-style BPE tokenizers work.") from None
    with _lock:
        _ll_tokenizers[tokenizer] = made
    return made


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def kind_of(tokenizer) -> str:
    return getattr(tokenizer, "kind", None) or "unknown kind"


def _llguidance_json(tokenizer) -> str:
    """The tokenizer's JSON for llguidance. A Metaspace decoder (gptgen's "bpe" kind) is given as the
    equivalent Replace("▁", " ") + ByteFallback + Fuse + Strip sequence (Llama's), which llguidance reads:
    the token bytes are the same, and llguidance does not read Metaspace itself."""
    data = json.loads(tokenizer.backend.to_str())
    decoder = data.get("decoder") or {}
    if decoder.get("type") == "Metaspace":
        mark = decoder.get("replacement", "\u2581")
        data["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": mark}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1 if decoder.get("prepend_scheme") != "never" else 0,
             "stop": 0}]}
    return json.dumps(data)


def grammar_of(response_format: dict | None) -> str | None:
    """llguidance's grammar for an OpenAI-style response_format; None for text. Raises GenerationError
    naming what is wrong with the format."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GenerationError(f"response_format must be an object like {{\"type\": \"json_object\"}}, "
                              f"got {response_format!r}.")
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise GenerationError(f"response_format type must be one of {', '.join(FORMATS)}, got {kind!r}.")
    if kind == "text":
        return None
    ll = _llguidance()
    if kind == "json_object":
        return ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and schema is None and "type" in spec:
            schema = spec  # a bare schema, as some clients send it
        if not isinstance(schema, dict):
            raise GenerationError("response_format json_schema needs a schema: "
                                  "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}.")
        try:
            return ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as exc:
            raise GenerationError(f"The response_format schema is not valid: {exc}.") from None
    text = response_format.get(kind)
    if not isinstance(text, str) or not text:
        raise GenerationError(f"response_format {kind} needs a non-empty string under {kind!r}.")
    if kind == "regex":
        return ll.LLMatcher.grammar_from_regex(text)
    try:
        return ll.grammar_from("grammar", text)
    except ValueError as exc:
        raise GenerationError(f"The response_format grammar is not valid: {exc}.") from None


class RowState:
    """One sequence's place in the grammar."""

    def __init__(self, matcher, vocab: int, eos: int) -> None:
        self.matcher = matcher
        self.vocab = vocab
        self.eos = eos
        self.words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)  # llguidance writes the bitmask here

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """A bool tensor of vocab_size: True for the tokens the grammar allows next (tokens beyond the
        tokenizer's vocabulary never are). A finished row allows only the end of sequence."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        bits = ((self.words.unsqueeze(1) >> _BITS) & 1).flatten().bool()
        n = min(vocab_size, self.vocab)
        if n == vocab_size:
            mask = bits[:n]
        else:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[:n] = bits[:n]
        if self.matcher.is_error():
            raise GenerationError(_sentence(f"The grammar engine failed: {self.matcher.get_error().splitlines()[0]}"))
        if not mask.any() and self.eos < vocab_size:
            mask[self.eos] = True  # nothing can follow: end the text
        return mask

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            reason = (self.matcher.get_error() or "not allowed by the grammar").splitlines()[0]
            raise GenerationError(_sentence(f"Token {token_id} does not fit the response_format here: {reason}"))

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


class Constraint:
    """A compiled response_format for one tokenizer; new_row() starts a sequence."""

    def __init__(self, ll_tokenizer, grammar: str, vocab: int, eos: int, spec: str) -> None:
        self.ll_tokenizer = ll_tokenizer
        self.grammar = grammar
        self.vocab = vocab
        self.eos = eos
        self.spec = spec

    def new_row(self) -> RowState:
        ll = _llguidance()
        return RowState(ll.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0), self.vocab, self.eos)


def compile_constraint(tokenizer, response_format: dict | None) -> Constraint | None:
    """The Constraint of `response_format` for `tokenizer` (None for text), cached per tokenizer and spec.
    A malformed format or grammar raises GenerationError with one sentence."""
    try:
        spec = json.dumps(response_format)  # key order kept: it is the order properties are written in
    except (TypeError, ValueError):
        raise GenerationError("response_format must be plain JSON.") from None
    return _compiled(tokenizer, spec)


@functools.lru_cache(maxsize=256)
def _compiled_grammar(spec: str) -> str | None:
    return grammar_of(json.loads(spec))


def _compiled(tokenizer, spec: str) -> Constraint | None:
    grammar = _compiled_grammar(spec)
    if grammar is None:
        return None
    ll_tok = _ll_tokenizer(tokenizer)
    cache = _constraints.setdefault(tokenizer, {}) if _weakrefable(tokenizer) else {}
    found = cache.get(spec)
    if found is not None:
        return found
    ll = _llguidance()
    error = ll.LLMatcher.validate_grammar(grammar, ll_tok)
    if error:
        raise GenerationError(_sentence(f"The response_format cannot be used: {error.splitlines()[0]}"))
    constraint = Constraint(ll_tok, grammar, tokenizer.vocab_size, tokenizer.eos_token_id, spec)
    if len(cache) < 256:
        cache[spec] = constraint
    return constraint


_constraints: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


class GrammarProcessor:
    """A logits processor for rows with a response_format: -inf for every token the row's grammar forbids.

    `rows` holds one RowState per batch row (None for a free row, left untouched). Call `accept(row, token)`
    after each token is chosen."""

    def __init__(self, rows: list[RowState | None]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(self.rows):
            if row is not None:
                mask = row.allowed_mask(scores.shape[-1]).to(scores.device)
                scores[i].masked_fill_(~mask, float("-inf"))
        return scores

    def accept(self, index: int, token_id: int) -> None:
        row = self.rows[index]
        if row is not None:
            row.accept(token_id)


class SequenceGrammar:
    """The per-call engine's processor for a config with response_format: one RowState per row, fed the
    tokens each row generated since the last step (read from the decode state), then the rows' masks."""

    def __init__(self, constraint: Constraint) -> None:
        self.constraint = constraint
        self.rows: list[RowState] | None = None
        self.seen: list[int] = []

    def __call__(self, scores: torch.Tensor, state) -> torch.Tensor:
        if self.rows is None:
            self.rows = [self.constraint.new_row() for _ in range(scores.shape[0])]
            self.seen = [0] * scores.shape[0]
        finished = state.finished.tolist() if getattr(state, "finished", None) is not None else None
        scores = scores.clone()
        for r, generated in enumerate(state.row_generated()):
            for token in generated[self.seen[r]:]:
                if not self.rows[r].is_finished():
                    self.rows[r].accept(token)
            self.seen[r] = len(generated)
            if finished is None or not finished[r]:
                mask = self.rows[r].allowed_mask(scores.shape[-1]).to(scores.device)
                scores[r].masked_fill_(~mask, float("-inf"))
        return scores
