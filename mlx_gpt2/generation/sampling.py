"""Sampling: one frozen `SamplingOptions`, turned once into the callables every generator takes.

`make_distribution(options)` is the chain of small filters over log-probabilities -- temperature, then
top-k, top-p and min-p, each over what the previous one kept, exactly as transformers' warpers apply them
-- and `make_sampler` draws from it (or takes the argmax when `temp` is 0). `make_logits_processors` turns
the options that look at the history (the repetition penalty) or at fixed ids (logit bias) into logits
processors. Speculative decoding builds its distributions from the same `make_distribution`.

To add a sampler option: a field here (validated in `__post_init__`, with its allowed range in the
message), a filter function below, one line in `make_distribution`, and a CLI flag in `cli/generate.py`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Mapping

import mlx.core as mx

from ..errors import UserError

Sampler = Callable[[mx.array], mx.array]  # log-probs [B, vocab] -> token ids [B]
Distribution = Callable[[mx.array], mx.array]  # log-probs [N, vocab] -> the log-probs a sampler draws from
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (history ids, logits [B, vocab]) -> logits
MAX_SEED = 2**64 - 1  # MLX's seed is an unsigned 64-bit integer


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. The defaults are greedy decoding with nothing changed.

    temp: 0 is greedy; top_k: keep the k most likely (0: off); top_p: the nucleus mass (1: off); min_p:
    drop tokens below min_p x the top probability (0: off); repetition_penalty: CTRL's, as transformers
    applies it (1 or None: off), over the last `repetition_context_size` tokens (None: all); logit_bias:
    {token id: bias} added to the logits (-inf bans a token); seed: the random state, for reproducible
    samples; presence_penalty / frequency_penalty: OpenAI's, subtracted from the logit of every token the
    text so far (the prompt included) holds, once / once per occurrence. Every value is checked here,
    once, with the allowed range in the message.
    """

    temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Any = None  # a generation.constrained.Constraint: the grammar the output must follow

    def __post_init__(self) -> None:
        checks = [
            (_number(self.temp) and self.temp >= 0 and math.isfinite(self.temp), f"temp must be >= 0 (0 is greedy), got {self.temp!r}"),
            (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}"),
            (_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}"),
            (_number(self.min_p) and 0 <= self.min_p < 1, f"min_p must be in [0, 1) (0 turns it off), got {self.min_p!r}"),
            (self.repetition_penalty is None or (_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf),
             f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty!r}"),
            (self.repetition_context_size is None or (isinstance(self.repetition_context_size, int) and self.repetition_context_size >= 1),
             f"repetition_context_size must be an integer >= 1 (None: the whole context), got {self.repetition_context_size!r}"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED),
             f"seed must be an integer in [0, 2**64 - 1], got {str(self.seed)[:30]}"),
            (_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2] (0 turns it off), got {self.presence_penalty!r}"),
            (_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2] (0 turns it off), got {self.frequency_penalty!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", types.MappingProxyType(_checked_bias(self.logit_bias)))

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def seed_random(self) -> None:
        """Set MLX's random state from `seed` (nothing when it is None)."""
        if self.seed is not None:
            mx.random.seed(self.seed)


def _checked_bias(bias: Mapping[int, float]) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise UserError(f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise UserError(f"logit_bias token ids must be integers >= 0, got {str(token)[:30]}")
        if not _number(value) or not (math.isfinite(value) or value == -math.inf):
            raise UserError(f"logit_bias values must be finite numbers (or -inf to ban a token), got {str(value)[:30]} for {token}")
    return dict(bias)


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


def make_distribution(options: SamplingOptions) -> Distribution:
    """log-probs -> the normalised log-probs sampling draws from: temperature, then each filter in turn."""
    filters: list[Callable[[mx.array], mx.array]] = []
    if options.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, options.top_k))
    if options.top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, options.top_p))
    if options.min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, options.min_p))
    temp = options.temp or 1.0  # greedy decoding ranks by the same distribution at temperature 1

    def distribution(logprobs: mx.array) -> mx.array:
        scaled = logprobs / temp
        for f in filters:
            scaled = f(scaled)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    return distribution


def make_sampler(options: SamplingOptions) -> Sampler:
    """log-probs `[B, vocab]` -> token ids `[B]`: the argmax when `temp` is 0, else a draw from the distribution."""
    if options.greedy:
        return greedy
    distribution = make_distribution(options)
    return lambda logprobs: mx.random.categorical(distribution(logprobs), axis=-1)


def make_repetition_penalty(penalty: float, context_size: int | None = None) -> LogitsProcessor:
    """CTRL's penalty, as transformers applies it: divide positive logits of seen tokens, multiply negative."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        seen = tokens if context_size is None else tokens[-context_size:]
        if seen.size == 0:
            return logits
        picked = logits[:, seen]
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        logits[:, seen] = picked
        return logits

    return process


def make_logit_bias(bias: Mapping[int, float], vocab_size: int) -> LogitsProcessor:
    """Add a fixed bias to chosen token ids (e.g. -inf bans a token); ids must have an embedding."""
    bias = _checked_bias(bias)
    outside = [token for token in bias if token >= vocab_size]
    if outside:
        raise UserError(f"logit_bias token ids must be integers in [0, {vocab_size}), got {outside[0]}")
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, ids] = logits[:, ids] + values.astype(logits.dtype)
        return logits

    return process


def make_presence_frequency_penalty(presence: float, frequency: float) -> LogitsProcessor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counted over the text so far."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[tokens].add(1.0)  # [vocab]
        return logits - frequency * counts - presence * (counts > 0).astype(logits.dtype)

    return process


def make_logits_processors(options: SamplingOptions, vocab_size: int) -> list[LogitsProcessor]:
    """The processors `options` asks for, in the order transformers applies them: bias, then penalties."""
    processors = []
    if options.logit_bias:
        processors.append(make_logit_bias(options.logit_bias, vocab_size))
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(options.repetition_penalty, options.repetition_context_size))
    if options.presence_penalty or options.frequency_penalty:
        processors.append(make_presence_frequency_penalty(options.presence_penalty, options.frequency_penalty))
    if options.constraint is not None:  # last: it masks what the others have scored
        processors.append(options.constraint.processor())
    return processors
