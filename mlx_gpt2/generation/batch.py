"""Batched generation: prompts of different lengths, left-padded into one KV cache, each row stopping on its own.

`Batch` is the machinery (beam search runs on it too): row i holds `pads[i]` pad slots and then its prompt,
so every row's newest token sits in the same cache slot. An additive mask hides each row's pads from every
query, and each row's first real token is position 0, as transformers does with position ids taken from
the attention mask. Greedy outputs therefore equal generating each prompt alone.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import mlx.core as mx

from ..backend import prefill_step
from ..cache import make_cache
from ..errors import UserError
from ..model import GPT2, check_ids
from ..tokenizer import Tokenizer
from .constrained import Constraint
from .core import TextStream, check_max_tokens, encode_prompt, stop_list
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingOptions,
    make_logits_processors,
    make_sampler,
)


class Batch:
    """Left-padded rows of token ids sharing one KV cache; rows can be dropped, reordered or repeated."""

    def __init__(self, model: GPT2, prompts: Sequence[list[int]], *, pad_id: int, capacity: int | None = None) -> None:
        if not prompts or any(not p for p in prompts):
            raise ValueError("a batch needs at least one prompt, and every prompt at least one token")
        prompts = [check_ids(p, model.config.vocab_size, what=f"prompt {i}") for i, p in enumerate(prompts)]
        width = max(len(p) for p in prompts)
        self.model = model
        self.window = model.config.n_positions
        self.pads = [width - len(p) for p in prompts]
        self.tokens = mx.array([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # [B, width]
        self.cache = make_cache(len(model.h), capacity)
        self.dtype = model.ln_f.weight.dtype  # never quantized, so it is the compute dtype

    @property
    def size(self) -> int:
        return len(self.pads)

    @property
    def offset(self) -> int:
        """Cache slots filled: the padded width plus the tokens decoded so far."""
        return self.cache[0].offset

    def next_position(self) -> int:
        """The largest position the next decoded token would take (the row with the least padding)."""
        return self.offset - min(self.pads)

    def _mask_and_positions(self, length: int) -> tuple[mx.array | None, mx.array | None]:
        """Additive mask `[B, 1, length, S]` and positions `[B, length]` for `length` new slots."""
        if not any(self.pads):  # no row is padded: the model's own causal mask and positions are exact
            return None, None
        start = self.offset
        queries = mx.arange(start, start + length)[:, None]  # [length, 1] cache slots
        keys = mx.arange(start + length)[None]  # [1, S]
        pads = mx.array(self.pads)[:, None, None, None]  # [B, 1, 1, 1]
        # A query sees the real tokens of its own row up to itself; a pad slot sees only itself, so its
        # softmax is never over nothing (a NaN there would reach the real rows through the values).
        allowed = ((keys <= queries) & (keys >= pads)) | (keys == queries)  # [B, 1, length, S]
        mask = mx.where(allowed, mx.array(0.0, self.dtype), mx.array(-mx.inf, self.dtype))
        positions = mx.maximum(queries[:, 0][None] - mx.array(self.pads)[:, None], 0)  # [B, length]
        return mask, positions

    def forward(self, tokens: mx.array, *, logits: bool = True) -> mx.array:
        """Feed `[B, L]` tokens into the next L slots; return the last slot's logits `[B, vocab]` (float32)."""
        if self.offset + tokens.shape[1] - min(self.pads) > self.window:
            raise UserError(f"the batch reached the model's window of {self.window} positions; lower max_tokens")
        mask, positions = self._mask_and_positions(tokens.shape[1])
        if not logits:
            return self.model.hidden(tokens, self.cache, mask=mask, positions=positions)
        return self.model(tokens, self.cache, mask=mask, positions=positions)[:, -1, :].astype(mx.float32)

    def prefill(self, step_size: int | None = None) -> mx.array:
        """Run the padded prompts through the model in chunks; return the last slot's logits `[B, vocab]`."""
        width, step_size = self.tokens.shape[1], prefill_step(step_size)
        for start in range(0, width - 1, step_size):
            chunk = self.tokens[:, start : min(start + step_size, width - 1)]
            self.forward(chunk, logits=False)
            mx.eval([c.keys for c in self.cache])
        return self.forward(self.tokens[:, width - 1 :])

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order (repeats allowed): drops finished rows, reorders beams."""
        if rows == list(range(self.size)):
            return
        index = mx.array(rows)
        for c in self.cache:
            c.keys, c.values = c.keys[index], c.values[index]  # [B, H, capacity, hd] -> [len(rows), ...]
        self.pads = [self.pads[r] for r in rows]
        self.tokens = self.tokens[index]


@dataclasses.dataclass
class BatchResponse:
    """What batch_generate_response returns: per-prompt texts, token ids and finish reasons, and speed.

    `tokens[i]` are the ids generated for prompt i (an ending <|endoftext|> included, as stream_generate
    yields it); `finish_reasons[i]` is "length", "stop" or "window". Speeds count tokens of all rows.
    """

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB


class _Row:
    """One prompt's side of the batch: its text stream and its history (for the repetition penalty)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], prompt: list[int], ignore_eos: bool, max_tokens: int) -> None:
        self.stream = TextStream(tokenizer, max_tokens=max_tokens, stop=stops, ignore_eos=ignore_eos)
        self.history, self.tokens, self.pieces = list(prompt), [], []

    @property
    def finish(self) -> str | None:
        return self.stream.finish

    def add(self, token: int) -> None:
        """Take one generated token; `finish` is set when this row is done (same rules as stream_generate)."""
        self.tokens.append(token)
        self.history.append(token)
        self.pieces.append(self.stream.add(token))

    def end(self, reason: str) -> None:
        self.pieces.append(self.stream.end(reason))


