"""Looking inside, timed: hooks against TransformerLens, and the fast path's decode with and without them.

    python -m benchmarks.inside_bench [--model DIR] [--tokens 64] [--decode 64]

On a gpt2-shaped model (random weights, `bench_runs.make_source`), MLX's CPU backend, float32:
1. decode tokens/s of `generate` on a fresh model, then on the same model object after `run_with_cache`,
   `ablate` and `saliency` ran on it, interleaved five times (hooks live outside the model, so the fused
   path should not change at all);
2. `run_with_cache` of every point, a full layer x position activation-patching table (resid_pre), and
   integrated gradients (32 steps), each beside the same work in TransformerLens 3.9 / torch autograd on
   the same weights (torch on the CPU, its own threads);
3. the explorer page for a 20-token text: the time to build it and its size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lens import hooked_transformer  # noqa: E402  (the tests' TransformerLens on our weights)

from mlx_gpt2 import load, stream_generate  # noqa: E402
from mlx_gpt2.analysis import (  # noqa: E402
    Ablation, ablate, explorer_data, patch, render_page, run_with_cache, saliency,
)

from .bench_runs import make_source  # noqa: E402

TEXT20 = "The animal didn't cross the street because it was too tired, so it lay down and slept there"  # 20 tokens


def decode_tps(model, tokenizer, tokens: int) -> float:
    """Greedy tokens/s of the generation itself (prompt excluded), as `generate --verbose` reports it."""
    last = None
    for last in stream_generate(model, tokenizer, "The", max_tokens=tokens):
        pass
    return last.generation_tps


def timed(fn, repeat: int = 2) -> float:
    """The median of `repeat` runs after one warm-up (compile caches, allocations)."""
    fn()
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--tokens", type=int, default=24, help="text length for the hook comparisons")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per decode measurement")
    a = p.parse_args()
    import mlx.core as mx
    import torch
    from transformers import GPT2LMHeadModel

    directory = a.model or make_source("gpt2", Path("~/.cache/mlx-gpt2/bench/gpt2/hub").expanduser())
    model, tokenizer = load(directory)
    ids = np.random.default_rng(0).integers(0, 50257, a.tokens).tolist()
    corrupted = list(ids)
    corrupted[a.tokens // 2] = (ids[a.tokens // 2] + 1) % 50257

    fresh, after = [], []
    decode_tps(model, tokenizer, 8)
    for _ in range(5):
        fresh.append(decode_tps(model, tokenizer, a.decode))
        run_with_cache(model, ids)
        ablate(model, ids, Ablation(heads=((3, 1),)))
        saliency(model, ids[:16], 13)
        after.append(decode_tps(model, tokenizer, a.decode))
    print("| decode (greedy, batch 1) | tokens/s |\n| --- | ---: |")
    print(f"| fresh model | {statistics.median(fresh):.1f} ({', '.join(f'{x:.1f}' for x in fresh)}) |")
    print(f"| after hooks, ablation, saliency | {statistics.median(after):.1f} ({', '.join(f'{x:.1f}' for x in after)}) |", flush=True)

    hf = GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    tl = hooked_transformer(hf)
    t_ids = torch.tensor([ids])
    answer, wrong = 13, 11

    def tl_patch():
        from transformer_lens import patching

        with torch.no_grad():
            _, cache = tl.run_with_cache(t_ids)
            patching.get_act_patch_resid_pre(tl, torch.tensor([corrupted]), cache,
                                             lambda logits: logits[0, -1, answer] - logits[0, -1, wrong])

    def torch_ig(steps: int = 32):
        embeds = hf.transformer.wte(t_ids).detach()
        path = (torch.arange(1, steps + 1)[:, None, None] / steps * embeds).requires_grad_()
        hf(inputs_embeds=path).logits[:, -1, answer].sum().backward()

    def tl_cache():
        with torch.no_grad():
            tl.run_with_cache(t_ids)

    rows = [
        ("run_with_cache, every point", lambda: mx.eval(run_with_cache(model, ids)[0]), tl_cache, 3),
        (f"patching table resid_pre ({model.config.n_layer} x {a.tokens})",
         lambda: patch(model, ids, corrupted, answer=answer, wrong=wrong), tl_patch, 1),  # TransformerLens: ~3.5 min a table
        ("integrated gradients, 32 steps", lambda: saliency(model, ids, answer, method="integrated_gradients"), torch_ig, 3),
    ]
    print(f"\n| {a.tokens} tokens | mlx-gpt2 | TransformerLens / torch | ratio |\n| --- | ---: | ---: | ---: |")
    for name, ours, theirs, repeat in rows:
        t_ours, t_theirs = timed(ours, repeat), timed(theirs, repeat)
        print(f"| {name} | {t_ours * 1e3:.0f} ms | {t_theirs * 1e3:.0f} ms | {t_theirs / t_ours:.2f}x |", flush=True)

    tic = time.perf_counter()
    page = render_page(explorer_data(model, tokenizer, TEXT20, name="gpt2"))
    took = time.perf_counter() - tic
    print(f"\nexplorer page, {len(tokenizer.encode(TEXT20))} tokens: {len(page.encode()) / 1e6:.2f} MB, built in {took:.2f} s")


if __name__ == "__main__":
    main()
