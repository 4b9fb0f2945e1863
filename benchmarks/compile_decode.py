"""Does `mx.compile` speed up the decode step on this backend? An experiment, kept so it can be rerun.

    python benchmarks/compile_decode.py [--shape gpt2] [--context 500] [--steps 20]

`mx.compile` traces a function once per input shape. The KV cache grows by one position per token, so
the step mlx-gpt2 runs (`model(token, cache)`, attention over `offset` keys) changes shape every token.
The compilable design measured here keeps the shapes fixed: a cache of fixed capacity written with
`mx.slice_update` at a position held in an array, and attention over the whole capacity with a mask
that hides the unwritten slots. Three steps are timed, each producing the same logits:

  plain              mlx-gpt2's step: growing slices of a preallocated cache
  fixed              the fixed-shape step, not compiled (what the masking costs)
  fixed, compiled    the same, through mx.compile (what compiling saves)

Also: GPT-2's tanh GELU (8 elementwise ops) compiled into one kernel, and not.
Times are process CPU ms per token (medians); wall ms in parentheses.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import mlx.core as mx

from mlx_gpt2 import GPT2, make_cache
from mlx_gpt2.backend import use_input_major
from benchmarks.bench_runs import SHAPES
from mlx_gpt2.config import GPT2Config
from profile_decode import cpu_now, timed


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU as eight separate elementwise ops (mlx_gpt2.model compiles this into one)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def fixed_shape_step(model: GPT2, capacity: int):
    """step(token [1,1], position [1], keys, values) -> (logits, keys, values), shapes independent of position."""

    def step(token, position, keys, values):
        x = model.wte(token) + model.wpe(position)[None]
        visible = mx.arange(capacity) <= position  # [capacity]: slots written so far, this token's included
        new_keys, new_values = [], []
        for block, k_cache, v_cache in zip(model.h, keys, values):
            attn = block.attn
            q, k, v = mx.split(attn.c_attn(block.ln_1(x)), 3, axis=-1)
            # [1, 1, D] -> [1, n_head, 1, head_dim]
            q, k, v = (t.reshape(1, 1, attn.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
            k_cache = mx.slice_update(k_cache, k, position, axes=(2,))
            v_cache = mx.slice_update(v_cache, v, position, axes=(2,))
            out = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=attn.scale, mask=visible)
            x = x + attn.c_proj(out.transpose(0, 2, 1, 3).reshape(1, 1, -1))
            x = x + block.mlp(block.ln_2(x))
            new_keys.append(k_cache)
            new_values.append(v_cache)
        return model.head(model.ln_f(x)), new_keys, new_values

    return step


def per_token(step, state, steps: int) -> tuple[float, float]:
    """CPU and wall ms per token of `steps` greedy steps through `step(token, position, keys, values)`."""
    position, keys, values = state
    token, cpu, wall = mx.array([[5]]), [], []
    for _ in range(steps):
        c, w = cpu_now(), time.perf_counter()
        logits, keys, values = step(token, position, keys, values)
        token = mx.argmax(logits[:, -1], axis=-1)[None]
        mx.eval(token, keys, values)
        cpu.append(cpu_now() - c)
        wall.append(time.perf_counter() - w)
        position = position + 1
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    capacity = args.context + args.steps + 1
    model = use_input_major(GPT2(GPT2Config(**SHAPES[args.shape])), evaluate=True)
    mx.eval(model.parameters())
    cache = make_cache(len(model.h), capacity)
    model.hidden(mx.random.randint(0, 50000, (1, args.context), key=mx.random.key(0)), cache)
    mx.eval([c.keys for c in cache])
    start = lambda: (mx.array([args.context]), [c.keys for c in cache], [c.values for c in cache])

    def plain(token, position, keys, values):  # mlx-gpt2's own step; the cache object carries the state
        return model(token, cache), keys, values

    step = fixed_shape_step(model, cache[0].keys.shape[2])  # the buffer, rounded up to the cache's step
    reference = model(mx.array([[5]]), cache)[0, -1]
    for c in cache:
        c.offset = args.context
    fixed = step(mx.array([[5]]), *start())[0][0, -1]
    print(f"max |logit difference| fixed-shape vs plain: {mx.abs(fixed - reference).max().item():.2e}\n")
    rows = {}
    for name, fn in (("plain", plain), ("fixed", step), ("fixed, compiled", mx.compile(step))):
        for c in cache:
            c.offset = args.context
        rows[name] = per_token(fn, start(), args.steps)
    h = mx.random.normal((1, 1, 4 * model.config.n_embd))
    rows["gelu"] = timed(lambda: gelu_tanh(h), 50)
    compiled_gelu = mx.compile(gelu_tanh, shapeless=True)  # what mlx_gpt2.model uses
    rows["gelu, compiled"] = timed(lambda: compiled_gelu(h), 50)
    print(f"| {args.shape}, {args.context} tokens of context | CPU ms (wall ms) |\n| --- | --- |")
    for name, (cpu, wall) in rows.items():
        print(f"| {name} | {cpu:.3f} ({wall:.3f}) |")


if __name__ == "__main__":
    main()
