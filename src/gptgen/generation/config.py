"""GenerationConfig: every decoding option once, with its type, default, bounds and the sentence a bad value gets.

A config is checked once, when it is made; nothing downstream checks an option again. Names enter here:
Hugging Face's and KerasHub's (`from_kwargs`: max_new_tokens, do_sample, sampler=, max_length, ...), an OpenAI
request's (`from_openai`: max_tokens, n, min_tokens, ...), the CLI's flags (gptgen.cli.generate). A model
directory's `generation_config.json` (transformers' file) gives the defaults: `from_model_dir`, `save`.

Bounds are chosen so that no accepted value makes a non-finite distribution: temperature divides scores
from which the row's maximum was taken first (so 1e-300 acts as greedy), repetition_penalty stays within
[0.01, 100], length_penalty within [-10, 10].

    python -m gptgen.generation.config --markdown     # the table of options in docs/generation.md
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GenerationError

FILE_NAME = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 50
SAMPLER_NAMES = ("greedy", "beam", "random", "top_k", "top_p", "contrastive")
RESPONSE_FORMATS = {"text": None, "json_object": None, "json_schema": "json_schema", "regex": "regex",
                    "grammar": "grammar"}


def _opt(default, kind: str, doc: str, *, low=None, high=None, low_open=False, high_open=False, note: str = ""):
    """A field with its spec: kind (int, float, bool, ...), bounds, and a note for the error sentence."""
    return field(default=default, metadata=dict(kind=kind, doc=doc, low=low, high=high, low_open=low_open,
                                                high_open=high_open, note=note))


def _range(spec) -> str:
    low, high = spec["low"], spec["high"]  # every numeric option has a lower bound; floats an upper one too
    if spec["kind"] == "int":
        return f"an integer of at least {low}" if high is None else f"an integer from {low} to {high}"
    return f"a number in {'(' if spec['low_open'] else '['}{low:g}, {high:g}{')' if spec['high_open'] else ']'}"


def _describe(spec) -> str:
    kind = spec["kind"]
    text = {"int": None, "float": None, "bool": "true or false", "early_stopping": "true, false or 'never'",
            "sampler": f"one of {', '.join(SAMPLER_NAMES)} or a Sampler", "ids": "a token id or a list of token ids",
            "id": "a token id (an integer of at least 0)", "texts": "a string or a list of non-empty strings",
            "id_lists": "a list of non-empty lists of token ids",
            "response_format": "an object whose type is text, json_object, json_schema, regex or grammar"}[kind]
    text = text or _range(spec)
    return text + (f" ({spec['note']})" if spec["note"] else "")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _token_list(value):
    if _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in value):
        return None
    return tuple(value)


def check_option(name: str, value):
    """The option's value as the config keeps it (floats as float, lists as tuples), or GenerationError with
    the option's one sentence. None is accepted where the option's default is None."""
    f = _FIELDS.get(name)
    if f is None:
        raise GenerationError(f"There is no generation option {name!r}.")
    spec = f.metadata
    if value is None and f.default is None:
        return None
    kind, out = spec["kind"], _BAD
    if kind == "int":
        if _is_int(value) and value >= spec["low"] and (spec["high"] is None or value <= spec["high"]):
            out = 0 if name == "top_k" and value == -1 else value  # vLLM's "off"
    elif kind == "float":
        if _is_number(value) and math.isfinite(value):
            low, high = spec["low"], spec["high"]
            ok = low is None or (value > low if spec["low_open"] else value >= low)
            ok = ok and (high is None or (value < high if spec["high_open"] else value <= high))
            out = float(value) if ok else _BAD
    elif kind == "bool":
        out = value if isinstance(value, bool) else _BAD
    elif kind == "early_stopping":
        out = value if (isinstance(value, bool) or value == "never") else _BAD
    elif kind == "sampler":
        if callable(getattr(value, "select", None)) and callable(getattr(value, "finalize", None)):
            out = value  # a Sampler (samplers.py imports this module: it is recognised by its hooks)
        elif isinstance(value, str) and value.lower().replace("-", "_") in SAMPLER_NAMES:
            out = value.lower().replace("-", "_")
    elif kind == "id":
        out = value if _is_int(value) and value >= 0 else _BAD
    elif kind == "ids":
        out = _token_list(value)
        out = _BAD if out is None else (value if _is_int(value) else out)
    elif kind == "texts":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value):
            out = tuple(value)
    elif kind == "id_lists":
        if isinstance(value, (list, tuple)):
            lists = [_token_list(v) if isinstance(v, (list, tuple)) else None for v in value]
            if all(x for x in lists):
                out = tuple(lists)
    elif kind == "response_format":
        out = _check_response_format(value)
    if out is _BAD:
        got = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise GenerationError(f"{name} must be {_describe(spec)}, got {got}.")
    return out


_BAD = object()


def _check_response_format(value):
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        return _BAD
    key = RESPONSE_FORMATS[value["type"]]
    if key is not None:
        body = value.get(key)
        if key == "json_schema" and not (isinstance(body, dict) and isinstance(body.get("schema", {}), dict)):
            return _BAD
        if key in ("regex", "grammar") and not (isinstance(body, str) and body):
            return _BAD
    return None if value["type"] == "text" else dict(value)


@dataclass(frozen=True)
class GenerationConfig:
    """Every decoding option, checked when the config is made (GenerationError: one sentence naming the
    option). None means "not set": the sampler's or the model's default applies. Make changed copies with
    `replace(**options)`."""

    # Length
    max_new_tokens: int | None = _opt(None, "int", "tokens to generate (default 50, or what max_length leaves)", low=1)
    max_length: int | None = _opt(None, "int", "prompt plus generated tokens (KerasHub / HF count)", low=1)
    min_new_tokens: int = _opt(0, "int", "no end of sequence before this many new tokens", low=0)
    min_length: int | None = _opt(None, "int", "no end of sequence before prompt plus new tokens reach this", low=0)
    # Which sampler
    sampler: Any = _opt(None, "sampler", "a sampler by name or object (KerasHub); default: chosen by the options")
    do_sample: bool | None = _opt(None, "bool", "sample (HF: top_k 50 unless given); default: when a filter is given")
    temperature: float | None = _opt(None, "float", "softmax temperature (0: greedy); default 1", low=0, high=100)
    top_k: int | None = _opt(None, "int", "keep the k most likely tokens (0 or vLLM's -1: off)", low=-1,
                             note="0 or -1 turns it off")
    top_p: float | None = _opt(None, "float", "nucleus: the most likely tokens up to this mass", low=0, high=1,
                               low_open=True)
    min_p: float | None = _opt(None, "float", "drop tokens below min_p times the top probability", low=0, high=1)
    typical_p: float | None = _opt(None, "float", "locally typical sampling mass (1: off)", low=0, high=1,
                                   low_open=True)
    epsilon_cutoff: float | None = _opt(None, "float", "drop tokens of probability below this", low=0, high=1,
                                        high_open=True)
    eta_cutoff: float | None = _opt(None, "float", "eta sampling cutoff", low=0, high=1, high_open=True)
    min_tokens_to_keep: int | None = _opt(None, "int", "every filter keeps this many tokens (default 1)", low=1)
    num_beams: int | None = _opt(None, "int", "beams of beam search (1: off)", low=1)
    length_penalty: float = _opt(1.0, "float", "beam scores are divided by length ** length_penalty", low=-10, high=10)
    early_stopping: Any = _opt(False, "early_stopping", "beam search stopping rule: true, false or 'never'")
    penalty_alpha: float | None = _opt(None, "float", "contrastive search's penalty (with top_k > 1)", low=0, high=1)
    # Penalties and bans
    repetition_penalty: float = _opt(1.0, "float", "CTRL penalty of tokens present (1: off)", low=0.01, high=100)
    presence_penalty: float = _opt(0.0, "float", "OpenAI: off a generated token's logit once", low=-2, high=2)
    frequency_penalty: float = _opt(0.0, "float", "OpenAI: off a generated token's logit per use", low=-2, high=2)
    no_repeat_ngram_size: int = _opt(0, "int", "never repeat an n-gram of this size (0: off)", low=0)
    bad_words: Any = _opt(None, "texts", "texts never to generate")
    bad_words_ids: Any = _opt(None, "id_lists", "token sequences never to generate")
    # Ends
    eos_token_id: Any = _opt(None, "ids", "end-of-sequence token id(s); default the tokenizer's")
    pad_token_id: int | None = _opt(None, "id", "padding token id; default the model's, else EOS")
    stop: Any = _opt((), "texts", "end a sequence at any of these texts")
    stop_token_ids: Any = _opt(None, "ids", "further token ids that end a sequence")
    include_stop_str_in_output: bool = _opt(False, "bool", "keep the stop text at the end of the output")
    ignore_eos: bool = _opt(False, "bool", "do not stop at the end-of-sequence token")
    # Outputs
    num_return_sequences: int = _opt(1, "int", "sequences per prompt", low=1)
    seed: int | None = _opt(None, "int", "seed of the sampler's random numbers", low=-2 ** 63, high=2 ** 64 - 1)
    logprobs: int | None = _opt(None, "int", "logprob of the token and of N alternatives (server)", low=0, high=20)
    response_format: Any = _opt(None, "response_format", "structured output: json_object, json_schema, regex, grammar")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = f.default if value is None else check_option(f.name, value)  # None: not set
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise GenerationError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                                  f"({self.max_new_tokens}).")
        if self.do_sample and self.num_beams is not None and self.num_beams > 1 and self.sampler is None:
            raise GenerationError("Beam sampling (do_sample with num_beams > 1) is not supported; drop one of them.")

    # Copies and names ---------------------------------------------------------------------------
    def replace(self, **options) -> "GenerationConfig":
        """A copy with these options changed (HF / KerasHub names, as from_kwargs), checked again."""
        if not options:
            return self
        return dataclasses.replace(self, **_mapped(options))

    @classmethod
    def from_kwargs(cls, **options) -> "GenerationConfig":
        """From HF's or KerasHub's keyword names (max_new_tokens, do_sample, sampler=, max_length, ...)."""
        return cls(**_mapped(options))

    @classmethod
    def from_openai(cls, fields: dict, base: "GenerationConfig | None" = None) -> "GenerationConfig":
        """From the sampling fields of an OpenAI (or vLLM) request over `base` (a model directory's defaults):
        max_tokens -> max_new_tokens, n -> num_return_sequences, min_tokens -> min_new_tokens;
        it samples at temperature 1 unless told otherwise (temperature 0: greedy), with no top-k unless given.
        Every other option is taken by its GenerationConfig name; a field of neither kind is refused."""
        out = {k: v for k, v in (base.to_dict() if base is not None else {}).items() if k != "sampler"}
        for key, value in fields.items():
            if value is None or key in _OPENAI_IGNORED:
                continue
            name = _OPENAI.get(key, key)
            if name not in _FIELDS or name == "sampler":
                raise GenerationError(f"The request field {key!r} is not supported.")
            out[name] = value
        temperature = out.setdefault("temperature", 1.0)
        out.setdefault("top_k", 0)
        if "do_sample" not in fields:
            out["do_sample"] = not (_is_number(temperature) and temperature == 0)
        if isinstance(out.get("response_format"), dict) and out["response_format"].get("type") == "text":
            out["response_format"] = None
        return cls(**out)

    @classmethod
    def from_model_dir(cls, directory) -> "GenerationConfig | None":
        """The generation_config.json of a model directory (options gptgen does not know are skipped), or None
        where there is none."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GenerationError(f"{path} is not a readable JSON file: {exc}.") from None
        if not isinstance(data, dict):
            raise GenerationError(f"{path} must hold a JSON object.")
        if "stop_strings" in data:
            data["stop"] = data.pop("stop_strings")
        known = {k: v for k, v in data.items() if k in _FIELDS and k != "sampler"}
        try:
            return cls(**known)
        except GenerationError as exc:
            raise GenerationError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        """The options that differ from the defaults, JSON-ready (a sampler object is left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or (f.name == "sampler" and not isinstance(value, str)):
                continue
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def save(self, directory) -> Path:
        """Write generation_config.json into a directory (HF's file: transformers reads it), atomically."""
        path = Path(directory) / FILE_NAME
        data = self.to_dict()
        if "stop" in data:  # transformers' name
            data["stop_strings"] = data.pop("stop")
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    # What the samplers run -------------------------------------------------------------------------
    def is_sampling(self) -> bool:
        """Whether tokens are drawn (not greedy, beam or contrastive) when no sampler is named."""
        if self.temperature == 0:
            return False
        if self.do_sample is not None:
            return self.do_sample
        return any(getattr(self, n) is not None for n in _SAMPLING_HINTS)


_FIELDS = {f.name: f for f in dataclasses.fields(GenerationConfig)}
_SAMPLING_HINTS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# Other names the entry points accept for the same option.
_ALIASES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "min_tokens": "min_new_tokens"}
_OPENAI = dict(_ALIASES, max_completion_tokens="max_new_tokens", top_logprobs="logprobs")
_OPENAI_IGNORED = {"model", "stream", "stream_options", "user", "best_of", "use_beam_search", "logit_bias",
                   "tools", "functions"}


def _mapped(options: dict) -> dict:
    out = {}
    for key, value in options.items():
        name = _ALIASES.get(key, key)
        if name not in _FIELDS:
            raise GenerationError(f"generate() has no option {key!r}.")
        if name in out:
            raise GenerationError(f"{key} and {name} name the same option; give one.")
        out[name] = value
    return out


def numeric_options() -> dict[str, dict]:
    """name -> spec of every int and float option (kind, low, high, low_open, high_open): for tests and docs."""
    return {n: dict(f.metadata) for n, f in _FIELDS.items() if f.metadata["kind"] in ("int", "float")}


def markdown_table() -> str:
    """The table of options in docs/generation.md, made from the class."""
    rows = ["| option | default | accepts | what it does |", "| --- | --- | --- | --- |"]
    for name, f in _FIELDS.items():
        spec = f.metadata
        default = "None" if f.default is None else ("()" if f.default == () else repr(f.default))
        accepts = _describe(spec)
        if f.default is None and spec["kind"] not in ("sampler", "response_format"):
            accepts += ", or None"
        rows.append(f"| `{name}` | `{default}` | {accepts} | {spec['doc']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m gptgen.generation.config --markdown
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m gptgen.generation.config --markdown")
    sys.stdout.write(markdown_table())
