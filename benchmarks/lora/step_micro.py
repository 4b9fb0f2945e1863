"""One compiled LoRA step on gpt2's shape, timed and its memory measured: the microbenchmark behind RESULTS.md.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/lora/step_micro.py MODEL_DIR \
        [--rows 4] [--no-checkpoint] [--slice 64]

Random tokens, batch `--rows` x 512, LoRA rank 8 on the four projections of every block, AdamW; prints the
step times, tokens/s of the fastest step after the first, and the peak memory above the weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_gpt2 import load
from mlx_gpt2.lora import loss as lora_loss
from mlx_gpt2.lora.layers import LoRASpec, apply_lora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--no-checkpoint", action="store_true")
    p.add_argument("--slice", type=int, default=lora_loss.LOSS_CHUNK, help="tokens per head slice")
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    lora_loss.LOSS_CHUNK = a.slice
    model, _ = load(a.model)
    apply_lora(model, LoRASpec(num_layers=len(model.h)))
    mx.random.seed(0)
    x, y = (mx.random.randint(0, model.config.vocab_size, (a.rows, 512)) for _ in range(2))
    mask = mx.ones((a.rows, 512))
    loss_and_grad = nn.value_and_grad(model, functools.partial(lora_loss.loss_fn, checkpoint=not a.no_checkpoint, fused_head=True))
    optimizer = optim.AdamW(2e-4)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    @functools.partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array, mask: mx.array) -> mx.array:
        (loss, _), grads = loss_and_grad(model, x, y, mask)
        optimizer.update(model, grads)
        return loss

    mx.eval(model.parameters())
    base = mx.get_active_memory()
    times = []
    for _ in range(a.steps):
        tic = time.perf_counter()
        mx.eval(step(x, y, mask), state)
        times.append(time.perf_counter() - tic)
    print(json.dumps({"rows": a.rows, "checkpoint": not a.no_checkpoint, "slice": a.slice,
                      "step_s": [round(t, 2) for t in times], "tokens_per_s": round(a.rows * 512 / min(times[1:]), 1),
                      "peak_above_weights_gb": round((mx.get_peak_memory() - base) / 1e9, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
