"""load(path or repo id) -> (model, tokenizer): lazy, strict."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .backend import default_dtype, parse_dtype, prepare
from .convert import read_model_dir, resolve_source
from .convert.convert import read_tokenizer
from .convert.weights import check_finite, dtype_name
from .errors import CheckpointError
from .lora.layers import check_base, load_adapters, read_adapter_config
from .model import GPT2
from .quant.quantize import QuantizeConfig, apply_saved_quantization, quantize_model, saved_quantization
from .tokenizer import Tokenizer


def build_model(config, weights: dict[str, mx.array], raw_config: dict | None = None) -> GPT2:
    """GPT2(config) with `weights` loaded strictly (every parameter present, nothing extra, right dtypes).

    A config.json with a "quantization" entry first turns the layers it (or the stored scales) names
    into quantized layers, so the packed weights load into the exact model that was saved.
    """
    model = GPT2(config)
    saved = saved_quantization(raw_config or {})
    if saved is not None:
        apply_saved_quantization(model, saved, weights)
    check_dtypes(model, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # only quantized trees get here unchecked: plain ones were checked on reading
        raise CheckpointError(f"weights do not match config.json's quantization: {str(e).splitlines()[0]}; re-convert the model") from None
    return model


def check_dtypes(model: GPT2, weights: dict[str, mx.array]) -> None:
    """Packed quantized weights must be uint32 and everything else floating point, or the model computes garbage."""
    wrong = []
    for name, expected in tree_flatten(model.parameters()):
        stored = weights.get(name)
        if stored is None:
            continue  # load_weights names what is missing
        packed = expected.dtype == mx.uint32
        if (stored.dtype == mx.uint32) != packed or not (packed or mx.issubdtype(stored.dtype, mx.floating)):
            wrong.append(f"{name} is {dtype_name(stored.dtype)}, expected {'uint32' if packed else 'floating point'}")
    if wrong:
        raise CheckpointError(f"weights of the wrong type: {'; '.join(wrong[:4])}{'; ...' if len(wrong) > 4 else ''}; re-convert the model")


def load(
    path_or_repo: str | Path,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    lazy: bool = True,
    layout: str = "auto",
    quantize: QuantizeConfig | dict | bool | None = None,
    adapter_path: str | Path | None = None,
    verify: bool = True,
) -> tuple[GPT2, Tokenizer]:
    """Load a GPT-2 from a Hub repo id, a Hub-format directory, or a converted (ours or mlx-lm) directory.

    Hub-format checkpoints are converted in memory on the way in. Quantized directories come back
    quantized; `quantize=True` (4 bits, group 64), a dict such as `dict(bits=8)` or a `QuantizeConfig`
    quantizes a float model on the way in, layer by layer. `adapter_path` adds the LoRA adapters that
    `mlx-gpt2 lora` saved there (on a base quantized as they were trained, for QLoRA adapters).
    `dtype=None` computes in the backend's default (float32 on the CPU, the checkpoint's dtype on a GPU);
    `layout="auto"` stores the weights the way the backend multiplies fastest (see `mlx_gpt2/backend.py`).
    `verify` refuses weights that hold NaN or infinity (one read of every weight, which `load` then keeps:
    see the README for its cost); with `verify=False` and `lazy=True` weights are read when first used.
    """
    spec = QuantizeConfig.coerce(quantize)  # bad options fail before anything is read
    if adapter_path is not None and spec is None:
        spec = QuantizeConfig.coerce(read_adapter_config(adapter_path).get("quantize"))
    directory = resolve_source(str(path_or_repo), revision=revision)
    config, raw_config, weights = read_model_dir(directory)
    tokenizer = read_tokenizer(directory, config)
    target = parse_dtype(dtype)
    want = lambda v: target if target is not None else default_dtype(v.dtype)  # None: the backend's default
    weights = {k: v.astype(want(v)) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != want(v) else v
               for k, v in weights.items()}
    model = build_model(config, weights, raw_config)
    del weights  # the model holds them now; an extra reference would keep originals alive past `prepare`
    if verify:  # before quantizing on the fly, which would turn a NaN weight into NaN scales
        check_finite(dict(tree_flatten(model.parameters())), source=str(directory))
    if spec is not None:
        quantize_model(model, spec)
    if adapter_path is not None:
        check_base(model, adapter_path, given=str(path_or_repo))
        load_adapters(model, adapter_path)
    prepare(model, layout=layout, evaluate=not lazy or verify)  # the weight layout fastest on this backend
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer
