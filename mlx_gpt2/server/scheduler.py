"""The model's own thread: it admits waiting sequences into the continuous batch and steps it.

All MLX work of the server happens on this one thread; request handlers only tokenize, `submit` sequences
and read the events those sequences emit. A sequence joins the batch at the step after its prefill and
leaves it when it finishes or its client goes (`cancel`). With a draft model, sequences are served one at
a time by speculative decoding instead (a draft cannot share a batch).
"""

from __future__ import annotations

import collections
import threading

import mlx.core as mx

from ..generation.continuous import (
    ContinuousBatch,
    PrefixCache,
    Sequence,
    Token,
    score_prompt,
    top_tokens,
)
from ..generation.speculative import Draft, speculative_generate_step
from ..model import GPT2


class QueueFull(Exception):
    """More sequences are waiting than the server takes (`--max-queue`)."""


class Failure:
    """An event: the model failed on this sequence (never expected; the server keeps serving)."""

    def __init__(self, message: str) -> None:
        self.message = message


class Scheduler:
    """Runs one `ContinuousBatch` of at most `max_concurrency` sequences; at most `max_queue` more wait."""

    def __init__(self, model: GPT2, *, max_concurrency: int, max_queue: int, draft: Draft | None = None,
                 prefix_cache_bytes: int = 256 * 2**20) -> None:  # fmt: skip
        self.model, self.draft = model, draft
        self.max_concurrency = 1 if draft is not None else max_concurrency
        self.max_queue = max_queue
        self.batch = ContinuousBatch(model, prefix_cache=PrefixCache(prefix_cache_bytes))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.speculating: Sequence | None = None  # the sequence a draft model is serving, start to end
        self.thread = threading.Thread(target=self._run, name="mlx-gpt2-model", daemon=True)
        self.thread.start()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all of one request, or none of them); QueueFull when more than `max_queue`
        would wait for a slot (sequences that find a free slot in the batch do not wait)."""
        with self.condition:
            slots = max(self.max_concurrency - self.running, 0)  # taken at the model thread's next admission
            if len(self.waiting) + len(sequences) - slots > self.max_queue:
                raise QueueFull
            self.waiting.extend(sequences)
            self.condition.notify()

    def cancel(self, sequence: Sequence) -> None:
        """The client went away: the sequence leaves the queue or the batch at the next step."""
        sequence.cancelled = True
        with self.condition:
            if sequence in self.waiting:
                self.waiting.remove(sequence)

    @property
    def running(self) -> int:
        return len(self.batch) + (self.speculating is not None)

    @property
    def load(self) -> dict[str, int]:
        return {"running": self.running, "waiting": len(self.waiting)}

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=30)

    def _admit(self) -> list[Sequence]:
        with self.condition:
            while not self.stopping and not self.waiting and not len(self.batch):
                self.condition.wait()
            room = self.max_concurrency - self.running
            return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def _run(self) -> None:
        while not self.stopping:
            for sequence in self._admit():
                if not sequence.cancelled:
                    self._guarded([sequence], lambda s=sequence: self._start(s))
            if len(self.batch):
                self._guarded(list(self.batch.sequences), self.batch.step)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _start(self, sequence: Sequence) -> None:
        if self.draft is None:
            self.batch.add(sequence)
            return
        self.speculating = sequence
        try:
            self._speculate(sequence)
        finally:
            self.speculating = None

    def _guarded(self, sequences: list[Sequence], work) -> None:
        """Run `work`; if it fails, fail its sequences and go on serving. A failed step (or a join that
        left the batch's cache half-written) fails the whole batch and starts a fresh one."""
        try:
            work()
        except Exception as error:  # a bug, not bad input: requests were checked before they got here
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            rows = {len(layer.lengths) for layer in self.batch.kv}
            if rows != {len(self.batch.sequences)} and rows != {0}:
                sequences = [*sequences, *self.batch.sequences]
                self.batch = ContinuousBatch(self.model, prefix_cache=self.batch.prefix_cache)
            elif sequences and sequences[0] in self.batch.sequences:
                self.batch = ContinuousBatch(self.model, prefix_cache=self.batch.prefix_cache)
            for sequence in dict.fromkeys(sequences):
                sequence.cancelled = True
                try:
                    sequence.emit(Failure(message))
                except Exception:  # the request's event loop is gone (shutting down): nobody to tell
                    pass

    def _speculate(self, sequence: Sequence) -> None:
        """One sequence, start to end, drafted by the draft model (the same tokens or distribution)."""
        if sequence.prompt_logprobs:
            logits = self.model(mx.array(sequence.ids)[None])[0].astype(mx.float32)
            sequence.emit(score_prompt(logits, sequence.ids, sequence.top_logprobs))
        if sequence.max_tokens == 0:
            sequence.emit(Token(-1, "", 0.0, None, "length"))
            return
        steps = speculative_generate_step(sequence.ids, self.model, self.draft, max_tokens=sequence.max_tokens,
                                          sampling=sequence.sampling)  # fmt: skip
        for token, logprobs, _ in steps:
            if sequence.cancelled:
                return
            sequence.accept(token, logprobs[token].item(), logprobs)
            if sequence.finish:
                return
        if not sequence.finish:
            sequence.end("length")


__all__ = ["Failure", "QueueFull", "Scheduler", "top_tokens"]
