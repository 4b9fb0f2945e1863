"""What a training run prints: a header, a live progress line on a terminal, a line per report and save."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import mlx.nn as nn
from tqdm.auto import tqdm
from mlx.utils import tree_flatten



def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable ones); a quantized weight counts the weights it packs, not its scales."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits - m.weight.size - m.scales.size - (m.biases.size if "biases" in m else 0)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return total, trainable


class Progress:
    """Console output of a run: report lines on stdout, and progress bars (tqdm) on stderr while steps and
    validations run. The bars show only on a terminal; `quiet` prints warnings and nothing else; `silent`
    (the other processes of a distributed run, whose rank 0 speaks for them) not even those."""

    def __init__(self, total: int, *, quiet: bool = False, silent: bool = False, stream: TextIO | None = None) -> None:
        self.total, self.quiet, self.silent = total, quiet or silent, silent
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()
        self.bar: tqdm | None = None

    def _line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=self.stream)  # around any live bar, not through it

    def _bar(self, **settings: Any) -> tqdm:
        return tqdm(file=sys.stderr, disable=True if self.quiet else None, leave=False, dynamic_ncols=True, **settings)

    def info(self, text: str) -> None:
        self._line(text)

    def warn(self, text: str) -> None:
        if not self.silent:
            tqdm.write(f"warning: {text}", file=sys.stderr)

    def start(self, model: nn.Module, data: Any, max_seq_length: int, step: int) -> None:
        total, trainable = count_parameters(model)
        tokens = sum(len(t) for t, _ in data.train)
        self._line(
            f"trainable parameters: {trainable / 1e6:.3f}M of {total / 1e6:.1f}M ({100 * trainable / total:.2f}%); "
            f"data: {len(data.train)} training rows ({tokens} tokens), {len(data.valid)} validation rows, "
            f"up to {max_seq_length} tokens each"
        )
        if step:
            self._line(f"resuming at step {step} of {self.total}")
        self.bar = self._bar(total=self.total, initial=step, desc="training", unit="step")

    def tick(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, {tokens_per_second:.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)

    def validating(self, batches: int | None) -> Callable[[int], None]:
        """A bar for one validation pass of `batches` batches (None: unknown); returns its per-batch feed."""
        bar = self._bar(total=batches, desc="validation", unit="batch")
        self._validation_bar = bar
        return lambda done: bar.update(done - bar.n)

    def report(self, r: dict[str, Any]) -> None:
        self._line(
            f"step {r['step']}/{self.total}: train loss {r['train_loss']:.3f}, lr {r['learning_rate']:.2e}, "
            f"{r['tokens_per_second']:.0f} tokens/s, {r['trained_tokens']} tokens, peak memory {r['peak_memory_gb']:.2f} GB"
        )

    def validation(self, r: dict[str, Any]) -> None:
        bar = getattr(self, "_validation_bar", None)
        if bar is not None:
            bar.close()
            self._validation_bar = None
        self._line(f"step {r['step']}/{self.total}: validation loss {r['val_loss']:.3f} ({r['val_time']:.1f} s)")

    def saved(self, step: int, out: Path) -> None:
        self._line(f"step {step}/{self.total}: checkpoint saved to {out}")

    def finish(self, out: Path) -> None:
        self.close()
        self._line(f"done in {time.perf_counter() - self.started:.0f} s; adapters in {out}")

    def close(self) -> None:
        for bar in (self.bar, getattr(self, "_validation_bar", None)):
            if bar is not None:
                bar.close()
        self.bar = self._validation_bar = None
