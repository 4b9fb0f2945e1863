"""LoRA, QLoRA and full fine-tuning: a compiled AdamW step, and checkpoints a run resumes from exactly.

`train(TrainConfig(...))` loads the base, adapts it, and runs `iters` optimizer steps. A run stopped at
step k (Ctrl-C, a callback, a crash after a save) and resumed with `resume=True` ends with the same
losses and the same adapters as one that never stopped: the checkpoint carries the optimizer state, the
RNG key, the data position and the losses of the current report window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..backend import parse_dtype
from ..distributed import World
from ..errors import UserError
from ..convert.weights import nonfinite
from ..fileio import output_lock
from ..quant.quantize import QuantizeConfig
from .checkpoint import (
    METRICS, TrainState, append_metrics, checkpoint_step, has_checkpoint, load_checkpoint, rng_key, save_checkpoint, set_rng_key,
    truncate_metrics,
)
from .data import Batch, Data, iterate_train, iterate_valid, load_data
from ..generation.prompt_cache import model_fingerprint
from .layers import LORA_KEYS, LoRASpec, apply_lora, base_of_record, check_adapter_weights, check_spec, trainable_weights
from .loss import head_is_trainable, loss_fn
from .progress import Progress

DEFAULT_ALPHA = 16.0
# Rows per forward/backward pass. On gpt2's shape (512-token rows, checkpointing) each row's pass needs
# ~0.25 GB above the weights; 2 rows ran within 4% of the tokens/s of 4 at half the memory (benchmarks/lora).
DEFAULT_MICRO_BATCH_SIZE = 2
DEFAULT_MAX_SEQ_LENGTH = 512  # the default run on gpt2 fits in 2 GB with this; --max-seq-length goes to the window
END_LR_RATIO = 0.1  # the cosine schedule ends at a tenth of the peak learning rate
FLOAT32_MAX = 3.4028234663852886e38  # options are float32 in the compiled step: larger ones would become inf
FORMAT_VERSION = 1
# Options that change what a run computes: a resumed run must use the values its checkpoint was made with.
TRAJECTORY = (
    "batch_size", "learning_rate", "max_seq_length", "seed", "num_layers", "lora_keys", "rank", "scale",
    "dropout", "full", "grad_accum", "grad_clip", "warmup", "weight_decay", "pack", "quantize", "dtype",
)


@dataclasses.dataclass
class TrainConfig:
    """Every option of a fine-tuning run; `None` means "the default for this model" (see `resolve`)."""

    model: str = "gpt2"
    data: str = "data"
    adapter_path: str = "adapters"
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_seq_length: int | None = None  # tokens per row; None: min(512, the model's window)
    seed: int = 0
    resume: bool = False
    num_layers: int | None = None  # adapt the last N blocks; None: all of them
    lora_keys: tuple[str, ...] = LORA_KEYS
    rank: int = 8
    alpha: float | None = None  # scale = alpha / rank; give alpha or scale, not both (default alpha 16)
    scale: float | None = None
    dropout: float = 0.0
    full: bool = False  # train the weights themselves, not LoRA updates
    grad_accum: int = 1  # batches per optimizer step (their token losses averaged together)
    micro_batch_size: int | None = None  # rows per forward/backward pass; None: 2 (less memory, same result)
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    warmup: int | None = None  # linear warmup steps; None: min(100, iters // 10)
    weight_decay: float = 0.01
    grad_checkpoint: bool = True  # recompute each block's activations in the backward pass: the 2 GB default
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    pack: bool = False  # pack short examples into full windows
    quantize: QuantizeConfig | dict | bool | None = None  # QLoRA: quantize the base on load (True: 4 bits)
    dtype: str | None = None  # the base's compute dtype (float32, bfloat16, float16); None: the checkpoint's


@dataclasses.dataclass
class TrainResult:
    adapter_path: Path
    step: int  # optimizer steps done, in all
    losses: list[float]  # training loss of each step this call ran
    val_losses: list[tuple[int, float]]  # (step, validation loss)
    tokens_per_second: float
    peak_memory_gb: float


def check_config(c: TrainConfig) -> None:
    """Reject out-of-range options before anything is loaded, each with its allowed range."""
    positive = {"iters": c.iters, "batch_size": c.batch_size, "rank": c.rank, "grad_accum": c.grad_accum,
                "steps_per_report": c.steps_per_report, "steps_per_eval": c.steps_per_eval, "save_every": c.save_every}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("learning_rate", "alpha", "scale", "dropout", "weight_decay", "grad_clip"):
        value = getattr(c, name)
        if value is not None and not (isinstance(value, (int, float)) and abs(value) <= FLOAT32_MAX):
            raise UserError(f"--{name.replace('_', '-')} must be a finite float32 number (at most {FLOAT32_MAX:.3g}), got {value}")
    if not isinstance(c.seed, int) or not 0 <= c.seed <= 2**64 - 1:
        raise UserError(f"--seed must be an integer in [0, 2**64 - 1], got {str(c.seed)[:30]}")
    checks = [
        (c.learning_rate > 0, f"--learning-rate must be > 0, got {c.learning_rate}"),
        (c.micro_batch_size is None or c.micro_batch_size >= 1, f"--micro-batch-size must be at least 1, got {c.micro_batch_size}"),
        (c.max_seq_length is None or c.max_seq_length >= 2, f"--max-seq-length must be at least 2, got {c.max_seq_length}"),
        (c.alpha is None or c.scale is None, "give --alpha or --scale, not both (scale = alpha / rank)"),
        (c.grad_clip is None or c.grad_clip > 0, f"--grad-clip must be > 0, got {c.grad_clip}"),
        (c.warmup is None or 0 <= c.warmup < c.iters, f"--warmup must be in [0, --iters), got {c.warmup}"),
        (c.val_batches == -1 or c.val_batches >= 0, f"--val-batches must be -1 (all) or >= 0, got {c.val_batches}"),
        (c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}"),
        (not (c.full and c.quantize), "--full trains every weight and cannot train a quantized base; drop --quantize"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    QuantizeConfig.coerce(c.quantize)  # its own range checks
    parse_dtype(c.dtype)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A run's options with every default made concrete (`resolve`): what the run computes with, and what
    adapter_config.json records under "train" (`to_dict`) so that `--resume` can check it is the same run."""

    model: str
    data: str
    adapter_path: str
    iters: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    seed: int
    resume: bool
    num_layers: int
    lora_keys: tuple[str, ...]
    rank: int
    alpha: float | None
    scale: float
    dropout: float
    full: bool
    grad_accum: int
    micro_batch_size: int
    grad_clip: float | None
    warmup: int
    weight_decay: float
    grad_checkpoint: bool
    steps_per_report: int
    steps_per_eval: int
    val_batches: int
    save_every: int
    pack: bool
    quantize: dict[str, Any] | None
    dtype: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lora_keys": list(self.lora_keys)}


