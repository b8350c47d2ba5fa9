"""Request bodies of the OpenAI-compatible API, checked with pydantic in strict mode.

Strict mode refuses what OpenAI refuses ("0.5" for a number, true for an integer); unknown fields are
ignored as OpenAI does. A validation failure becomes one sentence naming the field (see `error_sentence`).
gptgen's extras use their Hugging Face names: top_k, repetition_penalty, no_repeat_ngram_size, min_tokens,
bad_words; min_p and ignore_eos as vLLM spells them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# How a field should look, for messages about values of the wrong type.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of such lists",
    "stop": "a string or a list of strings",
    "messages": "a list of {role, content} objects",
    "content": "a string or a list of text parts",
    "max_tokens": "a positive integer",
    "max_completion_tokens": "a positive integer",
    "n": "a positive integer",
    "seed": "an integer",
    "logprobs": "an integer from 0 to 20 (a boolean for chat)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# Decoding options are passed on as sent (1 an int, 1e300 a float, "hot" a string): GenerationConfig judges
# them, and its sentence shows the value as the API and the CLI show it.
_Int = Any


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions. Only their JSON types are checked here:
    values (bounds included) are judged by GenerationConfig.from_openai, which also takes every other
    GenerationConfig option by its name and refuses fields it does not know (extra="allow" keeps them)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[_Int] = None
    temperature: Optional[_Int] = None
    top_p: Optional[_Int] = None
    n: _Int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[_Int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[_Int] = None
    frequency_penalty: Optional[_Int] = None
    user: Optional[str] = None
    # Refused with a 400 when asked for: they need the per-call engine (see docs/serving.md).
    best_of: Optional[int] = Field(None, ge=1)
    use_beam_search: bool = False
    # OpenAI fields this server cannot honour: refused when set rather than silently ignored.
    logit_bias: Optional[dict[str, float]] = None

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop takes at most 16 strings")
        return self


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[_Int] = None
    suffix: Optional[str] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[_Int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    add_generation_prompt: Optional[bool] = None  # vLLM's: false renders the conversation as it is

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


def error_sentence(exc: ValidationError) -> tuple[str, str | None]:
    """(one sentence, the offending parameter) for the first problem pydantic found."""
    err = exc.errors(include_url=False)[0]
    loc = [p for p in err.get("loc", ()) if p != "__root__"]
    msg = err.get("msg", "invalid value")
    if err.get("type") == "value_error":  # our own model validators: "Value error, ..."
        text = msg.split(", ", 1)[-1]
        return text[0].upper() + text[1:] + ".", None
    if err.get("type") == "missing":
        param = _path(loc)
        return f"The request is missing the required field '{param}'.", param
    param = _path(loc)
    top = next((p for p in reversed(loc) if isinstance(p, str) and p in _EXPECTED), None)
    if err.get("type", "").endswith("_type") or err.get("type") in ("union_tag_invalid", "literal_error",
                                                                    "list_type", "model_type", "dict_type"):
        if top is not None and err.get("type") != "literal_error":
            got = _describe(err.get("input"))
            return f"'{param}' must be {_EXPECTED[top]}, got {got}.", param
    detail = msg[0].lower() + msg[1:]
    return f"Invalid value for '{param}': {detail}, got {_describe(err.get('input'))}.", param


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]",
                      "float", "bool") or "[" in str(part) or "-" in str(part):
            continue  # pydantic names the union member it tried; the user never wrote it
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
