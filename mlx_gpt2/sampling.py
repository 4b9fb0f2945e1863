"""Sampling as a chain of small filters over log-probabilities, and logits processors over the history.

Each filter maps `[B, vocab]` log-probs to log-probs with the dropped tokens at -inf; `make_sampler`
chains the ones asked for and draws. Every option is checked where it enters, naming its allowed range.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def validate(
    *,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
) -> None:
    """Raise ValueError naming the allowed range of the first option that is out of it."""
    if not temp >= 0:
        raise ValueError(f"temp must be >= 0 (0 is greedy), got {temp}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) (0 turns it off), got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), got {repetition_penalty}")


MAX_SEED = 2**64 - 1  # MLX's seed is an unsigned 64-bit integer


def check_seed(seed: int | None) -> None:
    """Raise ValueError unless `seed` is None or an integer MLX's random state accepts."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {str(seed)[:30]}")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    if k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability adds up to at least p (nucleus).

    The mass is measured over what earlier filters kept (after top-k, over the top k), as transformers'
    TopPLogitsWarper measures it: the input is renormalised first.
    """
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept_sorted = mx.where(before < p, sorted_lp, -mx.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept_sorted, inverse, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(
    temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> Sampler:
    """log-probs `[B, vocab]` -> token ids `[B]`. temp 0 is greedy; the filters run after temperature."""
    validate(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    if temp == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, top_k))
    if top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, top_p))
    if min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, min_p))

    def sample(logprobs: mx.array) -> mx.array:
        scaled = logprobs / temp
        scaled = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        for f in filters:
            scaled = f(scaled)
        return mx.random.categorical(scaled, axis=-1)

    return sample


def make_repetition_penalty(penalty: float, context_size: int | None = None) -> LogitsProcessor:
    """CTRL's penalty, as transformers applies it: divide positive logits of seen tokens, multiply negative."""
    validate(repetition_penalty=penalty)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        seen = tokens if context_size is None else tokens[-context_size:]
        if seen.size == 0:
            return logits
        picked = logits[:, seen]
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        logits[:, seen] = picked
        return logits

    return process


def make_logit_bias(bias: dict[int, float], vocab_size: int) -> LogitsProcessor:
    """Add a fixed bias to chosen token ids (e.g. -inf bans a token)."""
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias token ids must be integers in [0, {vocab_size}), got {str(token)[:30]}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) or value == -math.inf):
            raise ValueError(f"logit_bias values must be finite numbers (or -inf to ban a token), got {str(value)[:30]} for {token}")
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, ids] = logits[:, ids] + values.astype(logits.dtype)
        return logits

    return process


def make_logits_processors(
    *,
    vocab_size: int,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    logit_bias: dict[int, float] | None = None,
) -> list[LogitsProcessor]:
    processors = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias, vocab_size))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors
