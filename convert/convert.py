"""Hub or local GPT-2 checkpoint -> an MLX model directory, written atomically."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlx_gpt2.backend import parse_dtype
from mlx_gpt2.config import GPT2Config, read_config_json
from mlx_gpt2.errors import CheckpointError, UserError
from mlx_gpt2.fileio import atomic_directory, check_output, claim_output, write_json_atomic
from mlx_gpt2.quant.quantize import QuantizeConfig, quantize_weights
from mlx_gpt2.tokenizer import Tokenizer, has_tokenizer_files
from mlx_gpt2.convert.hub import resolve_source
from mlx_gpt2.convert.read import read_tensors
from mlx_gpt2.convert.weights import (
    MLX_PREFIX, add_mlx_prefix, check_finite, check_sizes, check_weights, hf_to_mlx, mlx_to_hf, strip_mlx_prefix,
)

FORMAT_VERSION = 1
GPT2_VOCAB_SIZE = 50257  # the bundled tokenizer's: a model with at least this many embeddings can use it


def read_model_dir(directory: Path) -> tuple[GPT2Config, dict, dict[str, mx.array]]:
    """(config, raw config.json, weights in our names and layout) from any GPT-2 directory we can read.

    Names prefixed with `model.` come from mlx-lm's converter or ours (Linear layout already); anything
    else is a transformers checkpoint and goes through the rename/transpose table. Nothing is read but
    headers: the weights stay lazy.
    """
    config_path = directory / "config.json"
    raw_config = read_config_json(config_path)
    config = GPT2Config.from_config_json(raw_config, source=str(config_path))
    tensors = read_tensors(directory)
    if any(k.startswith(MLX_PREFIX) for k in tensors):
        weights = strip_mlx_prefix(tensors)
        if "quantization" in raw_config:  # quantized trees are checked in full when the model is rebuilt
            check_sizes(weights, config, source=str(directory))
        else:
            check_weights(weights, config, source=str(directory))
        return config, raw_config, weights
    return config, raw_config, hf_to_mlx(tensors, config, source=str(directory))


def read_tokenizer(directory: Path, config: GPT2Config) -> Tokenizer:
    """The directory's own tokenizer, or GPT-2's bundled one (with a warning) for a checkpoint that has none.

    A vocabulary larger than the model's is refused: its ids would index past the embedding.
    """
    if has_tokenizer_files(directory):
        tokenizer = Tokenizer.from_dir(directory)
    elif config.vocab_size >= GPT2_VOCAB_SIZE:
        warnings.warn(f"{directory} has no tokenizer files (vocab.json + merges.txt or tokenizer.json); using GPT-2's own BPE")
        tokenizer = Tokenizer.gpt2()
    else:
        raise UserError(
            f"{directory} has no tokenizer files and its vocabulary ({config.vocab_size}) is not GPT-2's; "
            "copy vocab.json and merges.txt (or tokenizer.json) from the model's Hub snapshot"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} "
            "embeddings, so some ids have no embedding; use the tokenizer files that came with these weights"
        )
    return tokenizer


def write_model_dir(
    out: Path, weights: dict[str, mx.array], config: dict, tokenizer: Tokenizer, *, force: bool,
    hf_layout: bool = False,
) -> None:
    """Write safetensors + config.json + vocab.json/merges.txt, all or nothing.

    `hf_layout` writes the Hub's GPT-2 layout instead (bare names, Conv1D weights (in, out)): transformers reads it.
    """
    tensors, layout = (mlx_to_hf(weights), "pt") if hf_layout else (add_mlx_prefix(weights), "mlx")
    with atomic_directory(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": layout})
        write_json_atomic(tmp / "config.json", config)
        tokenizer.save(tmp)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    force: bool = False,
    quantize: QuantizeConfig | dict | bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a GPT-2 checkpoint (Hub repo id or local directory) into an MLX directory at `out`.

    `dtype` is float32, float16 or bfloat16; None keeps the checkpoint's own dtype. `quantize` (True, a
    dict or a QuantizeConfig, see mlx_gpt2.quantize) writes a quantized model, its settings in config.json;
    `progress(layers done, layers)` follows the quantization.
    """
    check_output(out, force=force)  # before any download: fail fast
    spec = QuantizeConfig.coerce(quantize)
    target = parse_dtype(dtype)
    directory = resolve_source(str(source), revision=revision)
    with claim_output(out, force=force, inputs=[directory]) as out:
        config, raw_config, weights = read_model_dir(directory)
        tokenizer = read_tokenizer(directory, config)
        check_finite(weights, source=str(directory))
        if target is not None:
            weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
        new_config = {**raw_config, **config.to_dict()}
        new_config["mlx_gpt2"] = {"format_version": FORMAT_VERSION, "source": str(source), "revision": revision}
        if spec is not None:
            weights, new_config["quantization"], summary = quantize_weights(config, raw_config, weights, spec, progress)
            new_config["quantization_config"] = new_config["quantization"]  # mlx-lm mirrors it there too
            new_config["mlx_gpt2"]["quantization"] = summary
        write_model_dir(out, weights, new_config, tokenizer, force=force)
    return out
