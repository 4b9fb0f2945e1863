"""Beam search on the batched machinery, step for step the algorithm of transformers' `_beam_search`.

Each prompt keeps `num_beams` running beams (rows of one `Batch`, reordered every step) and `num_beams`
finished hypotheses. A finished hypothesis scores sum(log-probs) / length ** length_penalty, where length
counts the generated tokens including the final <|endoftext|> (not the prompt). As in transformers'
vectorised `_beam_search` (checked against 5.x), each step takes the top 2 x num_beams continuations of
all beams; the best num_beams of them that do not end become the running beams, and those among the top
num_beams that end (end of text, or max_tokens reached) compete for the finished slots. A prompt is done
when no running beam can beat its worst finished hypothesis (`early_stopping=False`: judged at the
current length; "never": at max_tokens when length_penalty > 0), when all its slots are finished
(`early_stopping=True`), or at max_tokens. Scores are float32 and masked with -1e9 exactly where
transformers masks them, so even masked candidates rank as they do there.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import mlx.core as mx
import numpy as np

from .constrained import Constraint
from ..backend import physical_memory
from .batch import Batch
from ..errors import UserError
from .core import encode_prompt
from ..model import GPT2
from ..tokenizer import Tokenizer

EarlyStopping = bool | Literal["never"]
_MASKED = np.float32(-1e9)  # transformers' "impossible" score


@dataclasses.dataclass
class BeamResult:
    """The best hypothesis of one prompt: its text, generated ids (an ending <|endoftext|> included), score."""

    text: str
    tokens: list[int]
    score: float  # sum of log-probs / len(tokens) ** length_penalty
    finish_reason: str  # "stop" (end of text) or "length" (max_tokens)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable")[:k]


class _Beams:
    """One prompt's running beams and finished hypotheses, updated as transformers updates them."""

    def __init__(self, num_beams: int, *, length_penalty: float, early_stopping: EarlyStopping, max_tokens: int):
        self.n, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.max_tokens = max_tokens
        # Only beam 0 is live at first, so the identical copies do not all pick the same token.
        self.running_scores = np.array([0.0] + [_MASKED] * (num_beams - 1), np.float32)
        self.running: list[list[int]] = [[] for _ in range(num_beams)]
        self.finished_scores = np.full(num_beams, _MASKED, np.float32)
        self.finished: list[list[int]] = [[] for _ in range(num_beams)]
        self.is_finished = np.zeros(num_beams, bool)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    def step(self, scores: np.ndarray, beams: np.ndarray, tokens: np.ndarray, ends: np.ndarray) -> list[int]:
        """Take the top 2n continuations (scores, source beam, token, whether it ends); return the new rows' beams."""
        length = len(self.running[0]) + 1  # generated tokens once this one is added
        candidates = [self.running[b] + [t] for b, t in zip(beams.tolist(), tokens.tolist())]
        live = scores + ends.astype(np.float32) * _MASKED  # an ending candidate cannot keep running
        keep = _top(live, self.n)
        self._finish(scores, candidates, ends, length)
        self.running = [candidates[i] for i in keep]
        self.running_scores = live[keep]
        self._check_done(length, bool(ends.all()))
        return beams[keep].tolist()

    def _finish(self, scores: np.ndarray, candidates: list[list[int]], ends: np.ndarray, length: int) -> None:
        """Merge the top-n candidates that end into the finished hypotheses, keeping the best n."""
        just = ends & (np.arange(len(ends)) < self.n)
        final = scores / np.float32(length**self.length_penalty)
        if self.is_finished.all() and self.early_stopping is True:
            final = final + _MASKED
        if not self.improvable:
            final = final + _MASKED
        final = final + (~just).astype(np.float32) * _MASKED
        merged = np.concatenate([self.finished_scores, final.astype(np.float32)])
        best = _top(merged, self.n)
        pool = self.finished + candidates
        flags = np.concatenate([self.is_finished, just])
        self.finished, self.finished_scores, self.is_finished = [pool[i] for i in best], merged[best], flags[best]

    def _check_done(self, length: int, all_end: bool) -> None:
        """Can a running beam still beat the worst finished one? (transformers' early-stop heuristic)"""
        best_length = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else length
        best_possible = self.running_scores[0] / np.float32(best_length**self.length_penalty)
        worst = np.where(self.is_finished, self.finished_scores.min(), _MASKED)
        self.improvable = self.improvable and bool((best_possible > worst).any())
        full = bool(self.is_finished.all()) and self.early_stopping is True
        self.done = not self.improvable or full or all_end


