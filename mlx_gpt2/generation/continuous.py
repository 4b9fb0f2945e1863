"""Continuous batching: sequences join one shared decoding batch as they arrive and leave as they finish.

`ContinuousBatch` holds the sequences being decoded. `add(sequence)` prefills a new one alone (reusing the
longest cached prefix of an earlier prompt, see `PrefixCache`) and samples its first token; `step()` then
feeds every sequence's last token through the model at once and samples each one's next token with its own
options, stop strings, limits and random key. Every row keeps its own length in a shared KV cache
(`BatchKV`); an additive mask hides what a row has not written and each row reads its own positions, so a
sequence decodes exactly as it would alone (greedy output is token for token the same).

Nothing here knows about HTTP: the server's scheduler thread drives a `ContinuousBatch`, and each
`Sequence` reports what it generates through its `emit` callback.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
from typing import Callable
from typing import Sequence as Seq

import mlx.core as mx

from ..cache import KVCache, make_cache
from ..model import GPT2
from ..numerics import log_softmax
from ..tokenizer import Tokenizer
from .core import TextStream, prefill
from .sampling import SamplingOptions, make_distribution, make_logits_processors


@dataclasses.dataclass
class Token:
    """One generated token, as a `Sequence` reports it."""

    token: int
    text: str  # the text it completes (often "" while a UTF-8 character or a stop string is incomplete)
    logprob: float
    top: list[tuple[int, float]] | None  # the most likely tokens and their log-probs, when asked for
    finish: str | None  # "stop", "length", or None while the sequence goes on


@dataclasses.dataclass
class PromptScores:
    """The log-probability of every prompt token after the first, and the most likely tokens there."""

    logprobs: list[float | None]  # None for the first token, which nothing predicts
    top: list[list[tuple[int, float]] | None]


Emit = Callable[[object], None]  # receives PromptScores (first, when asked for) and Token events


class Sequence:
    """One completion: its prompt, its options, its text stream and where it stands."""

    def __init__(self, ids: Seq[int], tokenizer: Tokenizer, *, max_tokens: int, sampling: SamplingOptions,
                 stop: Seq[str] = (), top_logprobs: int = 0, prompt_logprobs: bool = False, emit: Emit) -> None:  # fmt: skip
        self.ids, self.max_tokens, self.sampling = list(ids), max_tokens, sampling
        self.top_logprobs, self.prompt_logprobs, self.emit = top_logprobs, prompt_logprobs, emit
        self.stream = TextStream(tokenizer, max_tokens=max(max_tokens, 1), stop=stop)
        self.history = list(ids)  # prompt + generated: what the repetition penalty sees
        self.distribution = None if sampling.greedy else make_distribution(sampling)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self.key = mx.random.key(seed)  # each sequence draws from its own key: its samples do not depend on its neighbours
        self.cached_tokens = 0
        self.generated = 0
        self.logprob_sum = 0.0
        self.cancelled = False
        self.finish: str | None = None

    def process(self, logits: mx.array, processors: list) -> mx.array:
        """logits `[1, vocab]` through this sequence's logits processors (penalties, bias), lazily."""
        for process in processors:
            logits = process(mx.array(self.history), logits)
        return logits

    def draw(self, logprobs: mx.array) -> mx.array:
        """log-probs `[1, vocab]` -> the next token `[1]`, lazily: the argmax, or a draw from its own key."""
        if self.distribution is None:
            return mx.argmax(logprobs, axis=-1)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(self.distribution(logprobs), axis=-1, key=key)

    def accept(self, token: int, logprob: float, logprobs: mx.array | None) -> None:
        """Take the chosen token (`logprobs`, `[vocab]`, only for the top tokens): report it, note if done."""
        self.history.append(token)
        self.generated += 1
        self.logprob_sum += logprob
        text = self.stream.add(token)
        self.finish = self.stream.finish
        top = top_tokens(logprobs, self.top_logprobs) if logprobs is not None else None
        self.emit(Token(token, text, logprob, top, self.finish))

    def end(self, reason: str) -> None:
        """End a sequence that cannot go on (the window is full): report what was held back."""
        self.finish = reason
        self.emit(Token(-1, self.stream.end(reason), 0.0, None, reason))


def top_tokens(logprobs: mx.array, k: int) -> list[tuple[int, float]] | None:
    """The k most likely tokens of `[vocab]` log-probs, most likely first; None for k = 0."""
    if k <= 0:
        return None
    index = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[index]
    order = mx.argsort(-values)
    return list(zip(index[order].tolist(), values[order].tolist()))


