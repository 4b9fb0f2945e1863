"""One request's sequences, from the events the model thread emits to OpenAI's response objects.

A `Run` owns the sequences of one request (n or best_of per prompt), receives their events on an asyncio
queue, and turns them into choices: the text, the legacy `logprobs` object (tokens, token_logprobs,
top_logprobs, text_offset), chat's `logprobs.content`, finish reasons and usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator

from ..generation.continuous import PromptScores, Sequence, Token
from ..tokenizer import Tokenizer
from .scheduler import Failure


class ModelFailed(Exception):
    """The model failed on a sequence of this request (answered as a 500, the server goes on)."""


@dataclasses.dataclass
class Choice:
    """What one sequence produced so far."""

    index: int
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = dataclasses.field(default_factory=list)
    prompt: PromptScores | None = None
    finish: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(len(self.logprobs), 1)


class Run:
    """The sequences of one request and their events; `events()` yields (choice index, event) as they come."""

    def __init__(self, sequences_of: list[tuple[int, list[int]]], make: Any, *, per_prompt: int = 1) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.per_prompt = per_prompt
        self.choices = [Choice(index, ids) for index, ids in sequences_of]
        self.sequences: list[Sequence] = [make(i, ids, self._emitter(i)) for i, (_, ids) in enumerate(sequences_of)]
        self.abandoned = False

    def _emitter(self, position: int):
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (position, event))

    async def events(self) -> AsyncIterator[tuple[Choice, object]]:
        """Every event until each sequence has finished; a model failure raises ModelFailed."""
        open_ = len(self.sequences)
        while open_:
            position, event = await self.queue.get()
            if event is None:  # abandoned: the client went away
                return
            choice = self.choices[position]
            if isinstance(event, Failure):
                raise ModelFailed(event.message)
            if isinstance(event, PromptScores):
                choice.prompt = event
            elif isinstance(event, Token):
                self._record(choice, event)
                if event.finish:
                    open_ -= 1
            yield choice, event

    @staticmethod
    def _record(choice: Choice, event: Token) -> None:
        if event.token >= 0:  # -1: a sequence ended without a token (max_tokens 0, a full window)
            choice.tokens.append(event.token)
            choice.logprobs.append(event.logprob)
            choice.tops.append(event.top)
        choice.texts.append(event.text)
        if event.finish:
            choice.finish = openai_finish(event.finish)

    async def finish(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def abandon(self, cancel: Any) -> None:
        """The client went away: `cancel` every sequence (the scheduler frees its slot) and end `events()`."""
        if not self.abandoned:
            self.abandoned = True
            for sequence in self.sequences:
                cancel(sequence)
            self.queue.put_nowait((-1, None))

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens read from the prompt cache, once per prompt (as `prompt_tokens` counts them)."""
        return sum(s.cached_tokens for s in self.sequences[:: self.per_prompt])


def openai_finish(reason: str | None) -> str | None:
    """Our finish reason as OpenAI names it: a full window is "length" there."""
    return "length" if reason == "window" else reason


def legacy_logprobs(tokenizer: Tokenizer, ids: list[int], logprobs: list[float | None],
                    tops: list[list[tuple[int, float]] | None], start: int = 0) -> dict[str, list]:  # fmt: skip
    """OpenAI's legacy logprobs object for `ids`: each token's text, log-prob, top tokens and character offset
    (from `start`, the length of the text before them)."""
    offsets, detokenizer, position = [], tokenizer.detokenizer(), start
    for token in ids:
        offsets.append(position)
        position += len(detokenizer.add_token(token))
    return {
        "tokens": [tokenizer.decode([t]) for t in ids],
        "token_logprobs": list(logprobs),
        "top_logprobs": [None if top is None else {tokenizer.decode([t]): lp for t, lp in top} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, choice: Choice) -> dict[str, list]:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.id_to_bytes(token))}

    content = [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in (top or [])]}
               for t, lp, top in zip(choice.tokens, choice.logprobs, choice.tops)]  # fmt: skip
    return {"content": content}