def resolve(c: TrainConfig, n_layer: int, window: int, saved: dict[str, Any] | None) -> RunSettings:
    """The config with every `None` made concrete: from the checkpoint when resuming, else the defaults."""
    saved = saved or {}
    values = dataclasses.asdict(c)
    values["lora_keys"] = tuple(c.lora_keys)
    quantize = QuantizeConfig.coerce(c.quantize)
    values["quantize"] = dataclasses.asdict(quantize) if quantize else None
    defaults = {
        "num_layers": n_layer,
        "micro_batch_size": DEFAULT_MICRO_BATCH_SIZE,
        "max_seq_length": min(DEFAULT_MAX_SEQ_LENGTH, window),
        "warmup": min(100, c.iters // 10),
        "scale": (c.alpha if c.alpha is not None else DEFAULT_ALPHA) / c.rank,
    }
    given_scale = c.scale if c.scale is not None else (c.alpha / c.rank if c.alpha is not None else None)
    values["scale"] = given_scale
    for name, default in defaults.items():
        if values[name] is None:
            values[name] = saved.get(name, default)
    if values["max_seq_length"] > window:
        raise UserError(f"--max-seq-length {values['max_seq_length']} is longer than this model's window of {window} tokens")
    return RunSettings(**values)


def train(
    config: TrainConfig, *, on_step: Callable[[int, float], None] | None = None, quiet: bool = False
) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; adapters and checkpoints go to `config.adapter_path`.

    `on_step(step, loss)` is called after every optimizer step; raising KeyboardInterrupt in it stops
    the run as Ctrl-C does, after saving a checkpoint that `resume=True` continues from.
    """
    check_config(config)
    world = World.current()  # under `mlx.launch`: this process's rank; alone, a world of one
    world.check_batch(config.batch_size)
    out = Path(config.adapter_path).expanduser()
    with world.stopped_by_the_launcher():
        if not world.main:  # rank 0 alone writes the adapter directory; the others read a checkpoint to resume
            return _train(config, out, on_step, quiet, world)
        check_adapter_dir(out, resume=config.resume)  # before the slow load: fail fast
        with output_lock(out):  # a second run into the same directory fails at once
            check_adapter_dir(out, resume=config.resume)
            return _train(config, out, on_step, quiet, world)


def _train(config: TrainConfig, out: Path, on_step: Callable[[int, float], None] | None, quiet: bool,
           world: World) -> TrainResult:  # fmt: skip
    from ..loading import load

    progress = Progress(config.iters, quiet=quiet, silent=not world.main)
    model, tokenizer = load(config.model, quantize=config.quantize, dtype=config.dtype)
    saved = load_checkpoint(out) if config.resume else None
    settings = resolve(config, len(model.h), model.config.n_positions, saved[2]["train"] if saved else None)
    spec = LoRASpec(num_layers=settings.num_layers, keys=settings.lora_keys, rank=settings.rank, scale=settings.scale,
                    dropout=settings.dropout, full=settings.full)  # fmt: skip
    check_spec(spec, len(model.h), model.config.n_embd)
    data = load_data(config.data, tokenizer, max_seq_length=settings.max_seq_length, pack=settings.pack,
                     on_warning=progress.warn)  # fmt: skip
    base_fingerprint = model_fingerprint(model)  # before LoRA: `generate`/`fuse` compare their base with it
    mx.random.seed(config.seed)
    apply_lora(model, spec)
    optimizer = make_optimizer(settings)
    optimizer.init(model.trainable_parameters())
    adapter_config = {"format_version": FORMAT_VERSION, "base_model": base_of_record(config.model),
                      "base_fingerprint": base_fingerprint, "lora": spec.to_dict(),
                      "quantize": settings.quantize, "train": settings.to_dict()}  # fmt: skip
    state = TrainState(rng=rng_key(), data_fingerprint=data.fingerprint())
    if saved is not None:
        state = restore(out, saved, model, optimizer, adapter_config, data, progress)
    progress.start(model, data, settings.max_seq_length, state.step)
    trainer = Trainer(settings, model, optimizer, data, out, adapter_config, state, progress, on_step, world)
    return trainer.run()


def check_adapter_dir(out: Path, *, resume: bool) -> None:
    """A new run needs an empty (or new) directory; a resumed one needs a checkpoint there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--adapter-path {out} is a file; pass a directory")
    if resume:
        if not has_checkpoint(out):
            raise UserError(f"--resume: {out} holds no checkpoint to resume; start without --resume")
    elif has_checkpoint(out):
        raise UserError(f"{out} already holds a training run; pass --resume to continue it, or choose another --adapter-path")
    elif out.is_dir() and [p.name for p in out.iterdir()] == [METRICS]:
        (out / METRICS).unlink()  # a run that failed before its first checkpoint: nothing to keep
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--adapter-path {out} is not empty; choose a new or empty directory")


def lr_schedule(peak: float, iters: int, warmup: int) -> Callable[[mx.array], mx.array]:
    """Linear warmup to `peak` over `warmup` steps, then a cosine down to END_LR_RATIO * peak at `iters`."""
    end = peak * END_LR_RATIO

    def schedule(step: mx.array) -> mx.array:  # `step` = updates already made (0 for the first)
        step = step.astype(mx.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - warmup) / max(iters - warmup, 1), 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, cosine)

    return schedule


