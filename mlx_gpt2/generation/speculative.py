"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one pass.

Each round the draft proposes up to `num_draft` tokens one by one; the target runs once over the last
accepted token and the proposals, which gives its own choice after every prefix. The longest run of
proposals the target agrees with is kept, plus the target's own next token, so every round yields at least
one token and the output is the target's: greedy output is identical to generation without a draft. Rejected
positions are rolled back with `KVCache.trim`.

With `temp > 0` the standard speculative sampling rule applies (Leviathan et al. 2023; Chen et al. 2023):
a proposal d drawn from the draft's distribution q is kept with probability min(1, p(d) / q(d)), where p
is the target's; at the first rejection the token is drawn from max(0, p - q), renormalised. p and q are
the distributions after temperature and top-k / top-p / min-p, so the output follows exactly the
distribution plain sampling draws from (though not the same random draws for a seed).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import mlx.core as mx

from ..cache import KVCache, make_cache
from ..errors import UserError
from ..model import GPT2, check_ids
from .core import Overflow, Window, WindowFull, prefill, reuse_cache
from .sampling import Distribution, LogitsProcessor, SamplingOptions, make_distribution, make_logits_processors


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft model for speculative decoding: `model` proposes up to `num_draft` tokens a round."""

    model: GPT2
    num_draft: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.num_draft, int) or isinstance(self.num_draft, bool) or self.num_draft < 1:
            raise ValueError(f"num_draft must be an integer >= 1, got {self.num_draft!r}")


def check_draft(model: GPT2, draft: Draft) -> None:
    """Refuse a draft that cannot stand in for the target (another vocabulary, a shorter window)."""
    config = draft.model.config
    if config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"the draft model's vocabulary ({config.vocab_size}) differs from the target's "
            f"({model.config.vocab_size}); the draft must use the same tokenizer"
        )
    if config.n_positions < model.config.n_positions:
        raise UserError(
            f"the draft model's window ({config.n_positions}) is shorter than the target's "
            f"({model.config.n_positions}); use a draft with at least the target's window"
        )


class _Distribution:
    """The sampling distribution both models' proposals are judged by (`make_distribution`'s)."""

    def __init__(self, options: SamplingOptions) -> None:
        self.greedy = options.greedy
        self.distribution: Distribution = make_distribution(options)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.distribution(logprobs)


def _normalised(logits: mx.array, processors: list[LogitsProcessor], history: mx.array) -> mx.array:
    """`[1, vocab]` logits -> processed log-probs, exactly as generate_step computes them."""
    logits = logits.astype(mx.float32)
    for process in processors:
        logits = process(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class _Speculator:
    """The target's and the draft's caches, and the steps of one round: propose, verify, accept, roll back."""

    def __init__(
        self, model: GPT2, draft_model: GPT2, dist: _Distribution, processors: list[LogitsProcessor],
        cache: list[KVCache], capacity: int, step_size: int | None,
    ) -> None:
        self.model, self.draft, self.dist, self.processors = model, draft_model, dist, processors
        self.cache, self.draft_cache, self.step_size = cache, make_cache(len(draft_model.h), capacity), step_size

    def start(self, context: list[int]) -> None:
        """Fill both caches with all of `context` but its last token (a given target cache may hold more)."""
        reuse_cache(self.cache, context)
        prefill(self.model, mx.array(context[self.cache[0].offset : -1]), self.cache, self.step_size)
        prefill(self.draft, mx.array(context[:-1]), self.draft_cache, self.step_size)

    def propose(self, history: list[int], context: list[int], k: int) -> tuple[mx.array, mx.array | None]:
        """k draft tokens `[k]` and, when sampling, the draft distributions they were drawn from `[k, vocab]`."""
        feed = mx.array(context[self.draft_cache[0].offset :])  # what the draft has not seen yet
        seen = mx.array(history)
        tokens, dists = [], []
        for _ in range(k):  # all lazy: the round is evaluated once, after the target's pass
            hidden = self.draft.hidden(feed[None], self.draft_cache)[:, -1, :]  # the head only where it is read
            logprobs = _normalised(self.draft.head(hidden), self.processors, seen)
            q = None if self.dist.greedy else self.dist(logprobs)
            feed = mx.argmax(logprobs, axis=-1) if q is None else mx.random.categorical(q, axis=-1)  # [1]
            tokens.append(feed)
            if q is not None:
                dists.append(q)
            if self.processors:
                seen = mx.concatenate([seen, feed])
        drafts = mx.concatenate(tokens) if tokens else mx.array([], dtype=mx.uint32)
        return drafts, (mx.concatenate(dists) if dists else None)

    def verify(self, history: list[int], drafts: mx.array) -> mx.array:
        """The target's processed log-probs after the last token and after each draft, `[k + 1, vocab]`."""
        feed = mx.concatenate([mx.array(history[-1:], dtype=drafts.dtype), drafts])  # [k + 1]
        logits = self.model(feed[None], self.cache)[0].astype(mx.float32)  # [k + 1, vocab]
        if not self.processors:
            return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        seen = mx.concatenate([mx.array(history, dtype=drafts.dtype), drafts])
        n = len(history)
        return mx.concatenate(
            [_normalised(logits[j : j + 1], self.processors, seen[: n + j]) for j in range(feed.size)]
        )

    def accept(self, drafts: mx.array, p: mx.array, q: mx.array | None) -> tuple[list[int], int]:
        """The tokens this round yields (accepted drafts, then the target's own token) and how many drafts."""
        k = drafts.size
        if q is None:  # greedy: keep drafts while they equal the target's argmax
            choice = mx.argmax(p, axis=-1)
            mx.eval(drafts, choice)
            wanted, proposed = choice.tolist(), drafts.tolist()
            n = next((j for j in range(k) if proposed[j] != wanted[j]), k)
            return proposed[:n] + [wanted[n]], n
        target = self.dist(p)  # [k + 1, vocab] log-probs the target samples from
        picked = drafts[:, None]
        ratio = mx.exp(mx.take_along_axis(target[:k], picked, 1) - mx.take_along_axis(q, picked, 1))[:, 0]
        kept = mx.random.uniform(shape=(k,)) < ratio  # [k]: accept d with probability min(1, p(d) / q(d))
        mx.eval(drafts, kept)
        proposed, kept = drafts.tolist(), kept.tolist()
        n = next((j for j in range(k) if not kept[j]), k)
        if n < k:  # resample from the part of p that q under-covers, max(0, p - q), renormalised
            residual = mx.maximum(mx.exp(target[n]) - mx.exp(q[n]), 0.0)
            last = mx.where(residual.sum() > 0, mx.log(residual), target[n])
        else:
            last = target[k]
        return proposed[:n] + [mx.random.categorical(last).item()], n

    def roll_back(self, context_length: int) -> None:
        """Forget every cached position past the context minus its last token (rejected drafts)."""
        for c in self.cache + self.draft_cache:
            c.trim(c.offset - min(c.offset, context_length - 1))

    def slide(self, history: list[int], window: Window) -> int:
        """Rebuild both caches over the most recent tokens, as generate_step does; return the new start."""
        self.cache, _ = window.rebuild(history)  # raises WindowFull / UserError as on_overflow says
        recent = history[-window.keep :]
        self.draft_cache = make_cache(len(self.draft.h), window.size)
        prefill(self.draft, mx.array(recent[:-1]), self.draft_cache, self.step_size)
        return len(history) - len(recent)


