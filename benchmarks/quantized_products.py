"""One quantized product at gpt2's shapes: MLX's layer on the stored form against mlx-gpt2's CPU layer.

    python benchmarks/quantized_products.py [--bits 4] [--rows 1,8,512]

For each of gpt2's four block products and its 50257-wide head, times `nn.QuantizedLinear` (MLX's
`quantized_matmul(transpose=True)`, what mlx-lm runs) and `InputMajorQuantizedLinear` built from it (the
same arrays re-laid, mlx_gpt2/cpu_quantized.py), and checks that they agree. Medians of 20 calls (5 above 8 rows), in
milliseconds, weights already in memory. The numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_gpt2.backend.cpu_quantized import InputMajorQuantizedLinear

SHAPES = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768), "head": (768, 50257)}


def median_ms(f, runs: int = 20) -> float:
    for _ in range(3):
        mx.eval(f())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rows", default="1,8,128")
    args = parser.parse_args()
    mx.random.seed(0)
    print(f"| product ({args.bits}-bit, group 64) | rows | MLX, stored form ms | mlx-gpt2 CPU layer ms | speed-up | max rel. diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (k, n) in SHAPES.items():
        stock = nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=name != "head"), group_size=64, bits=args.bits)
        ours = InputMajorQuantizedLinear(stock)
        for rows in map(int, args.rows.split(",")):
            if name == "head" and rows > 8:
                continue  # generation runs the head on one row per sequence; 128 rows take minutes in MLX's kernel
            x = mx.random.normal((rows, k))
            diff = float(mx.abs(ours(x) - stock(x)).max() / mx.abs(stock(x)).max())
            runs = 20 if rows <= 8 else 5
            theirs_ms, ours_ms = median_ms(lambda: stock(x), runs), median_ms(lambda: ours(x), runs)
            print(f"| {name} {k} -> {n} | {rows} | {theirs_ms:.2f} | {ours_ms:.2f} | {theirs_ms / ours_ms:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