def make_optimizer(settings: RunSettings) -> optim.AdamW:
    schedule = lr_schedule(settings.learning_rate, settings.iters, settings.warmup)
    return optim.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)


def restore(out: Path, saved: tuple, model: nn.Module, optimizer: optim.Optimizer, adapter_config: dict,
            data: Data, progress: Progress) -> TrainState:  # fmt: skip
    """Put the checkpoint's adapters, optimizer state and RNG key back, after checking it is the same run."""
    adapters, optimizer_flat, saved_config, state = saved
    changed = [f"{k} {saved_config['train'].get(k)!r} -> {adapter_config['train'][k]!r}"
               for k in TRAJECTORY if saved_config["train"].get(k) != adapter_config["train"][k]]  # fmt: skip
    if changed:
        raise UserError(f"--resume: options differ from the checkpoint's ({'; '.join(changed)}); pass the same options")
    check_adapter_weights(adapters, trainable_weights(model), source=str(out))
    model.load_weights(list(adapters.items()), strict=False)
    expected = {k: v.shape for k, v in tree_flatten(optimizer.state)}
    if expected != {k: v.shape for k, v in optimizer_flat.items()}:
        raise UserError(f"--resume: the optimizer state in {out} does not match this model; start a new run")
    # Leaf by leaf into the optimizer's own tree: it also holds empty branches for frozen modules.
    optimizer.state = tree_map_with_path(lambda path, _: optimizer_flat[path], optimizer.state)
    set_rng_key(state.rng)
    if state.data_fingerprint != data.fingerprint():
        progress.warn("the training data changed since the checkpoint: the resumed run will not match an uninterrupted one")
    if saved_config["train"]["iters"] != adapter_config["train"]["iters"]:
        progress.warn("--iters changed since the checkpoint, and with it the learning-rate schedule")
    truncate_metrics(out, state.step)
    return state


