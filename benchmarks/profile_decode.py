"""Where one decoded token's time goes: the decode step of mlx-gpt2, component by component.

    python benchmarks/profile_decode.py [--shape gpt2] [--context 512] [--repeats 15] [--bits 4]

Random weights at a real GPT-2 shape (no checkpoint needed). Two kinds of numbers:

- isolated: one component called again and again on the same input. Its weights stay in the CPU's
  caches, so this is the kernel's speed, not what it costs inside a real step.
- in the step: the real step with parts left out (the whole model; the model without the head; ...),
  so differences are what each part costs when all 500 MB of weights stream through memory per token.

Times are process CPU milliseconds (robust on a shared machine: other processes do not add to them) and
wall milliseconds, medians over --repeats. Both weight layouts are measured: "checkpoint" ((out, in) in
memory, as mlx-lm and every checkpoint store them) and "input-major" (mlx-gpt2's CPU default). With
--bits the model is quantized first (group 64, as `convert --quantize`), and "input-major" is the CPU's
quantized layout of mlx_gpt2/cpu_quantized.py.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import mlx.core as mx

from mlx_gpt2 import GPT2, generate_step, make_cache, quantize_model
from mlx_gpt2.backend import prepare
from benchmarks.bench_runs import SHAPES
from mlx_gpt2.config import GPT2Config


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median CPU ms, median wall ms) of evaluating fn()."""
    mx.eval(fn())
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = cpu_now(), time.perf_counter()
        mx.eval(fn())
        cpu.append(cpu_now() - c)
        wall.append(time.perf_counter() - w)
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)


def build(shape: str, layout: str, bits: int | None) -> GPT2:
    model = GPT2(GPT2Config(**SHAPES[shape]))
    mx.eval(model.parameters())
    if bits:
        quantize_model(model, dict(bits=bits))
    return prepare(model, layout=layout, evaluate=True)


def filled_cache(model: GPT2, context: int) -> list:
    cache = make_cache(len(model.h), 1024)
    model.hidden(mx.random.randint(0, 50000, (1, context), key=mx.random.key(0)), cache)
    mx.eval([c.keys for c in cache])
    return cache


def isolated(model: GPT2, cache: list, context: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Each piece of block 0, the head and the sampling, called on its own."""
    block, c0 = model.h[0], cache[0]
    x = mx.random.normal((1, 1, model.config.n_embd), key=mx.random.key(1))
    h = block.mlp.c_fc(x)
    logits = model.head(x)[:, -1].astype(mx.float32)
    mx.eval(h, logits)

    def attention_core():  # cache write + scaled_dot_product_attention over `context` keys, no projections
        c0.offset = context
        q = x.reshape(1, 1, model.config.n_head, -1).transpose(0, 2, 1, 3)
        k, v = c0.update_and_fetch(q, q)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=block.attn.scale)

    parts = {
        "embedding (wte + wpe)": lambda: model.embed(mx.array([[5]]), context),
        "ln_1 (one LayerNorm)": lambda: block.ln_1(x),
        "attn.c_attn (768 -> 2304)": lambda: block.attn.c_attn(x),
        "attention core (cache write + SDPA)": attention_core,
        "attn.c_proj (768 -> 768)": lambda: block.attn.c_proj(x),
        "mlp.c_fc (768 -> 3072)": lambda: block.mlp.c_fc(x),
        "gelu (tanh form)": lambda: block.mlp.act(h),
        "mlp.c_proj (3072 -> 768)": lambda: block.mlp.c_proj(h),
        "ln_f": lambda: model.ln_f(x),
        "output head (768 -> 50257)": lambda: model.head(x),
        "log-softmax + argmax": lambda: mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), -1),
    }
    return {name: timed(fn, repeats) for name, fn in parts.items()}


def in_step(model: GPT2, cache: list, context: int, repeats: int) -> dict[str, tuple[float, float]]:
    """The real step with parts left out; differences are what the parts cost in context."""
    token = mx.array([[5]])

    def at_context(fn):
        def run():
            for c in cache:
                c.offset = context
            return fn()
        return run

    def whole():
        logits = model(token, cache)[:, -1].astype(mx.float32)
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), -1)

    return {
        "step: blocks + head + sampling": timed(at_context(whole), repeats),
        "step: blocks + head": timed(at_context(lambda: model(token, cache)), repeats),
        "step: blocks only (no head)": timed(at_context(lambda: model.hidden(token, cache)), repeats),
    }


def graph_build_ms(model: GPT2, cache: list, context: int, repeats: int) -> float:
    """Python time to build one step's graph (nothing evaluated): the per-token overhead MLX can hide."""
    times = []
    for _ in range(repeats):
        for c in cache:
            c.offset = context
        tic = time.perf_counter()
        model(mx.array([[5]]), cache)
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def generate_step_ms(model: GPT2, context: int, tokens: int) -> tuple[float, float]:
    """CPU and wall ms per token of the public generate_step, decode only."""
    prompt = mx.random.randint(0, 50000, (context,), key=mx.random.key(2)).tolist()
    steps = generate_step(prompt, model, max_tokens=tokens + 1)
    next(steps)
    c, w = cpu_now(), time.perf_counter()
    for _ in steps:
        pass
    return 1e3 * (cpu_now() - c) / tokens, 1e3 * (time.perf_counter() - w) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, default=512, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=24, help="tokens for the generate_step measurement")
    parser.add_argument("--bits", type=int, default=None, help="quantize the model first (e.g. 4)")
    args = parser.parse_args()
    results = {}
    for layout in ("checkpoint", "input-major"):
        model = build(args.shape, layout, args.bits)
        cache = filled_cache(model, args.context)
        results[layout] = {**isolated(model, cache, args.context, args.repeats),
                           **in_step(model, cache, args.context, args.repeats)}
        results[layout]["python: build one step's graph"] = (graph_build_ms(model, cache, args.context, args.repeats), 0.0)
        results[layout]["generate_step, per decoded token"] = generate_step_ms(model, args.context, args.tokens)
        del model, cache
    n_layer = SHAPES[args.shape]["n_layer"]
    kind = f"{args.bits}-bit" if args.bits else "float32"
    print(f"{args.shape} {kind}, {n_layer} blocks, {args.context} tokens in the cache; CPU ms (wall ms), median of {args.repeats}\n")
    print("| component | checkpoint layout | input-major layout |\n| --- | --- | --- |")
    for name in results["checkpoint"]:
        cells = [f"{results[l][name][0]:.3f} ({results[l][name][1]:.3f})" for l in ("checkpoint", "input-major")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
