"""Per-layer quantization sensitivity: how far the model moves when ONE layer alone is quantized.

This is the measurement behind `--recipe mixed` (see the README). Every other layer stays in float32; the
layer under test goes to `--bits`. Two numbers per layer, on held-out text in non-overlapping windows:
the mean KL divergence of its next-token distributions from the float model's (how far it moved; always
>= 0, and far less noisy than perplexity on a small model), and the change of perplexity. Layers with the
largest KL per weight are the ones worth 8 bits.

    python benchmarks/quantization/sensitivity.py --model tests/data/trained-small --bits 3

(On Linux, `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0` makes MLX's float32 matmuls ~10x
faster; the numbers do not change.)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_small import held_out_text, with_tokenizer  # noqa: E402

from mlx_gpt2 import load  # noqa: E402
from mlx_gpt2.quant.quantize import layer_params  # noqa: E402


def log_probs(model, windows: mx.array) -> list[mx.array]:
    """[n, context] token windows -> per window [context - 1, vocab] next-token log-probabilities."""
    out = []
    for w in windows:
        lp = nn.log_softmax(model(w[None, :-1])[0].astype(mx.float32), axis=-1)
        mx.eval(lp)
        out.append(lp)
    return out


def compare(reference: list[mx.array], model, windows: mx.array) -> tuple[float, float]:
    """(mean KL(reference || model) in nats, perplexity) over the windows' targets."""
    kl, nll, n = 0.0, 0.0, 0
    for ref, w, lp in zip(reference, windows, log_probs(model, windows)):
        ref = mx.array(ref)  # the reference may be kept in numpy, outside MLX's memory accounting
        kl += (mx.exp(ref) * (ref - lp)).sum().item()
        nll -= mx.take_along_axis(lp, w[1:, None], axis=-1).sum().item()
        n += w.shape[0] - 1
    return kl / n, math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("tests/data/trained-small"))
    parser.add_argument("--tokens", type=int, default=2048, help="Use the first N held-out tokens.")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    model_dir = with_tokenizer(args.model)
    model, tokenizer = load(model_dir, dtype="float32")
    ids = tokenizer.encode(held_out_text())[: args.tokens]
    windows = mx.array(ids[: len(ids) // args.context * args.context]).reshape(-1, args.context)  # [n, context]
    reference = log_probs(model, windows)
    _, base = compare(reference, model, windows)
    print(f"float32: perplexity {base:.3f} on {windows.size} held-out tokens ({len(windows)} windows of {args.context})")
    layers = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and p != "wpe"]
    print(f"| layer alone at {args.bits} bits | weights | KL from float (nats) | KL per million weights | perplexity change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path in sorted(layers, key=_tree_order):
        one, _ = load(model_dir, dtype="float32")
        size = dict(one.named_modules())[path].weight.size
        nn.quantize(one, class_predicate=lambda p, _: layer_params(args.bits, args.group_size) if p == path else False)
        kl, ppl = compare(reference, one, windows)
        print(f"| {path} | {size:,} | {kl:.2e} | {kl / size * 1e6:.2e} | {(ppl - base) / base * 100:+.3f}% |", flush=True)


def _tree_order(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


if __name__ == "__main__":
    main()
