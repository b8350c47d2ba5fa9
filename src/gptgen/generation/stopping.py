"""Stopping and text: stop strings, and decoding generated tokens to text that is never broken.

Byte-level tokens can split one UTF-8 character over several tokens; decoding a prefix then ends in
U+FFFD. The TextTracker decodes generated tokens together with a few prompt tokens (so tokenizers that
drop a leading space, like SentencePiece's, still join words correctly), holds back an unfinished
character and any tail that could still grow into a stop string, and cuts the final text before the
first stop string.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
ANCHOR_TOKENS = 4  # prompt tokens decoded in front of the generated ones


class TextTracker:
    """Text of one prompt's generated tokens, for stop strings, streaming and the final output."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.anchor = list(prompt_ids[-ANCHOR_TOKENS:])
        self.stop = list(stop)
        self.skip = skip_special_tokens
        self.include_stop = include_stop  # the text ends after the stop string rather than before it
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        # A model may have more ids than its tokenizer (a padded vocabulary); those decode to nothing, as
        # the tokenizers library always made them, while Tokenizer.decode refuses them.
        self._vocab = getattr(tokenizer, "vocab_size", None)
        self.anchor = self._known(self.anchor)
        self._base = {flag: tokenizer.decode(self.anchor, skip_special_tokens=flag) for flag in (False, True)}

    def _known(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        n = self._vocab
        if n is None or not ids or (min(ids) >= 0 and max(ids) < n):
            return ids
        return [t for t in ids if 0 <= t < n]

    def _text(self, gen: Sequence[int], skip: bool) -> str:
        gen = self._known(gen)
        full = self.tokenizer.decode(self.anchor + gen, skip_special_tokens=skip)
        base = self._base[skip]
        if full.startswith(base):
            return full[len(base):]
        return self.tokenizer.decode(gen, skip_special_tokens=skip)

    def stop_hit(self, gen: Sequence[int]) -> bool:
        """Whether the generated text (special tokens included) contains a stop string."""
        if not self.stop:
            return False
        raw = self._text(gen, False)
        return any(s in raw for s in self.stop)

    def _cut(self, text: str) -> int:
        """Where the text ends at its first stop string (after it with include_stop), or -1."""
        hits = [(i, len(s)) for s, i in ((s, text.find(s)) for s in self.stop) if i >= 0]
        if not hits:
            return -1
        i, n = min(hits)
        return i + n if self.include_stop else i

    def final(self, gen: Sequence[int]) -> str:
        text = self._text(gen, self.skip)
        cut = self._cut(text)
        if cut >= 0:
            return text[:cut]
        return text.rstrip(REPLACEMENT)

    def safe(self, gen: Sequence[int], done: bool) -> str:
        """The longest text that no later token can change: the final text once done."""
        if done:
            return self.final(gen)
        text = self._text(gen, self.skip)
        cut = self._cut(text)
        if cut >= 0:
            return text[:cut]
        text = text.rstrip(REPLACEMENT)
        if self.hold:
            text = text[:max(0, len(text) - self.hold)]
        return text


class StreamEmitter:
    """Turns successive safe texts into pieces whose concatenation is the final text."""

    def __init__(self) -> None:
        self.emitted = ""

    def piece(self, text: str) -> str:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            out = text[len(self.emitted):]
            self.emitted = text
            return out
        return ""
