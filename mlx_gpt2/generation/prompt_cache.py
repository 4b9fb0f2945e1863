"""Prompt caching: the KV cache of a long prefix saved to a file, reused to skip its prefill.

The file is safetensors: `{layer}.keys` / `{layer}.values` arrays `[1, n_head, tokens, head_dim]`, and
metadata holding the prefix's token ids (and text), the model's config and a fingerprint of the model
(config, dtypes and a sample of every weight), so a cache made by another model is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from ..cache import KVCache, make_cache
from ..backend.cpu_quantized import stored_parameters
from ..convert.read import check_safetensors
from ..errors import UserError
from ..fileio import atomic_file, parse_json
from ..model import GPT2, check_ids
from ..tokenizer import Tokenizer
from .core import prefill

FORMAT = "mlx-gpt2-prompt-cache/1"


def model_fingerprint(model: GPT2) -> str:
    """A short hash of the config and of every parameter's name, shape, dtype and first values, as a
    checkpoint stores them (the same for every weight layout `load` may choose)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, value in stored_parameters(model):
        digest.update(f"{name}:{value.shape}:{value.dtype}".encode())
        # A sample of each tensor tells fine-tunes apart without reading whole weights.
        digest.update(memoryview(value.reshape(-1)[:64].astype(mx.float32)))
    return digest.hexdigest()[:32]


def make_prompt_cache(model: GPT2, tokens: list[int], *, prefill_step_size: int | None = None) -> list[KVCache]:
    """Prefill a fresh cache with all of `tokens`."""
    if not tokens:
        raise UserError("the prompt to cache is empty; give the prefix text to cache")
    tokens = check_ids(tokens, model.config.vocab_size, what="the prompt to cache")
    window = model.config.n_positions
    if len(tokens) > window:
        raise UserError(f"the prompt to cache is {len(tokens)} tokens, longer than the model's window of {window}")
    cache = make_cache(len(model.h), len(tokens))
    prefill(model, mx.array(tokens), cache, prefill_step_size)
    return cache