Step = Callable[..., tuple[mx.array, mx.array]]


def _make_step(sampler: Sampler, processors: list[list[LogitsProcessor]], rows: list[_Row]) -> Step:
    """logits `[B, vocab]` -> (tokens `[B]`, their log-probs `[B]`), each row processed with its own history.

    `last` `[B]` are the tokens just fed: the next step is queued before they reach the rows' histories.
    """

    def step(logits: mx.array, active: list[int], last: mx.array | None = None) -> tuple[mx.array, mx.array]:
        if any(processors):  # penalties and constraints depend on each row's own history (and state)
            # One sync for the whole batch: the tokens just fed, as ints (a per-row graph would make each
            # row's processor wait for them on its own), then each row's history as a plain array.
            fed = last.tolist() if last is not None else [None] * len(active)
            seen = [mx.array(rows[r].history + ([t] if t is not None else [])) for r, t in zip(active, fed)]
            logits = mx.concatenate([_processed(processors[r], h, logits[i : i + 1]) for i, (r, h) in enumerate(zip(active, seen))])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = sampler(logprobs)
        return tokens, mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]

    return step


def _processed(processors: list[LogitsProcessor], history: mx.array, logits: mx.array) -> mx.array:
    for process in processors:
        logits = process(history, logits)
    return logits


def _decode(batch: Batch, rows: list[_Row], step: Step, logits: mx.array, max_tokens: int) -> None:
    """Decode from the prefill's `logits` until every row has finished; finished rows leave the batch."""
    active = list(range(len(rows)))  # the prompt each batch row belongs to
    y, _ = step(logits, active)
    for n in range(max_tokens):
        following = None  # the next step is queued before this one is read, so Python overlaps compute
        if n + 1 < max_tokens and batch.next_position() < batch.window:
            following = step(batch.forward(y[:, None]), active, y)
            mx.async_eval(*following)
        for r, token in zip(active, y.tolist()):
            rows[r].add(token)
        if following is None:  # max_tokens, or the row with the least padding reached the window
            for r in active:
                if rows[r].finish is None:
                    rows[r].end("window")
            return
        keep = [i for i, r in enumerate(active) if rows[r].finish is None]
        if not keep:
            return
        if len(keep) < len(active):
            batch.select(keep)
            active = [active[i] for i in keep]
            following = tuple(a[mx.array(keep)] for a in following)
        y, _ = following


def batch_generate_response(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int]],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    stop: list[str] | str | None = None,
    ignore_eos: bool = False,
    prefill_step_size: int | None = None,
    constraints: Sequence[Constraint | None] | Constraint | None = None,
) -> BatchResponse:
    """Generate for every prompt at once; each row stops on its own (end of text, stop string, max_tokens).

    Rows end with finish reason "window" when the longest one reaches the model's window (no sliding).
    `constraints`: one `Constraint` for every row, or one per row (None: that row is free); by default
    the one in `sampling`, if any.
    """
    check_max_tokens(max_tokens)
    sampler = make_sampler(sampling)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    constraints = _per_row(constraints, len(ids), sampling)
    processors = [make_logits_processors(dataclasses.replace(sampling, constraint=c), model.config.vocab_size)
                  for c in constraints]  # fmt: skip
    if not ids:
        raise ValueError("batch_generate needs at least one prompt")
    if max(map(len, ids)) > model.config.n_positions:
        raise UserError(
            f"a prompt is {max(map(len, ids))} tokens, longer than the model's window of "
            f"{model.config.n_positions}; shorten it"
        )
    sampling.seed_random()
    rows = [_Row(tokenizer, stop_list(stop), p, ignore_eos, max_tokens) for p in ids]
    mx.reset_peak_memory()
    tic = time.perf_counter()
    batch = Batch(model, ids, pad_id=tokenizer.eos_token_id, capacity=max(map(len, ids)) + max_tokens)
    logits = batch.prefill(prefill_step_size) if max_tokens else None
    if logits is not None:
        mx.eval(logits)
    prompt_time, tic = time.perf_counter() - tic, time.perf_counter()
    if logits is not None:
        _decode(batch, rows, _make_step(sampler, processors, rows), logits, max_tokens)
    generated = sum(len(r.tokens) for r in rows)
    return BatchResponse(
        texts=["".join(r.pieces) for r in rows], tokens=[r.tokens for r in rows],
        finish_reasons=[r.finish or "length" for r in rows], prompt_tokens=sum(map(len, ids)),
        prompt_tps=sum(map(len, ids)) / max(prompt_time, 1e-9), generation_tokens=generated,
        generation_tps=generated / max(time.perf_counter() - tic, 1e-9), peak_memory=mx.get_peak_memory() / 1e9,
    )


def batch_generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int]],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    stop: list[str] | str | None = None,
    ignore_eos: bool = False,
    constraints: Sequence[Constraint | None] | Constraint | None = None,
) -> list[str]:
    """The generated text of each prompt, in order (the prompts are not repeated)."""
    return batch_generate_response(
        model, tokenizer, prompts, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos,
        constraints=constraints,
    ).texts


def _per_row(constraints: Sequence[Constraint | None] | Constraint | None, n: int,
             sampling: SamplingOptions) -> list[Constraint | None]:  # fmt: skip
    if constraints is None:
        return [sampling.constraint] * n
    if isinstance(constraints, Constraint):
        return [constraints] * n
    constraints = list(constraints)
    if len(constraints) != n:
        raise UserError(f"constraints has {len(constraints)} entries for {n} prompts; give one per prompt")
    return constraints