def speculative_generate_step(
    prompt: Sequence[int],
    model: GPT2,
    draft: Draft,
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    prefill_step_size: int | None = None,
    on_overflow: Overflow = "slide",
    cache: list[KVCache] | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token id, target log-probs `[vocab]`, whether the draft proposed it) for up to `max_tokens`.

    The tokens are the target's: with temp 0 exactly generate_step's; with temp > 0 drawn from the same
    distribution by the speculative sampling rule. `cache` is the target's (e.g. a loaded prompt cache).
    """
    check_draft(model, draft)
    num_draft = draft.num_draft
    window = Window(model, on_overflow, prefill_step_size)
    history = window.fit_prompt(check_ids(prompt, model.config.vocab_size))
    if not history:
        raise ValueError("speculative_generate_step needs at least one prompt token")
    capacity = min(window.size, len(history) + max_tokens + num_draft)
    cache = cache if cache is not None else make_cache(len(model.h), capacity)
    processors = make_logits_processors(sampling, model.config.vocab_size)
    spec = _Speculator(model, draft.model, _Distribution(sampling), processors, cache, capacity, prefill_step_size)
    spec.start(history)
    start, emitted = 0, 0  # history[start:] is what the caches hold; it moves when the window slides
    while emitted < max_tokens:
        # k + 1 tokens per round at most, and the verify pass must stay inside the window.
        k = min(num_draft, max_tokens - emitted - 1, window.size - (len(history) - start))
        if k < 0:
            try:
                start = spec.slide(history, window)
            except WindowFull:
                return
            k = min(num_draft, max_tokens - emitted - 1, window.size - (len(history) - start))
        drafts, q = spec.propose(history, history[start:], k)
        p = spec.verify(history, drafts)
        tokens, n = spec.accept(drafts, p, q)
        history.extend(tokens)
        spec.roll_back(len(history) - start)
        for j, token in enumerate(tokens):
            emitted += 1
            yield token, p[j], j < n
