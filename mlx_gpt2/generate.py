"""Generation in three layers: generate_step (token ids) -> stream_generate (text responses) -> generate."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Literal

import mlx.core as mx

from .backend import prefill_step
from .cache import KVCache, make_cache
from .errors import UserError
from .model import GPT2, check_ids
from .sampling import LogitsProcessor, Sampler, check_seed, greedy, make_logits_processors, make_sampler
from .tokenizer import Tokenizer

Overflow = Literal["slide", "stop", "error"]
OVERFLOW_CHOICES = ("slide", "stop", "error")


class WindowFull(Exception):
    """Raised inside generate_step when the window is full and on_overflow is "stop"."""


def _prefill(model: GPT2, tokens: mx.array, cache: list[KVCache], step_size: int | None) -> None:
    """Run all `tokens` through the model in chunks of `step_size`, filling the cache; logits are dropped."""
    step_size = prefill_step(step_size)
    for start in range(0, tokens.size, step_size):
        model.hidden(tokens[None, start : start + step_size], cache)
        mx.eval([c.keys for c in cache])


class _Window:
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
        _prefill(self.model, mx.array(recent[:-1]), cache, self.step)
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


def generate_step(
    prompt: list[int],
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
    only the rest is computed.

    The next step's graph is built and queued with `mx.async_eval` before the current token is handed
    out, so Python overhead overlaps with compute. When the window is full, `on_overflow` decides:
    "slide" rebuilds the cache over the most recent tokens, "stop" ends, "error" raises.
    """
    sampler = sampler or greedy
    processors = logits_processors or []
    window = _Window(model, on_overflow, prefill_step_size)
    history = window.fit_prompt(check_ids(prompt, model.config.vocab_size))
    if not history:
        raise ValueError("generate_step needs at least one prompt token")
    own_cache = cache is None
    cache = cache if cache is not None else make_cache(len(model.h), len(history))
    reuse_cache(cache, history)
    _prefill(model, mx.array(history[cache[0].offset : -1]), cache, prefill_step_size)
    if own_cache:  # room for the new tokens only now, after the prefill's activations are gone
        for c in cache:
            c.reserve(min(window.size, len(history) + max_tokens))
    tokens = mx.array(history)

    def step(feed: list[int] | mx.array) -> tuple[mx.array, mx.array]:
        nonlocal cache, tokens
        feed = mx.array(feed) if isinstance(feed, list) else feed
        if cache[0].offset + feed.size > window.size:
            cache, rest = window.rebuild(history)
            feed = mx.array(rest)
        logits = model(feed[None], cache)[:, -1, :].astype(mx.float32)
        for process in processors:
            logits = process(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]

    try:
        y, logprobs = step(history[-1:])
    except WindowFull:
        return
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        token = y.item()
        history.append(token)
        if processors:
            tokens = mx.concatenate([tokens, y])
        following = None
        if n + 1 < max_tokens:
            try:
                following = step(y)
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


class _StopFilter:
    """Holds back text that may be the start of a stop string, so a stop string is never printed."""

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops, self.pending = stops, ""

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


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """Text or ids -> ids; an empty prompt starts from <|endoftext|>, as GPT-2's own samples do."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return ids or [tokenizer.eos_token_id]


def stream_generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    ignore_eos: bool = False,
    on_overflow: Overflow = "slide",
    prefill_step_size: int | None = None,
    cache: list[KVCache] | None = None,
    draft_model: GPT2 | None = None,
    num_draft: int = 3,
) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per new token; the text never splits a UTF-8 character."""
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    sampler = make_sampler(temp, top_k, top_p, min_p)
    processors = make_logits_processors(
        vocab_size=model.config.vocab_size, repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size, logit_bias=logit_bias,
    )
    check_seed(seed)
    if seed is not None:
        mx.random.seed(seed)
    stops = _StopFilter([stop] if isinstance(stop, str) else list(stop or []))
    ids = encode_prompt(tokenizer, prompt)
    # A given cache saves the prefill of what it holds; the prompt's last token is always computed.
    cached = min(cache[0].offset, len(ids) - 1) if cache else 0
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    if draft_model is None:
        steps = generate_step(
            ids, model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
            prefill_step_size=prefill_step_size, on_overflow=on_overflow, cache=cache,
        )
    else:
        from .speculative import speculative_generate_step  # imported here: it imports this module

        steps = speculative_generate_step(
            ids, model, draft_model, num_draft=num_draft, max_tokens=max_tokens, temp=temp, top_k=top_k,
            top_p=top_p, min_p=min_p, logits_processors=processors, prefill_step_size=prefill_step_size,
            on_overflow=on_overflow, cache=cache,
        )
    for n, (token, logprobs, *drafted) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = (len(ids) - cached) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        finish = None
        if token == tokenizer.eos_token_id and not ignore_eos:
            text, finish = stops.flush() + detok.finalize(), "stop"
        else:
            text, hit = stops.feed(detok.add_token(token))
            finish = "stop" if hit else ("length" if n == max_tokens else None)
            if finish == "length":
                text += stops.feed(detok.finalize())[0] + stops.flush()
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(
            text, token, logprobs[token].item(), finish, len(ids), prompt_tps, n, n / elapsed,
            mx.get_peak_memory() / 1e9, bool(drafted and drafted[0]), cached,
        )
        if finish:
            return
    if n < max_tokens:  # generate_step ended early: the window filled with on_overflow="stop"
        yield GenerationResponse(
            stops.flush() + detok.finalize(), -1, 0.0, "window", len(ids), prompt_tps, n,
            n / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, prompt_cached_tokens=cached,
        )


def generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    ignore_eos: bool = False,
    on_overflow: Overflow = "slide",
    verbose: bool = False,
    draft_model: GPT2 | None = None,
    num_draft: int = 3,
) -> str:
    """Generate and return the new text (the prompt is not repeated)."""
    pieces, last = [], None
    for last in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, logit_bias=logit_bias, seed=seed,
        stop=stop, ignore_eos=ignore_eos, on_overflow=on_overflow, draft_model=draft_model, num_draft=num_draft,
    ):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s; "
              f"peak memory {last.peak_memory:.3f} GB")
    return "".join(pieces)
