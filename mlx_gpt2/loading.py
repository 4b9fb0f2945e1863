"""load(path or repo id) -> (model, tokenizer): lazy, strict."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .convert import read_model_dir, resolve_source
from .convert.convert import parse_dtype
from .model import GPT2
from .tokenizer import Tokenizer


def build_model(config, weights: dict[str, mx.array], raw_config: dict | None = None) -> GPT2:
    """GPT2(config) with `weights` loaded strictly (every parameter present, nothing extra)."""
    model = GPT2(config)
    model.load_weights(list(weights.items()), strict=True)
    return model


def load(
    path_or_repo: str | Path,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    lazy: bool = True,
) -> tuple[GPT2, Tokenizer]:
    """Load a GPT-2 from a Hub repo id, a Hub-format directory, or a converted (ours or mlx-lm) directory.

    Converted directories load lazily: weights are read from disk when first used, unless `lazy=False`.
    Hub-format checkpoints are converted in memory on the way in.
    """
    directory = resolve_source(str(path_or_repo), revision=revision)
    config, raw_config, weights = read_model_dir(directory)
    target = parse_dtype(dtype)
    if target is not None:
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = build_model(config, weights, raw_config)
    if not lazy:
        mx.eval(model.parameters())
    return model, Tokenizer.from_dir(directory)