def save_prompt_cache(
    path: str | Path, cache: list[KVCache], tokens: list[int], model: GPT2, *, text: str | None = None
) -> Path:
    """Write the cache of `tokens` (all filled positions) atomically to `path`; return the path."""
    if cache[0].offset != len(tokens):
        raise ValueError(f"the cache holds {cache[0].offset} positions but {len(tokens)} token ids were given")
    if cache[0].keys.shape[0] != 1:
        raise ValueError("only a single-sequence cache (batch 1) can be saved")
    arrays = {}
    for i, c in enumerate(cache):
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.state  # [1, n_head, tokens, head_dim] each
    metadata = {
        "format": FORMAT, "tokens": json.dumps(tokens), "text": json.dumps(text),
        "fingerprint": model_fingerprint(model), "config": json.dumps(model.config.to_dict()),
    }
    with atomic_file(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata)
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a prompt-cache file, read from its header alone; a file that is not one is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt cache {path} not found; make one with `mlx-gpt2 cache-prompt`")
    try:  # safetensors: an 8-byte little-endian header length, then a JSON header with __metadata__
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(min(size, 1 << 26)))["__metadata__"]
    except (ValueError, KeyError, TypeError, RecursionError):
        metadata = {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not an mlx-gpt2 prompt cache; make one with `mlx-gpt2 cache-prompt`")
    missing = [key for key in ("tokens", "fingerprint") if not isinstance(metadata.get(key), str)]
    if missing:
        raise UserError(f"prompt cache {path} is damaged: it has no {' or '.join(missing)}; recreate it with `mlx-gpt2 cache-prompt`")
    return metadata


def load_prompt_cache(path: str | Path, model: GPT2) -> tuple[list[KVCache], list[int]]:
    """(cache, token ids of the cached prefix); refuses a cache that another model made, or a damaged one."""
    metadata = read_metadata(path)
    if metadata["fingerprint"] != model_fingerprint(model):
        raise UserError(
            f"prompt cache {path} was made by another model (fingerprint {metadata['fingerprint'][:32]}, this model's "
            f"is {model_fingerprint(model)}); recreate it with `mlx-gpt2 cache-prompt` and this --model"
        )
    tokens = parse_json(metadata["tokens"], source=f"prompt cache {path}'s token list", hint="; recreate it")
    if not isinstance(tokens, list):
        raise UserError(f"prompt cache {path} is damaged: its token list is not a list; recreate it")
    tokens = check_ids(tokens, model.config.vocab_size, what=f"prompt cache {path}")
    try:
        check_safetensors(Path(path))
        arrays = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as error:
        raise UserError(f"prompt cache {path} is truncated or damaged ({str(error).splitlines()[0][:120]}); recreate it") from None
    expected = (1, model.config.n_head, len(tokens), model.config.head_dim)
    names = [f"{i}.{kind}" for i in range(len(model.h)) for kind in ("keys", "values")]
    wrong = [n for n in names if n not in arrays or tuple(arrays[n].shape) != expected
             or not mx.issubdtype(arrays[n].dtype, mx.floating)]  # fmt: skip
    if wrong or len(arrays) != len(names):
        raise UserError(
            f"prompt cache {path} is damaged: {wrong[0] if wrong else 'extra arrays'} is not keys or values of shape "
            f"{expected} for {len(tokens)} tokens; recreate it"
        )
    cache = make_cache(len(model.h))
    for i, c in enumerate(cache):
        c.state = arrays[f"{i}.keys"], arrays[f"{i}.values"]
    return cache, tokens


def check_prefix(cached: list[int], prompt: list[int]) -> None:
    """The cached ids must start the full prompt's ids, or the cache describes another text."""
    if prompt[: len(cached)] == cached:
        return
    at = next((i for i, (a, b) in enumerate(zip(cached, prompt)) if a != b), min(len(cached), len(prompt)))
    if at < len(cached) - 1:
        raise UserError(
            f"the prompt does not start with the cached prefix (they differ at token {at} of {len(cached)}); "
            f"use the prompt cache made for this text, or make a new one with `mlx-gpt2 cache-prompt`"
        )
    raise UserError(
        "the prompt's last cached token differs from the cached prefix's: the seam between cached and new "
        "text tokenizes differently; end the cached text before a space, not after one"
    )


def cache_prompt(model: GPT2, tokenizer: Tokenizer, prompt: str, path: str | Path) -> int:
    """Prefill `prompt` and save its cache (with its text) to `path`; return the number of tokens cached."""
    tokens = tokenizer.encode(prompt)
    save_prompt_cache(path, make_prompt_cache(model, tokens), tokens, model, text=prompt)
    return len(tokens)


def prepare_cached_prompt(
    path: str | Path, model: GPT2, tokenizer: Tokenizer, rest: str
) -> tuple[list[KVCache], list[int]]:
    """(cache, full prompt ids) for the cached text followed by `rest`, ready for stream_generate(cache=...)."""
    metadata = read_metadata(path)
    cache, cached = load_prompt_cache(path, model)
    text = parse_json(metadata.get("text", "null"), source=f"prompt cache {path}'s text", hint="; recreate it")
    if text is not None and not isinstance(text, str):
        raise UserError(f"prompt cache {path} is damaged: its text is not a string; recreate it")
    # Tokenizing the whole text is what recomputing from scratch would do; the cache must be its prefix.
    ids = tokenizer.encode(text + rest) if text is not None else cached + tokenizer.encode(rest)
    check_prefix(cached, ids)
    if len(ids) > model.config.n_positions:
        raise UserError(
            f"the cached prefix plus the prompt is {len(ids)} tokens, longer than the model's window of "
            f"{model.config.n_positions}; a prompt cache cannot slide, so shorten the prompt"
        )
    return cache, ids
