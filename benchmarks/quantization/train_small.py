"""Train a small GPT-2 on Python's own documentation, with torch + transformers, and save it in Hub format.

Quantization error only means something on a model that has learned text: random weights have no
structure for rounding to destroy. This script trains one, deterministically, on the English text that
ships with every Python (`pydoc_data/topics.py`, ~139K GPT-2 tokens). The first 90% of the tokens train
it; the last 10% are held out (`held_out_text()`) for the perplexity tables in REPORT.md.

torch does the training because its CPU BLAS is fast; MLX's CPU wheel bundles a reference BLAS.

    python benchmarks/quantization/train_small.py --out trained-4x256                    # REPORT.md's model
    python benchmarks/quantization/train_small.py --out tests/data/trained-small \\
        --layers 2 --width 128 --heads 4 --steps 1500 --dtype float16 --no-tokenizer     # the tests' model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import tiktoken
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mlx_gpt2.tokenizer import BUNDLED_DIR as TOKENIZER_DIR  # GPT-2's BPE files, shipped in the package
HELD_OUT = 0.1  # the last 10% of the corpus is never trained on


def corpus_text() -> str:
    """Python's documentation topics, joined in a fixed order (sorted by topic name)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def split_text() -> tuple[str, str]:
    """(training text, held-out text): the corpus cut at 90% of its characters, on a paragraph boundary."""
    text = corpus_text()
    cut = text.index("\n\n", int(len(text) * (1 - HELD_OUT)))
    return text[:cut], text[cut + 2 :]


def held_out_text() -> str:
    return split_text()[1]


def with_tokenizer(model_dir: Path) -> Path:
    """A model directory saved without vocab.json/merges.txt -> a temporary copy with them."""
    if (model_dir / "vocab.json").exists() or (model_dir / "tokenizer.json").exists():
        return model_dir
    tmp = Path(tempfile.mkdtemp(prefix="model-"))
    for path in model_dir.iterdir():
        shutil.copyfile(path, tmp / path.name)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, tmp / name)
    return tmp


def encode(text: str) -> np.ndarray:
    # tiktoken's gpt2 ids equal transformers' GPT-2 tokenizer's; offline, its download cache is usually
    # empty, and our own tokenizer (the same ids) reads the BPE files shipped in the package.
    try:
        ids = tiktoken.get_encoding("gpt2").encode(text, allowed_special=set())
    except Exception:
        from mlx_gpt2.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(TOKENIZER_DIR).encode(text)
    return np.asarray(ids, dtype=np.int64)


def batches(tokens: np.ndarray, *, context: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of random windows [batch, context + 1] from `tokens`, reproducibly."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - context - 1, batch_size)
        yield torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]))


def lr_at(step: int, *, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokens: np.ndarray, context: int) -> float:
    """Perplexity over non-overlapping windows (a quick training-time check; REPORT.md uses strided)."""
    model.eval()
    n = (len(tokens) - 1) // context
    x = torch.from_numpy(tokens[: n * context + 1])
    inputs, labels = x[:-1].view(n, context), x[1:].view(n, context)
    loss = sum(
        torch.nn.functional.cross_entropy(model(inputs[i : i + 16]).logits.flatten(0, 1), labels[i : i + 16].flatten(), reduction="sum")
        for i in range(0, n, 16)
    )
    model.train()
    return math.exp(loss.item() / labels.numel())


def train(args: argparse.Namespace, on_checkpoint=None) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    train_text, test_text = split_text()
    train_ids, test_ids = encode(train_text), encode(test_text)
    print(f"corpus: {len(train_ids)} training tokens, {len(test_ids)} held-out tokens")
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.context, vocab_size=50257,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
    )
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.perf_counter()
    for step, batch in enumerate(batches(train_ids, context=args.context, batch_size=args.batch_size, steps=args.steps, seed=args.seed)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps=args.steps, peak=args.lr)
        loss = _loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)
        if on_checkpoint and args.save_every and step % args.save_every == args.save_every - 1:
            on_checkpoint(model)  # a usable model early, on a slow or shared machine
    print(f"held-out perplexity (context {args.context}, non-overlapping): {evaluate(model, test_ids, args.context):.2f}")
    return model.eval()


def _loss(model: GPT2LMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits  # [B, T, vocab]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def save_hub(model: GPT2LMHeadModel, out: Path, *, dtype: str, tokenizer: bool) -> None:
    """The Hub's GPT-2 layout: bare keys, tied head absent, config.json with n_ctx."""
    out.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, dtype)
    state = {
        name.removeprefix("transformer."): t.detach().to(cast).contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
    tmp = out / ".model.safetensors.tmp"  # then renamed: a reader never sees half a file
    safetensors.torch.save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    c = model.config
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_positions": c.n_positions,
        "n_ctx": c.n_positions, "vocab_size": c.vocab_size, "layer_norm_epsilon": c.layer_norm_epsilon,
        "bos_token_id": 50256, "eos_token_id": 50256, "initializer_range": 0.02, "torch_dtype": dtype,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_DIR / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no-tokenizer", action="store_true", help="Leave vocab.json/merges.txt out.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--save-every", type=int, default=0, help="Also save every N steps (0: only at the end).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    save = lambda model: save_hub(model, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer)
    save(train(args, on_checkpoint=save))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