def _check_options(num_beams: int, max_tokens: int, length_penalty: float, early_stopping: EarlyStopping) -> None:
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1 for beam search, got {max_tokens!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number (1: mean log-prob, 0: sum), got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def check_beam_memory(model: GPT2, rows: int, length: int) -> None:
    """Refuse a search whose caches and scores could not fit in this machine's memory (num_beams=100000)."""
    c = model.config
    itemsize = model.ln_f.weight.dtype.size  # the compute dtype
    needed = rows * (length * c.n_layer * 2 * c.n_embd * itemsize + 4 * c.vocab_size * 4)  # caches + scores
    if needed > physical_memory():
        raise UserError(
            f"{rows} beams of {length} tokens need about {needed / 1e9:.0f} GB for their caches and scores, more "
            f"than this machine's {physical_memory() / 1e9:.0f} GB; use fewer beams or fewer tokens"
        )


def _top_continuations(logits: mx.array, running: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs `[P * n, vocab]` + running scores `[P, n]` -> the k best (score, flat index) per prompt."""
    prompts, n = running.shape
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    total = logprobs.reshape(prompts, n, -1) + mx.array(running)[:, :, None]  # [P, n, vocab]
    total = total.reshape(prompts, -1)  # [P, n * vocab]
    index = mx.argpartition(-total, k - 1, axis=-1)[:, :k]
    scores = mx.take_along_axis(total, index, axis=-1)
    order = mx.argsort(-scores, axis=-1)  # best first
    return np.array(mx.take_along_axis(scores, order, -1)), np.array(mx.take_along_axis(index, order, -1))


def beam_search(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int]],
    *,
    num_beams: int = 4,
    max_tokens: int = 64,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
    ignore_eos: bool = False,
    prefill_step_size: int | None = None,
    constraint: Constraint | None = None,
) -> list[BeamResult]:
    """The best beam of each prompt, as transformers' `generate(num_beams=..., do_sample=False)` finds it.

    With a `constraint` every beam only ever takes tokens the grammar allows (each prompt's matcher
    follows whichever beam it scores: see generation/constrained.py).
    """
    _check_options(num_beams, max_tokens, length_penalty, early_stopping)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    if not ids:
        raise ValueError("beam_search needs at least one prompt")
    window = model.config.n_positions
    if max(map(len, ids)) + max_tokens - 1 > window:
        raise UserError(
            f"a prompt of {max(map(len, ids))} tokens plus max_tokens {max_tokens} passes the model's window "
            f"of {window} positions; shorten the prompt or lower max_tokens"
        )
    check_beam_memory(model, len(ids) * num_beams, max(map(len, ids)) + max_tokens)
    eos, vocab, k = tokenizer.eos_token_id, model.config.vocab_size, 2 * num_beams
    batch = Batch(model, ids, pad_id=eos, capacity=max(map(len, ids)) + max_tokens)
    logits = mx.repeat(batch.prefill(prefill_step_size), num_beams, axis=0)  # [P * n, vocab]
    batch.select([p for p in range(len(ids)) for _ in range(num_beams)])  # each prompt's cache, once per beam
    beams = [_Beams(num_beams, length_penalty=length_penalty, early_stopping=early_stopping, max_tokens=max_tokens)
             for _ in ids]
    active = list(range(len(ids)))  # prompts still searching; their beams are consecutive batch rows
    masks = [constraint.processor() for _ in ids] if constraint is not None else None
    for length in range(max_tokens):
        if masks is not None:
            logits = _masked(logits, masks, ids, beams, active)
        scores, index = _top_continuations(logits, np.stack([beams[p].running_scores for p in active]), k)
        rows, feed, still = [], [], []
        for i, p in enumerate(active):
            tokens = index[i] % vocab
            ends = (tokens == eos) & (not ignore_eos) | (length + 1 >= max_tokens)
            parents = beams[p].step(scores[i], index[i] // vocab, tokens, ends)
            if not beams[p].done:
                still.append(p)
                rows += [i * num_beams + b for b in parents]
                feed += [seq[-1] for seq in beams[p].running]
        if not still:
            break
        batch.select(rows)
        active = still
        logits = batch.forward(mx.array(feed)[:, None])
    return [_result(tokenizer, b, eos, ignore_eos) for b in beams]


def _masked(logits: mx.array, masks: list, ids: list[list[int]], beams: list[_Beams], active: list[int]) -> mx.array:
    """Each row's logits `[P * n, vocab]` with what its beam's grammar forbids next at -inf."""
    rows = []
    for i, p in enumerate(active):
        n = len(beams[p].running)
        for b, generated in enumerate(beams[p].running):
            row = i * n + b
            rows.append(masks[p](ids[p] + generated, logits[row : row + 1]))
    return mx.concatenate(rows)


def _result(tokenizer: Tokenizer, beams: _Beams, eos: int, ignore_eos: bool) -> BeamResult:
    tokens = beams.finished[0]
    ended = bool(tokens) and tokens[-1] == eos and not ignore_eos
    text = tokenizer.decode(tokens[:-1] if ended else tokens)
    return BeamResult(text, tokens, float(beams.finished_scores[0]), "stop" if ended else "length")


def beam_generate(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    num_beams: int = 4,
    max_tokens: int = 64,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
    ignore_eos: bool = False,
) -> str:
    """The text of the best beam for one prompt."""
    return beam_search(
        model, tokenizer, [prompt], num_beams=num_beams, max_tokens=max_tokens, length_penalty=length_penalty,
        early_stopping=early_stopping, ignore_eos=ignore_eos,
    )[0].text