def make_step(model: nn.Module, optimizer: optim.Optimizer, settings: RunSettings) -> Step:
    """Two compiled functions over the model, optimizer and RNG state: gradients of a micro-batch, and the update.

    Gradients are of the *summed* token loss; the update divides by the step's token count, so a batch split
    into micro-batches (or accumulated over several) trains exactly as one batch of all its rows would.
    """
    loss = functools.partial(loss_fn, checkpoint=settings.grad_checkpoint, fused_head=not head_is_trainable(model))

    def summed(model: nn.Module, *batch: mx.array) -> tuple[mx.array, mx.array]:
        mean, n_tokens = loss(model, *batch)
        return mean * n_tokens, n_tokens

    loss_and_grad = nn.value_and_grad(model, summed)
    clip = settings.grad_clip
    state = [model.state, optimizer.state, mx.random.state]

    @functools.partial(mx.compile, inputs=state, outputs=state)
    def gradients(inputs: mx.array, targets: mx.array, mask: mx.array, accumulated: Any):
        (total, n_tokens), grads = loss_and_grad(model, inputs, targets, mask)
        if accumulated is not None:
            grads = tree_map(mx.add, grads, accumulated)
        return total, n_tokens, grads

    @functools.partial(mx.compile, inputs=state, outputs=state)
    def update(grads: Any, n_tokens: mx.array) -> None:
        grads = tree_map(lambda g: g / mx.maximum(n_tokens, 1), grads)  # a batch of only masked rows: no step
        if clip is not None:
            grads, _ = optim.clip_grad_norm(grads, clip)
        optimizer.update(model, grads)

    return Step(gradients, update)


@dataclasses.dataclass(frozen=True)
class Step:
    gradients: Callable  # (inputs, targets, mask, accumulated grads or None) -> (summed loss, tokens, grads)
    update: Callable  # (summed grads, tokens) -> None: one AdamW step


