"""Generation in three layers: generate_step (token ids) -> stream_generate (text responses) -> generate."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import mlx.core as mx

from ..cache import KVCache, make_cache
from ..errors import UserError
from ..model import GPT2, check_ids
from ..numerics import log_softmax
from ..tokenizer import Tokenizer
from .constrained import KINDS, Constraint
from .core import (
    Overflow,
    TextStream,
    Window,
    WindowFull,
    check_max_tokens,
    encode_prompt,
    prefill,
    reuse_cache,
)
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingOptions,
    greedy,
    make_logits_processors,
    make_sampler,
)
from .speculative import Draft, speculative_generate_step


class _Decoder:
    """One sequence's decoding state: its cache, its history, and the step that extends both by a token."""

    def __init__(self, model: GPT2, window: Window, history: list[int], cache: list[KVCache],
                 sampler: Sampler, processors: list[LogitsProcessor]) -> None:  # fmt: skip
        self.model, self.window, self.history, self.cache = model, window, history, cache
        self.sampler, self.processors = sampler, processors
        self.tokens = mx.array(history)  # the history the logits processors see

    def step(self, feed: list[int] | mx.array) -> tuple[mx.array, mx.array]:
        """Feed tokens; return (the next token `[1]`, log-probs `[vocab]`), both lazy. Raises WindowFull."""
        feed = mx.array(feed) if isinstance(feed, list) else feed
        if self.cache[0].offset + feed.size > self.window.size:
            self.cache, rest = self.window.rebuild(self.history)
            feed = mx.array(rest)
        logits = self.model(feed[None], self.cache)[:, -1, :].astype(mx.float32)
        for process in self.processors:
            logits = process(self.tokens, logits)
        logprobs = log_softmax(logits)  # reported in each response: the accurate sum
        return self.sampler(logprobs), logprobs[0]

    def accept(self, y: mx.array) -> int:
        token = y.item()
        self.history.append(token)
        if self.processors:
            self.tokens = mx.concatenate([self.tokens, y])
        return token


