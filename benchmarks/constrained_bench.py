"""Constrained generation: the engines compared on GPT-2's vocabulary, and the mask's cost per token.

    python -m benchmarks.constrained_bench [--model DIR] [--tokens 48]

1. llguidance and outlines-core, each with a tokenizer built from our vocabulary: grammar compile time and
   the time to compute one next-token mask, averaged over the steps of a valid output (the JSON Schema of
   tests/test_constrained.py, and its regular expression).
2. Decoding with and without the constraint (llguidance, the engine chosen), batch 1 and batch 8, greedy,
   on a gpt2-shaped model (random weights, `bench_runs.make_source`), MLX's CPU backend: the per-token
   overhead of the mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_constrained import REGEX, SCHEMA  # noqa: E402  (the tests' own constraints)

from mlx_gpt2 import (  # noqa: E402
    SamplingOptions,
    batch_generate_response,
    generate,
    load,
    stream_generate,
)
from mlx_gpt2.generation.constrained import Constraint, engine_tokenizer  # noqa: E402

from .bench_runs import make_source  # noqa: E402


def llguidance_masks(tokenizer, constraint: Constraint, tokens: list[int]) -> tuple[float, float]:
    import llguidance

    tic = time.perf_counter()
    matcher = llguidance.LLMatcher(engine_tokenizer(tokenizer), constraint.grammar, log_level=0)
    compile_s = time.perf_counter() - tic
    times = []
    for t in tokens:
        tic = time.perf_counter()
        matcher.compute_bitmask()
        times.append(time.perf_counter() - tic)
        matcher.consume_token(t)
    return compile_s, statistics.mean(times)


def outlines_masks(tokenizer, regex: str, tokens: list[int]) -> tuple[float, float]:
    from outlines_core import Guide, Index, Vocabulary

    tic = time.perf_counter()
    vocab = {}
    for i in range(tokenizer.vocab_size):
        if i != tokenizer.eos_token_id:
            vocab.setdefault(tokenizer.id_to_bytes(i), []).append(i)
    index = Index(regex, Vocabulary(tokenizer.eos_token_id, vocab))
    compile_s = time.perf_counter() - tic
    guide, mask = Guide(index), np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for t in tokens:
        tic = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        times.append(time.perf_counter() - tic)
        guide.advance(t)
    return compile_s, statistics.mean(times)


def decode_rate(model, tokenizer, batch: int, tokens: int, constraint: Constraint | None) -> float:
    """Generated tokens/s, greedy, prompt excluded (the response's own generation rate)."""
    if batch == 1:
        last = None
        for last in stream_generate(model, tokenizer, "Record:", max_tokens=tokens, sampling=SamplingOptions(constraint=constraint)):
            pass
        return last.generation_tps
    out = batch_generate_response(model, tokenizer, ["Record:"] * batch, max_tokens=tokens, constraints=constraint)
    return out.generation_tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--tokens", type=int, default=48)
    a = p.parse_args()
    directory = a.model or make_source("gpt2", Path("~/.cache/mlx-gpt2/bench/gpt2/hub").expanduser())
    model, tokenizer = load(directory)
    schema = Constraint.of(tokenizer, json_schema=SCHEMA)
    regex = Constraint.of(tokenizer, regex=REGEX)
    valid_json = tokenizer.encode(json.dumps({"id": 7, "label": "dog", "code": "AB12", "scores": [1, -2]}, separators=(",", ":")))
    valid_regex = tokenizer.encode("maybe, 12 cats.")
    from outlines_core.json_schema import build_regex_from_schema

    json_regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    rows = []
    for name, constraint, pattern, ids in [("json schema", schema, json_regex, valid_json), ("regex", regex, REGEX, valid_regex)]:
        ll = llguidance_masks(tokenizer, constraint, ids)
        oc = outlines_masks(tokenizer, pattern, ids)
        rows.append(f"| {name} | llguidance | {ll[0] * 1e3:.1f} ms | {ll[1] * 1e6:.0f} us |")
        rows.append(f"| {name} | outlines-core | {oc[0] * 1e3:.0f} ms | {oc[1] * 1e6:.0f} us |")
    print("| constraint | engine | compile | mask per token |\n| --- | --- | ---: | ---: |\n" + "\n".join(rows))
    # One short warm-up of each path, then the measured runs.
    generate(model, tokenizer, "Record:", max_tokens=4)
    generate(model, tokenizer, "Record:", max_tokens=4, regex=REGEX)
    print("\n| batch | free tokens/s | constrained tokens/s | overhead per token |\n| ---: | ---: | ---: | ---: |")
    loose = Constraint.of(tokenizer, regex="[a-z ]{%d}" % (a.tokens * 4))  # never completes before max_tokens
    for batch in (1, 8):
        free = decode_rate(model, tokenizer, batch, a.tokens, None)
        held = decode_rate(model, tokenizer, batch, a.tokens, loose)
        print(f"| {batch} | {free:.1f} | {held:.1f} | {(free / held - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