def evaluate(model: nn.Module, batches: Iterator[Batch], progress: Callable[[int], None] | None = None,
             world: World = World()) -> float | None:  # fmt: skip
    """Mean loss over every masked target of `batches`; None if there are none. `progress(batches done)`.

    Under several processes each takes every size-th batch and the sums are added up: the same number.
    """
    total, count = mx.array(0.0), mx.array(0.0)
    for done, batch in enumerate(batches, start=1):
        if (done - 1) % world.size != world.rank:
            continue
        loss, n = loss_fn(model, batch.inputs, batch.targets, batch.mask)
        total, count = total + loss * n, count + n
        mx.eval(total, count)
        if progress is not None:
            progress(done)
    total, count = world.sum((total, count))
    return (total / count).item() if count.item() > 0 else None


@contextlib.contextmanager
def stop_at_step_boundary() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint is consistent);
    a second one stops at once, keeping the previous checkpoint."""
    flag = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        if previous is not None:  # None: a handler installed outside Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


class Trainer:
    """The loop: steps, reports, validation, checkpoints; each in its own method."""

    def __init__(self, settings: RunSettings, model: nn.Module, optimizer: optim.Optimizer, data: Data, out: Path,
                 adapter_config: dict, state: TrainState, progress: Progress,
                 on_step: Callable[[int, float], None] | None, world: World = World()) -> None:  # fmt: skip
        self.settings, self.model, self.optimizer, self.data, self.world = settings, model, optimizer, data, world
        self.out, self.adapter_config, self.state, self.progress, self.on_step = out, adapter_config, state, progress, on_step
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self.window: list[tuple[float, int]] = list(map(tuple, state.window))  # (loss, tokens) since the last report
        self.train_time, self.window_time, self.window_tokens, self.run_tokens = 0.0, 0.0, 0, 0
        self.consistent = True  # False while a step is half done: nothing may be saved then
        self.probe: tuple[mx.array, mx.array, mx.array] | None = None  # the last micro-batch trained on

    def run(self) -> TrainResult:
        s = self.settings
        batches = iterate_train(self.data.train, s.batch_size, s.max_seq_length, seed=s.seed,
                                start=self.state.batches_seen)  # fmt: skip
        step = make_step(self.model, self.optimizer, s)
        mx.reset_peak_memory()
        if self.state.step == 0:
            self.validate()
        with stop_at_step_boundary() as stop:
            try:
                while self.state.step < self.settings.iters:
                    loss = self.train_step(step, batches)
                    self.after_step(loss)
                    if stop["requested"]:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.stopped()
                raise
            finally:
                self.progress.close()
        self.progress.finish(self.out)
        return self.result()

    def train_step(self, step: Step, batches: Iterator[Batch]) -> float:
        """One optimizer step over `grad_accum` batches, each in micro-batches; returns its mean token loss."""
        self.consistent = False
        self.model.train()
        tic = time.perf_counter()
        accumulated, losses, counts = None, [], []
        rows = self.settings.micro_batch_size
        for _ in range(self.settings.grad_accum):
            batch = next(batches)  # the global batch; this process trains on its share of the rows
            share = self.world.share(batch.inputs.shape[0])
            inputs, targets, mask = batch.inputs[share], batch.targets[share], batch.mask[share]
            for i in range(0, inputs.shape[0], rows):
                self.probe = (inputs[i : i + rows], targets[i : i + rows], mask[i : i + rows])
                loss, n_tokens, accumulated = step.gradients(*self.probe, accumulated)
                # Evaluated one micro-batch at a time: queued together, their activations would coexist.
                mx.eval(accumulated, loss, n_tokens)
                losses.append(loss)
                counts.append(n_tokens)
        # Summed over the processes (one message), then divided by the global token count in `update`:
        # exactly the update one process makes on the whole batch.
        accumulated, total_tokens, total_loss = self.world.sum((accumulated, sum(counts), sum(losses)))
        step.update(accumulated, total_tokens)
        mx.eval(self.model.state, self.optimizer.state)
        tokens = int(total_tokens.item())
        loss = total_loss.item() / max(tokens, 1)
        if not math.isfinite(loss):
            self.diverged(f"the training loss became {loss} at step {self.state.step + 1}")
        elapsed = time.perf_counter() - tic
        self.state.step += 1
        self.state.batches_seen += self.settings.grad_accum
        self.state.trained_tokens += tokens
        self.state.rng = rng_key()
        self.window.append((loss, tokens))
        self.window_time, self.window_tokens = self.window_time + elapsed, self.window_tokens + tokens
        self.train_time, self.run_tokens = self.train_time + elapsed, self.run_tokens + tokens
        self.losses.append(loss)
        self.consistent = True
        return loss

    def after_step(self, loss: float) -> None:
        step, c = self.state.step, self.settings
        last = step == c.iters
        self.progress.tick(step, loss, self.window_tokens / max(self.window_time, 1e-9))
        if (step % c.steps_per_report == 0 or last) and self.world.main:
            self.report()
        if step % c.steps_per_eval == 0 or last:
            self.validate()  # every process computes its share
        if (step % c.save_every == 0 or last) and self.world.main:
            self.save()
        if self.on_step is not None:
            self.on_step(step, loss)

    def report(self) -> None:
        record = {
            "step": self.state.step,
            "train_loss": sum(l for l, _ in self.window) / len(self.window),
            "learning_rate": self.optimizer.learning_rate.item(),
            "tokens_per_second": self.window_tokens / max(self.window_time, 1e-9),
            "trained_tokens": self.state.trained_tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        append_metrics(self.out, record)
        self.progress.report(record)
        self.window, self.window_time, self.window_tokens = [], 0.0, 0

    def validate(self) -> None:
        if not self.data.valid or self.settings.val_batches == 0:
            return
        s, tic = self.settings, time.perf_counter()
        self.model.eval()
        n = self.settings.val_batches
        batches = -(-len(self.data.valid) // s.batch_size)  # ceil
        feed = self.progress.validating(batches if n < 0 else min(n, batches))
        loss = evaluate(self.model, iterate_valid(self.data.valid, s.batch_size, s.max_seq_length, n), feed, self.world)
        if loss is None or not self.world.main:
            return
        record = {"step": self.state.step, "val_loss": loss, "val_time": time.perf_counter() - tic}
        append_metrics(self.out, record)
        self.progress.validation(record)
        self.val_losses.append((self.state.step, loss))

    def check_savable(self) -> None:
        """A checkpoint is written only if every weight it holds is finite and so is the loss they give
        (weights of 3e30 are finite, but their logits are not)."""
        weights = trainable_weights(self.model)
        bad = nonfinite(weights)
        if bad:
            self.diverged(f"after step {self.state.step} {len(bad)} trained weight(s) hold NaN or infinity ({bad[0]}, ...)")
        if self.probe is not None:
            self.model.eval()
            loss = loss_fn(self.model, *self.probe)[0].item()
            if not math.isfinite(loss):
                self.diverged(f"the weights after step {self.state.step} give a loss of {loss}")

    def save(self) -> None:
        self.check_savable()
        self.state.window = [list(w) for w in self.window]
        save_checkpoint(self.out, adapters=trainable_weights(self.model), optimizer_state=self.optimizer.state,
                        adapter_config=self.adapter_config, state=self.state)  # fmt: skip
        self.progress.saved(self.state.step, self.out)

    def stopped(self) -> None:
        """Ctrl-C (or on_step raising KeyboardInterrupt): save where the run stands, if that is a whole step."""
        if not self.world.main:
            return
        if self.consistent and self.state.step > 0:
            self.save()
            self.progress.info(f"stopped at step {self.state.step}; continue with --resume (same options)")
        else:
            self.progress.info("stopped mid-step; the last checkpoint saved is kept")

    def diverged(self, what: str) -> None:
        last = checkpoint_step(self.out)
        kept = f"the checkpoint of step {last} in {self.out} is kept" if last is not None else "no checkpoint was saved"
        self.consistent = False  # nothing of this run may be saved now, not even on Ctrl-C
        raise UserError(f"training diverged: {what}; stopped ({kept}); lower --learning-rate or keep --grad-clip on")

    def result(self) -> TrainResult:
        return TrainResult(self.out, self.state.step, self.losses, self.val_losses,
                           self.run_tokens / max(self.train_time, 1e-9), mx.get_peak_memory() / 1e9)  # fmt: skip
