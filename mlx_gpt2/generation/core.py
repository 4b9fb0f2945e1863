"""The engine every generator stands on: prefill, the position window, cache reuse, and the text stream.

- `prefill` runs prompt tokens through the model in chunks, filling a KV cache.
- `Window` keeps decoding inside GPT-2's learned position table: past it, the cache is rebuilt over the
  most recent tokens ("slide"), or generation stops or raises, as `on_overflow` says.
- `reuse_cache` fits a given cache (a prompt cache) to the context it continues.
- `TextStream` turns one sequence's token ids into text: never half a UTF-8 character, never a stop
  string, and it knows when the sequence is done (end of text, a stop string, `max_tokens`).

Single-prompt, batched, beam and speculative generation, and the server's continuous batching, all use
these; none of them reaches into another's parts.
"""

from __future__ import annotations

from typing import Literal, Sequence

import mlx.core as mx

from ..backend import prefill_step
from ..cache import KVCache, make_cache
from ..errors import UserError
from ..model import GPT2
from ..tokenizer import Tokenizer

Overflow = Literal["slide", "stop", "error"]
OVERFLOW_CHOICES = ("slide", "stop", "error")


class WindowFull(Exception):
    """Raised by `Window.rebuild` when the window is full and on_overflow is "stop"."""


def prefill(model: GPT2, tokens: mx.array, cache: list[KVCache], step_size: int | None) -> None:
    """Run all `tokens` through the model in chunks of `step_size`, filling the cache; logits are dropped."""
    step_size = prefill_step(step_size)
    for start in range(0, tokens.size, step_size):
        model.hidden(tokens[None, start : start + step_size], cache)
        mx.eval([c.keys for c in cache])


class Window:
    """Keeps decoding inside the position table: past it, rebuild the cache over the most recent tokens."""

    def __init__(self, model: GPT2, on_overflow: Overflow, prefill_step_size: int | None) -> None:
        if on_overflow not in OVERFLOW_CHOICES:
            raise ValueError(f"on_overflow must be one of {', '.join(OVERFLOW_CHOICES)}, got {on_overflow!r}")
        self.model, self.on_overflow, self.step = model, on_overflow, prefill_step_size
        self.size = model.config.n_positions
        # Sliding keeps 3/4 of the window, so a rebuild (one prefill) happens every size/4 tokens, not every token.
        self.keep = max(1, 3 * self.size // 4)

    def fit_prompt(self, prompt: list[int]) -> list[int]:
        if len(prompt) <= self.size:
            return prompt
        if self.on_overflow != "slide":
            raise UserError(
                f"the prompt is {len(prompt)} tokens, longer than the model's window of {self.size}; "
                f"shorten it or use on_overflow='slide' (--on-overflow slide)"
            )
        return prompt[-self.keep :]

    def rebuild(self, history: list[int]) -> tuple[list[KVCache], list[int]]:
        """A fresh cache over the most recent tokens; returns it and the token still to be fed."""
        if self.on_overflow == "error":
            raise UserError(
                f"generation reached the model's window of {self.size} tokens; lower max_tokens "
                f"or use on_overflow='slide' to continue over the most recent tokens"
            )
        if self.on_overflow == "stop":
            raise WindowFull
        recent = history[-self.keep :]
        cache = make_cache(len(self.model.h), self.size)
        prefill(self.model, mx.array(recent[:-1]), cache, self.step)
        return cache, recent[-1:]


def reuse_cache(cache: list[KVCache], context: list[int]) -> None:
    """Make a given cache hold a prefix of `context` minus its last token, whose logits start generation.

    A cache holding all of `context` forgets its last position (so its logits are recomputed); one holding
    more positions than `context` has tokens was filled from another text, and is refused.
    """
    if cache[0].offset > len(context):
        raise ValueError(
            f"the cache holds {cache[0].offset} positions but the prompt has {len(context)} tokens; pass the full "
            "context (the cached tokens followed by the new ones) as the prompt"
        )
    if cache[0].offset == len(context):
        for c in cache:
            c.trim(1)


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Text or ids -> ids; an empty prompt starts from <|endoftext|>, as GPT-2's own samples do."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return ids or [tokenizer.eos_token_id]


def check_max_tokens(max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")


class StopFilter:
    """Holds back text that may be the start of a stop string, so a stop string is never printed."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops, self.pending = list(stops), ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as a list: one string, several, or none."""
    return [stop] if isinstance(stop, str) else list(stop or [])


class TextStream:
    """One sequence's text, token by token: whole UTF-8 characters only, stop strings never shown.

    `add(token)` returns the text the token completes (often "", mid-character or while a stop string may
    be starting) and sets `finish` when the sequence is done: "stop" (end of text or a stop string) or
    "length" (`max_tokens` tokens). `end(reason)` flushes what is held back, for a sequence ended otherwise
    (the window filled: "window"). Everything returned, in order, is the sequence's text.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> None:  # fmt: skip
        self.detokenizer, self.stops = tokenizer.detokenizer(), StopFilter(stop_list(stop))
        self.eos = None if ignore_eos else tokenizer.eos_token_id
        self.max_tokens, self.tokens = max_tokens, 0
        self.finish: str | None = None

    def add(self, token: int) -> str:
        self.tokens += 1
        if token == self.eos:
            self.finish = "stop"
            return self.stops.flush() + self.detokenizer.finalize()
        text, hit = self.stops.feed(self.detokenizer.add_token(token))
        self.finish = "stop" if hit else ("length" if self.tokens == self.max_tokens else None)
        if self.finish == "length":
            text += self.stops.feed(self.detokenizer.finalize())[0] + self.stops.flush()
        return text

    def end(self, reason: str) -> str:
        self.finish = reason
        return self.stops.flush() + self.detokenizer.finalize()