def score_prompt(logits: mx.array, ids: list[int], top: int) -> PromptScores:
    """Logits `[L, vocab]` of a whole prompt -> each token's log-prob given the ones before it."""
    if len(ids) < 2:  # one token: nothing in the prompt is predicted
        return PromptScores([None] * len(ids), [None] * len(ids))
    logprobs = log_softmax(logits[:-1])  # [L - 1, vocab]
    picked = mx.take_along_axis(logprobs, mx.array(ids[1:], dtype=mx.int32)[:, None], axis=-1)[:, 0]  # [L - 1]
    if not top:
        return PromptScores([None, *picked.tolist()], [None] * len(ids))
    index = mx.argpartition(-logprobs, top - 1, axis=-1)[:, :top]  # [L - 1, top]: every position at once
    values = mx.take_along_axis(logprobs, index, axis=-1)
    order = mx.argsort(-values, axis=-1)
    index, values = mx.take_along_axis(index, order, axis=-1).tolist(), mx.take_along_axis(values, order, axis=-1).tolist()
    tops = [list(zip(i, v)) for i, v in zip(index, values)]
    return PromptScores([None, *picked.tolist()], [None, *tops])


class PrefixCache:
    """The KV caches of recent prompts, so a prompt sharing a prefix with one of them (the same system
    text, the same few-shot examples) skips that part of its prefill. Least recently used first out, within
    `max_bytes`."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], list[tuple[mx.array, mx.array]]] = collections.OrderedDict()

    def lookup(self, ids: list[int]) -> tuple[int, list[tuple[mx.array, mx.array]] | None]:
        """(positions reusable, their keys and values per layer) for the longest cached prefix of `ids`.

        At most `len(ids) - 1` positions: the last prompt token is always computed, for its logits.
        """
        best, found = 0, None
        for key, kv in self.entries.items():
            n = _common_prefix(key, ids, len(ids) - 1)
            if n > best:
                best, found = n, key
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[found]]

    def store(self, ids: list[int], cache: list[KVCache]) -> None:
        kv = [c.state for c in cache]
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.max_bytes:
            return
        self.entries[tuple(ids)] = kv
        self.entries.move_to_end(tuple(ids))
        while sum(sum(k.nbytes + v.nbytes for k, v in e) for e in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n == limit:
            break
        n += 1
    return n


class BatchKV:
    """One layer's keys and values for a batch of sequences, `[B, n_head, capacity, head_dim]`, with each
    row's own length. A decode step writes every row's new position at once (`put_along_axis`)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.lengths: list[int] = []

    @property
    def offset(self) -> int:
        return max(self.lengths, default=0)

    @property
    def aligned(self) -> bool:
        return len(set(self.lengths)) <= 1

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append one position `[B, H, 1, hd]` to every row; return the keys and values up to the longest row."""
        self._reserve(self.offset + 1)
        if self.aligned:  # every row at one length (one sequence, or rows that joined together): a slice write
            n = self.lengths[0]
            self.keys[:, :, n : n + 1] = keys.astype(self.keys.dtype)
            self.values[:, :, n : n + 1] = values.astype(self.values.dtype)
        else:
            where = mx.array(self.lengths)[:, None, None, None]  # [B, 1, 1, 1]: each row's next position
            self.keys = mx.put_along_axis(self.keys, where, keys.astype(self.keys.dtype), axis=2)
            self.values = mx.put_along_axis(self.values, where, values.astype(self.values.dtype), axis=2)
        self.lengths = [n + 1 for n in self.lengths]
        n = self.offset
        return self.keys[:, :, :n], self.values[:, :, :n]

    def _reserve(self, length: int) -> None:
        if self.keys is not None and self.keys.shape[2] >= length:
            return
        size = -(-length // self.step) * self.step
        grow = lambda a: mx.pad(a, [(0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)])
        self.keys, self.values = grow(self.keys), grow(self.values)

    def add_row(self, keys: mx.array, values: mx.array) -> None:
        """Join a prefilled sequence: its `[1, H, L, hd]` keys and values become the batch's last row."""
        length = keys.shape[2]
        if self.keys is None:
            size = -(-length // self.step) * self.step
            pad = [(0, 0), (0, 0), (0, size - length), (0, 0)]
            self.keys, self.values, self.lengths = mx.pad(keys, pad), mx.pad(values, pad), [length]
            return
        self._reserve(length)
        pad = [(0, 0), (0, 0), (0, self.keys.shape[2] - length), (0, 0)]
        self.keys = mx.concatenate([self.keys, mx.pad(keys, pad).astype(self.keys.dtype)])
        self.values = mx.concatenate([self.values, mx.pad(values, pad).astype(self.values.dtype)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (finished sequences leave)."""
        if not rows:
            self.keys = self.values = None
            self.lengths = []
            return
        index = mx.array(rows)
        self.keys, self.values = self.keys[index], self.values[index]
        self.lengths = [self.lengths[r] for r in rows]


class ContinuousBatch:
    """The sequences being decoded together: `add` one (its prefill and first token), `step` them all."""

    def __init__(self, model: GPT2, *, prefix_cache: PrefixCache | None = None) -> None:
        self.model, self.window = model, model.config.n_positions
        self.vocab_size = model.config.vocab_size
        self.prefix_cache = prefix_cache
        self.sequences: list[Sequence] = []
        self.processors: list[list] = []  # per sequence: its logits processors
        self.kv = [BatchKV() for _ in model.h]

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, seq: Sequence) -> None:
        """Prefill `seq` alone, report its prompt scores (if asked) and its first token; it joins the batch."""
        processors = make_logits_processors(seq.sampling, self.vocab_size)
        cache, logits = self._prefill(seq)
        if seq.max_tokens == 0:
            seq.finish = "length"
            seq.emit(Token(-1, "", 0.0, None, "length"))
            return
        logprobs = log_softmax(seq.process(logits, processors))  # [1, vocab]
        token = seq.draw(logprobs)
        mx.eval(token, logprobs)
        seq.accept(token.item(), logprobs[0, token.item()].item(), logprobs[0])
        if seq.finish or seq.cancelled:
            return
        for layer, c in zip(self.kv, cache):
            layer.add_row(*c.state)
        self.sequences.append(seq)
        self.processors.append(processors)

    def _prefill(self, seq: Sequence) -> tuple[list[KVCache], mx.array]:
        """The prompt's KV cache and the logits `[1, vocab]` after its last token (prompt scores emitted)."""
        ids = seq.ids
        cache = make_cache(len(self.model.h), len(ids))
        if seq.prompt_logprobs:  # every position's logits are needed: no prefix can be skipped
            logits = self.model(mx.array(ids)[None], cache)[0].astype(mx.float32)  # [L, vocab]
            seq.emit(score_prompt(logits, ids, seq.top_logprobs))
            return cache, logits[-1:]
        n, prefix = self.prefix_cache.lookup(ids) if self.prefix_cache else (0, None)
        if prefix is not None:
            for c, kv in zip(cache, prefix):
                c.state = kv
        seq.cached_tokens = n
        prefill(self.model, mx.array(ids[n:-1]), cache, None)
        logits = self.model(mx.array(ids[-1:])[None], cache)[:, -1, :].astype(mx.float32)
        if self.prefix_cache is not None:
            self.prefix_cache.store(ids, cache)
        return cache, logits

    def step(self) -> None:
        """One token for every sequence in the batch; finished and cancelled ones leave it."""
        self._drop([i for i, s in enumerate(self.sequences) if s.cancelled])
        for i, seq in enumerate(self.sequences):
            if self.kv[0].lengths[i] >= self.window:  # no room for another position: GPT-2's window is full
                seq.end("length")
        self._drop([i for i, s in enumerate(self.sequences) if s.finish])
        if not self.sequences:
            return
        lengths = self.kv[0].lengths
        feed = mx.array([[s.history[-1]] for s in self.sequences])  # [B, 1]
        mask = positions = None  # rows at one length need neither: the plain decode step
        if not self.kv[0].aligned:
            keys = mx.arange(max(lengths) + 1)[None, None, None, :]  # [1, 1, 1, S]
            allowed = keys <= mx.array(lengths)[:, None, None, None]  # a row reads its own positions only
            mask = mx.where(allowed, 0.0, -mx.inf).astype(self.model.ln_f.weight.dtype)
            positions = mx.array(lengths)[:, None]  # [B, 1]: each row's own next position
        logits = self.model(feed, self.kv, mask=mask, positions=positions)[:, -1, :].astype(mx.float32)  # [B, vocab]
        if any(self.processors):
            logits = mx.concatenate([s.process(logits[i : i + 1], p) for i, (s, p) in enumerate(zip(self.sequences, self.processors))])
        logprobs = log_softmax(logits)  # [B, vocab]: reported to the clients, so the accurate sum
        tokens = mx.argmax(logprobs, axis=-1)  # [B]: greedy rows are done here; sampled rows draw their own
        if any(s.distribution is not None for s in self.sequences):
            tokens = mx.concatenate([tokens[i : i + 1] if s.distribution is None else s.draw(logprobs[i : i + 1])
                                     for i, s in enumerate(self.sequences)])  # fmt: skip
        picked = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # [B]
        mx.eval(tokens, picked)
        for i, (seq, token, logprob) in enumerate(zip(self.sequences, tokens.tolist(), picked.tolist())):
            seq.accept(token, logprob, logprobs[i] if seq.top_logprobs else None)
        self._drop([i for i, s in enumerate(self.sequences) if s.finish or s.cancelled])

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self.sequences)) if i not in rows]
        for layer in self.kv:
            layer.keep(keep)
        self.sequences = [self.sequences[i] for i in keep]
        self.processors = [self.processors[i] for i in keep]
