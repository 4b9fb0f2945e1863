"""The quantization report: file size, peak memory, perplexity and decode speed for each storage format.

    python benchmarks/quantization/run.py --model tests/data/trained-small            # REPORT.md's table
    python benchmarks/quantization/run.py --gpt2-shape                                # the 124M targets

The first table converts a trained GPT-2 (see train_small.py) into every format with the public API and
measures each the same way: strided perplexity on held-out text (the last 10% of Python's docs, never
trained on), greedy decoding of 64 tokens, and peak memory as MLX reports it. `--gpt2-shape` checks the
issue's targets on a randomly initialised model of gpt2's exact shape (124M): size and memory do not depend
on what the weights have learned.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sensitivity import compare, log_probs  # noqa: E402
from train_small import TOKENIZER_DIR, held_out_text, with_tokenizer  # noqa: E402

from mlx_gpt2 import load, perplexity, stream_generate  # noqa: E402
from mlx_gpt2.convert import convert  # noqa: E402

# name -> (storage dtype, quantize options, compute dtype). Float formats compute in their own dtype;
# quantized ones keep float32 activations (MLX's CPU quantized kernels are fast only in float32).
FORMATS = {
    "fp32": ("float32", None, "float32"),
    "fp16": ("float16", None, "float16"),
    "bf16": ("bfloat16", None, "bfloat16"),
    "8-bit": ("float32", dict(bits=8), None),
    "6-bit": ("float32", dict(bits=6), None),
    "4-bit": ("float32", dict(bits=4), None),
    "4-bit fitted": ("float32", dict(bits=4, fit_scales=True), None),
    "mixed": ("float32", dict(bits=4, recipe="mixed"), None),
    "3-bit": ("float32", dict(bits=3), None),
    "3-bit fitted": ("float32", dict(bits=3, fit_scales=True), None),
}


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 1e6


def decode(model_dir: Path, dtype: str | None, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, peak GB) generating greedily from a fresh lazy load."""
    gc.collect()
    mx.clear_cache()
    model, tokenizer = load(model_dir, dtype=dtype)
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, ignore_eos=True):
        pass
    return last.generation_tps, last.peak_memory


def measure(name: str, model_dir: Path, work: Path, text: str, prompt: list[int], reference, args) -> dict:
    storage, options, compute = FORMATS[name]
    out = convert(model_dir, work / name, dtype=storage, quantize=options)
    config = json.loads((out / "config.json").read_text())
    bpw = config["mlx_gpt2"].get("quantization", {}).get("bits_per_weight")
    tps, peak = decode(out, compute, prompt, args.decode_tokens) if args.decode_tokens else (0.0, 0.0)
    model, tokenizer = load(out, dtype=compute)
    result = perplexity(model, tokenizer, text, context=args.context, stride=args.stride, batch_size=args.batch_size)
    kl, _ = compare(reference[0], model, reference[1])
    return dict(format=name, mb=directory_mb(out), bpw=bpw, peak_mb=peak * 1e3, decode_tps=tps,
                ppl=result.perplexity, tokens=result.tokens, ppl_seconds=result.seconds, kl=kl)


def table(args) -> None:
    model_dir = with_tokenizer(args.model)
    tokenizer = load(model_dir)[1]
    held_out = tokenizer.encode(args.text.read_text() if args.text else held_out_text())
    text = tokenizer.decode(held_out[: args.tokens])
    prompt = held_out[-32:]
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    # KL from the float32 model's next-token distributions: how far each format moved the model.
    windows = mx.array(held_out[: args.kl_tokens]).reshape(-1, args.context)  # [n, context]
    # Kept in numpy: 400 MB of log-probabilities must not count in the peak memory of each format.
    reference = ([np.array(lp) for lp in log_probs(load(model_dir, dtype="float32")[0], windows)], windows)
    rows = []
    for name in args.formats:
        rows.append(measure(name, model_dir, work, text, prompt, reference, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]["ppl"] if rows[0]["format"] == "fp32" else None
    print(f"\nStrided perplexity on the first {rows[0]['tokens'] + 1} held-out tokens (context {args.context}, "
          f"stride {args.stride}); decode: {args.decode_tokens} greedy tokens after a 32-token prompt.\n")
    print("| format | directory | bits/weight | peak memory (decode) | perplexity | vs fp32 | KL from fp32 | decode tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        change = f"{(r['ppl'] - base) / base * 100:+.3f}%" if base else "-"
        bpw = f"{r['bpw']:.2f}" if r["bpw"] else "-"
        print(f"| {r['format']} | {r['mb']:.1f} MB | {bpw} | {r['peak_mb']:.1f} MB | {r['ppl']:.3f} | {change} | {r['kl']:.1e} | {r['decode_tps']:.1f} |")


def gpt2_shape(args) -> None:
    """The issue's targets on a 124M model: 4-bit directory <= 100 MB, <= 150 MB peak generating 256 tokens."""
    import safetensors.torch
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    work = Path(tempfile.mkdtemp(prefix="gpt2-shape-"))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    source = work / "hub"
    source.mkdir()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps({**GPT2Config().to_dict(), "n_ctx": 1024}))
    for name in ("vocab.json", "merges.txt"):
        (source / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    del hf, state
    print("| gpt2 (124M shape) | directory | bits/weight | peak memory, 256 tokens | decode tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, options in [("fp32", None), ("4-bit", dict(bits=4)), ("mixed", dict(bits=4, recipe="mixed"))]:
        start = time.perf_counter()
        out = convert(source, work / name, quantize=options)
        bpw = json.loads((out / "config.json").read_text())["mlx_gpt2"].get("quantization", {}).get("bits_per_weight")
        seconds = time.perf_counter() - start
        tps, peak = decode(out, None, [464, 3290, 286, 1204, 318], 256) if name != "fp32" or args.fp32_decode else (0.0, 0.0)
        print(f"| {name} | {directory_mb(out):.1f} MB | {bpw or '-'} | {peak * 1e3:.0f} MB | {tps:.1f} |  (converted in {seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("tests/data/trained-small"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=4096, help="Score the first N held-out tokens.")
    parser.add_argument("--text", type=Path, help="Score this text file instead of the held-out docs.")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64, help="0: skip the decode measurement.")
    parser.add_argument("--kl-tokens", type=int, default=2048, help="Tokens for the KL column (a multiple of --context).")
    parser.add_argument("--gpt2-shape", action="store_true", help="Measure the 124M targets instead.")
    parser.add_argument("--fp32-decode", action="store_true", help="With --gpt2-shape, also decode the float32 model.")
    args = parser.parse_args()
    gpt2_shape(args) if args.gpt2_shape else table(args)


if __name__ == "__main__":
    main()
