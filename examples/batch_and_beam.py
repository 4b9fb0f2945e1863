"""Batched, speculative and beam-search generation, and a prompt cache, using only mlx-gpt2's public API.

    python examples/batch_and_beam.py gpt2 distilgpt2               # Hub repo ids (downloaded once)
    python examples/batch_and_beam.py path/to/model [path/to/draft]  # without a draft, the model drafts itself
"""

import argparse
import sys
import tempfile
from pathlib import Path

from mlx_gpt2 import (
    Draft, UserError, batch_generate_response, beam_search, generate, load, load_prompt_cache, make_prompt_cache,
    save_prompt_cache, stream_generate,
)


def main() -> None:
    parser = argparse.ArgumentParser(description="Batched, speculative and beam-search generation, and a prompt cache.")
    parser.add_argument("model", help="Hub repo id or GPT-2 directory")
    parser.add_argument("draft", nargs="?", help="a smaller model with the same tokenizer (default: the model itself)")
    args = parser.parse_args()
    prompts = ["The meaning of life is", "Once upon a time, in a land far away,", "Python is", "The weather today"]

    model, tokenizer = load(args.model)
    batch = batch_generate_response(model, tokenizer, prompts, max_tokens=30)
    for prompt, text, reason in zip(prompts, batch.texts, batch.finish_reasons):
        print(f"[batch] {prompt}{text!r} ({reason})")
    print(f"[batch] {batch.generation_tokens} tokens at {batch.generation_tps:.1f} tokens/s over {len(prompts)} rows")

    draft = load(args.draft)[0] if args.draft else model
    drafted = generate(model, tokenizer, prompts[0], max_tokens=30, draft=Draft(draft, num_draft=3))
    assert drafted == batch.texts[0], "greedy speculative output is the target's own"
    print(f"[speculative] {prompts[0]}{drafted!r}")

    for best in beam_search(model, tokenizer, prompts[:2], num_beams=4, max_tokens=20, early_stopping=True):
        print(f"[beam] {best.text!r} score {best.score:.3f} ({best.finish_reason})")

    prefix = "A long preamble that many prompts share."
    ids = tokenizer.encode(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_prompt_cache(Path(tmp) / "prefix.safetensors", make_prompt_cache(model, ids), ids, model)
        cache, cached_ids = load_prompt_cache(path, model)
        full = cached_ids + tokenizer.encode(" The end")
        text = "".join(r.text for r in stream_generate(model, tokenizer, full, cache=cache, max_tokens=20))
        assert text == generate(model, tokenizer, full, max_tokens=20), "a cached prefix changes nothing"
        print(f"[prompt cache] {len(cached_ids)} cached tokens reused: {text!r}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
