"""Strided perplexity, as in the GPT-2 paper's language-modelling tables and transformers' perplexity guide.

The text is tokenized once and cut into windows of `context` tokens that start every `stride` tokens.
Each token is scored exactly once, in the first window that reaches it, so it is predicted from up to
`context - stride` tokens of left context (the very first window's tokens from less). The first token of
the text has nothing to be predicted from and is not scored.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import mlx.core as mx

from .distributed import World
from .errors import UserError
from .model import GPT2, check_ids
from .numerics import logsumexp
from .tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    seconds: float
    context: int
    stride: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    scored: int  # how many of the last positions' targets are scored here


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of transformers' guide: [begin, begin + context) every `stride`, scoring what is new."""
    result, scored_to = [], 1  # token 0 is never a target
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        if end - 1 > begin and end > scored_to:
            result.append(Window(begin, end, end - scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return result


def _check_options(model: GPT2, context: int | None, stride: int | None, batch_size: int) -> tuple[int, int]:
    window = model.config.n_positions
    context = window if context is None else context
    if not 2 <= context <= window:
        raise UserError(f"--context must be between 2 and the model's window of {window} tokens, got {context}")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise UserError(f"--stride must be between 1 and context - 1 ({context - 1}), got {stride}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    return context, stride


def _batch_nll(model: GPT2, ids: mx.array, batch: list[Window]) -> mx.array:
    """Summed NLL of the scored targets of windows that share one length; logits only where scored."""
    length, scored = batch[0].end - batch[0].begin, batch[0].scored
    inputs = mx.stack([ids[w.begin : w.end] for w in batch])  # [B, length]
    targets = inputs[:, length - scored :]  # [B, scored]: the tokens predicted by the last positions
    hidden = model.hidden(inputs[:, :-1])[:, length - 1 - scored :]  # [B, scored, n_embd]
    logits = model.head(hidden).astype(mx.float32)  # [B, scored, vocab]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (logsumexp(logits) - picked).sum()  # the accurate sum: see numerics.py


def perplexity(
    model: GPT2,
    tokenizer: Tokenizer,
    text: str,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    world: World | None = None,
) -> PerplexityResult:
    """Strided perplexity of `model` on `text`. `context` defaults to the model's window (1024 for gpt2),
    `stride` to half the context; `batch_size` windows are evaluated together (same result, more memory).
    `progress(tokens scored, tokens to score)` is called as the work goes (a progress bar's feed). With a
    `world` of several processes (`mlx.launch`), each scores its share of the batches and the sums are
    added up: the same result, in float32 on the wire."""
    world = world or World()
    context, stride = _check_options(model, context, stride, batch_size)
    ids = check_ids(tokenizer.encode(text), model.config.vocab_size, what="the text")
    if len(ids) < 2:
        raise UserError("the text must hold at least 2 tokens to score one")
    token_ids = mx.array(ids)
    plan = windows(len(ids), context, stride)
    start, total = time.perf_counter(), 0.0
    groups: dict[tuple[int, int], list[Window]] = {}
    for w in plan:  # full windows batch together; the first and the last have their own shapes
        groups.setdefault((w.end - w.begin, w.scored), []).append(w)
    scored, done = sum(w.scored for w in plan), 0
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    for k in world.split(len(batches)):  # under mlx.launch each process scores every size-th batch
        total += _batch_nll(model, token_ids, batches[k]).item()
        done += sum(w.scored for w in batches[k]) * world.size  # about what all of them have done
        if progress is not None:
            progress(min(done, scored), scored)
    total = world.sum(mx.array(total, dtype=mx.float32)).item() if world.size > 1 else total
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, time.perf_counter() - start, context, stride)