def generate_step(
    prompt: Sequence[int],
    model: GPT2,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prefill_step_size: int | None = None,
    on_overflow: Overflow = "slide",
    cache: list[KVCache] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token id, log-probs over the vocabulary) for up to `max_tokens` new tokens.

    `prompt` is the whole context, as token ids. A given `cache` (a prompt cache) holds the first of them;
    only the rest is computed. `sampler` and `logits_processors` come from `make_sampler(options)` and
    `make_logits_processors(options, vocab_size)` (default: greedy, none).

    The next step's graph is built and queued with `mx.async_eval` before the current token is handed
    out, so Python overhead overlaps with compute. When the window is full, `on_overflow` decides:
    "slide" rebuilds the cache over the most recent tokens, "stop" ends, "error" raises.
    """
    window = Window(model, on_overflow, prefill_step_size)
    history = window.fit_prompt(check_ids(prompt, model.config.vocab_size))
    if not history:
        raise ValueError("generate_step needs at least one prompt token")
    own_cache = cache is None
    cache = cache if cache is not None else make_cache(len(model.h), len(history))
    reuse_cache(cache, history)
    prefill(model, mx.array(history[cache[0].offset : -1]), cache, prefill_step_size)
    if own_cache:  # room for the new tokens only now, after the prefill's activations are gone
        for c in cache:
            c.reserve(min(window.size, len(history) + max_tokens))
    decoder = _Decoder(model, window, history, cache, sampler or greedy, list(logits_processors or []))
    try:
        y, logprobs = decoder.step(history[-1:])
    except WindowFull:
        return
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        token = decoder.accept(y)
        following = None
        if n + 1 < max_tokens:
            try:
                following = decoder.step(y)
                mx.async_eval(*following)
            except WindowFull:
                pass
        yield token, logprobs
        if following is None:
            return
        y, logprobs = following


@dataclasses.dataclass
class GenerationResponse:
    """One step of streamed generation.

    `text` is the new text this step adds (possibly empty while a UTF-8 character or a possible stop
    string is incomplete). `finish_reason` is None until the last response: "length" (max_tokens),
    "stop" (end of text or a stop string) or "window" (the window filled with on_overflow="stop").
    """

    text: str
    token: int
    logprob: float
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, as mx.get_peak_memory reports it
    from_draft: bool = False  # speculative decoding: the draft model proposed this token
    prompt_cached_tokens: int = 0  # prompt tokens taken from a given cache; prompt_tps counts only the others


def with_constraint(sampling: SamplingOptions, tokenizer: Tokenizer, given: dict[str, Any]) -> SamplingOptions:
    """`sampling` with the constraint of `json_schema=` / `regex=` / `grammar=` (if any) compiled into it."""
    unknown = sorted(set(given) - set(KINDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    constraint = Constraint.of(tokenizer, **given)
    if constraint is None:
        return sampling
    if sampling.constraint is not None:
        raise UserError("give one constraint at a time: sampling already holds one")
    return dataclasses.replace(sampling, constraint=constraint)


def _steps(model: GPT2, ids: list[int], max_tokens: int, sampling: SamplingOptions, on_overflow: Overflow,
           cache: list[KVCache] | None, draft: Draft | None) -> Iterator[tuple[int, mx.array, bool]]:  # fmt: skip
    """(token, log-probs, drafted) from the plain or the speculative generator, as `draft` says."""
    if draft is not None:
        yield from speculative_generate_step(ids, model, draft, max_tokens=max_tokens, sampling=sampling,
                                             on_overflow=on_overflow, cache=cache)  # fmt: skip
        return
    processors = make_logits_processors(sampling, model.config.vocab_size)
    steps = generate_step(ids, model, max_tokens=max_tokens, sampler=make_sampler(sampling),
                          logits_processors=processors, on_overflow=on_overflow, cache=cache)  # fmt: skip
    for token, logprobs in steps:
        yield token, logprobs, False


def stream_generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    on_overflow: Overflow = "slide",
    cache: list[KVCache] | None = None,
    draft: Draft | None = None,
    **constraint: Any,
) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per new token; the text never splits a UTF-8 character.

    `cache` continues a prompt cache (the prompt is then the whole context); `draft=Draft(small_model)`
    decodes speculatively: the same tokens (greedy) or the same distribution (sampling), faster.
    `json_schema=` (a dict or a JSON string), `regex=` or `grammar=` (Lark) constrain the output to
    follow it (one at a time; see generation/constrained.py); so does a `sampling.constraint`.
    """
    check_max_tokens(max_tokens)
    sampling = with_constraint(sampling, tokenizer, constraint)
    sampling.seed_random()
    stream = TextStream(tokenizer, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
    ids = encode_prompt(tokenizer, prompt)
    # A given cache saves the prefill of what it holds; the prompt's last token is always computed.
    cached = min(cache[0].offset, len(ids) - 1) if cache else 0
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    for n, (token, logprobs, drafted) in enumerate(_steps(model, ids, max_tokens, sampling, on_overflow, cache, draft), 1):
        if n == 1:
            prompt_tps = (len(ids) - cached) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        text = stream.add(token)
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(text, token, logprobs[token].item(), stream.finish, len(ids), prompt_tps, n,
                                 n / elapsed, mx.get_peak_memory() / 1e9, drafted, cached)  # fmt: skip
        if stream.finish:
            return
    if n < max_tokens:  # the generator ended early: the window filled with on_overflow="stop"
        yield GenerationResponse(stream.end("window"), -1, 0.0, "window", len(ids), prompt_tps, n,
                                 n / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9,
                                 prompt_cached_tokens=cached)  # fmt: skip


def generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    on_overflow: Overflow = "slide",
    draft: Draft | None = None,
    verbose: bool = False,
    **constraint: Any,
) -> str:
    """Generate and return the new text (the prompt is not repeated); `verbose` prints it as it comes.

    `json_schema=`, `regex=` or `grammar=` constrain the output, as in `stream_generate`.
    """
    pieces, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                ignore_eos=ignore_eos, on_overflow=on_overflow, draft=draft, **constraint):  # fmt: skip
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s; "
              f"peak memory {last.peak_memory:.3f} GB")
    return "".join(pieces)
