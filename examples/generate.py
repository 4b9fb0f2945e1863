"""Generate text with GPT-2, using only mlx-gpt2's public API.

    python examples/generate.py gpt2                              # a Hub repo id (downloaded once)
    python examples/generate.py path/to/model "Once upon a time"  # or any GPT-2 directory
"""

import argparse
import sys

from mlx_gpt2 import SamplingOptions, UserError, load, stream_generate


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate text with GPT-2.")
    parser.add_argument("model", help="Hub repo id (gpt2, distilgpt2, ...) or a GPT-2 directory")
    parser.add_argument("prompt", nargs="?", default="The meaning of life is")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    print(args.prompt, end="", flush=True)
    sampling = SamplingOptions(temp=0.8, top_p=0.95, seed=0)
    for response in stream_generate(model, tokenizer, args.prompt, max_tokens=60, sampling=sampling):
        print(response.text, end="", flush=True)
    print(f"\n\n[{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
          f"peak memory {response.peak_memory:.2f} GB]")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a missing model, no network: one line, as the command line says it
        sys.exit(f"error: {error}")
