"""Convert GPT-2 to 4 bits, load it, measure what quantizing cost, and generate: public API only.

    python examples/quantize.py gpt2                        # a Hub repo id (downloaded once) -> ./gpt2-4bit
    python examples/quantize.py path/to/model /tmp/gpt2-4bit

What 4 bits cost is measured as perplexity on 4096 tokens of Python's own documentation (it ships with
Python), against the float model: enough text for the difference to mean something. On a CPU with MLX's
reference BLAS that takes a minute or two per model; fewer tokens give a number, not a measurement.
"""

import argparse
import sys
from pathlib import Path

from mlx_gpt2 import QuantizeConfig, UserError, load, perplexity, stream_generate
from mlx_gpt2.convert import convert

TOKENS = 4096


def held_out_text(tokenizer, tokens: int) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert GPT-2 to 4 bits and measure what it cost.")
    parser.add_argument("model", help="Hub repo id or GPT-2 directory (float)")
    parser.add_argument("out", nargs="?", type=Path, help="where the 4-bit model goes (default: ./NAME-4bit)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens of Python's docs to score (default {TOKENS})")
    args = parser.parse_args()
    out = args.out or Path(Path(args.model).name + "-4bit")

    # 4 bits, 64 weights per scale; the tied embedding/output head too (keep_embeddings=True leaves it float).
    convert(args.model, out, quantize=QuantizeConfig(bits=4, group_size=64), force=True)
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wrote {out}: {size_mb:.1f} MB")

    model, tokenizer = load(out)
    float_model, _ = load(args.model)
    text = held_out_text(tokenizer, args.tokens)
    results = {name: perplexity(m, tokenizer, text) for name, m in [("float", float_model), ("4-bit", model)]}
    for name, result in results.items():
        print(f"{name}: perplexity {result.perplexity:.3f} over {result.tokens} tokens of Python's docs")
    change = results["4-bit"].perplexity / results["float"].perplexity - 1
    print(f"4 bits changed perplexity by {change:+.2%}")

    prompt = "The meaning of life is"
    print(prompt, end="", flush=True)
    for response in stream_generate(model, tokenizer, prompt, max_tokens=40):
        print(response.text, end="", flush=True)
    print(f"\n[{response.generation_tps:.1f} tokens/s, peak memory {response.peak_memory * 1e3:.0f} MB]")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
