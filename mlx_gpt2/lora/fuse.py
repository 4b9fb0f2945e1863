"""Merge trained adapters into the base weights: an MLX directory that `load` reads, or a transformers one.

The MLX output goes through the converter's own writer; `export_hf` writes the Hub's GPT-2 layout
(bare names, Conv1D weights stored (in, out), safetensors, config.json, vocab.json + merges.txt) through
the same writer and the converter's rename table, so transformers' `GPT2LMHeadModel.from_pretrained` reads it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..backend import parse_dtype
from ..config import read_config_json
from ..convert import read_model_dir, resolve_source, write_model_dir
from ..errors import UserError
from ..fileio import check_output, claim_output
from ..model import GPT2
from ..quant.quantize import QuantizeConfig, is_quantized, plan, to_config
from .layers import fuse_lora, read_adapter_config, recorded_base

FORMAT_VERSION = 1
QUANTIZATION_KEYS = ("quantization", "quantization_config")


def fuse(
    model: str | Path | None,
    adapter_path: str | Path,
    out: str | Path,
    *,
    dequantize: bool = False,
    export_hf: bool = False,
    force: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write `model` with the adapters in `adapter_path` merged into its weights, to `out`.

    `model=None` is the base the adapters were trained on (recorded in adapter_config.json). The merge is
    computed in float32 and written in `dtype`, by default the base's own (a float16 base stays float16).
    A quantized base (QLoRA) stays quantized unless `dequantize`; `export_hf` always writes float weights,
    since transformers' GPT-2 has no MLX quantization.
    """
    from ..loading import load

    target = parse_dtype(dtype)  # bad options fail before anything is read
    check_output(out, force=force, inputs=[adapter_path])  # before the slow load: fail fast, overwrite nothing
    adapter = read_adapter_config(adapter_path)
    model = recorded_base(model, adapter_path)
    base_dir = resolve_source(model)
    with claim_output(out, force=force, inputs=[adapter_path, base_dir]) as out:
        lm, tokenizer = load(model, adapter_path=adapter_path)
        fuse_lora(lm, dequantize=dequantize or export_hf)
        target = target or stored_dtype(base_dir)
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in tree_flatten(lm.parameters())}  # fmt: skip
        config = {k: v for k, v in _base_config(model).items() if k not in (*QUANTIZATION_KEYS, "mlx_gpt2")}
        config.update(lm.config.to_dict())
        if is_quantized(lm):
            config.update(dict.fromkeys(QUANTIZATION_KEYS, _quantization_entry(lm, model, adapter)))
        if not export_hf:
            config["mlx_gpt2"] = {"format_version": FORMAT_VERSION, "source": str(model), "adapters": str(adapter_path)}
        write_model_dir(out, weights, config, tokenizer, force=force, hf_layout=export_hf)
    return out


def stored_dtype(directory: Path) -> mx.Dtype:
    """The float dtype a checkpoint stores its weights in (its final layer norm's: never quantized)."""
    weights = read_model_dir(directory)[2]  # lazy: only headers are read
    return weights["ln_f.weight"].dtype


def _base_config(model: str | Path) -> dict:
    return read_config_json(resolve_source(str(model)) / "config.json")


def _quantization_entry(lm: GPT2, model: str | Path, adapter: dict) -> dict:
    """The fused layers are quantized again exactly as the base was: its own entry, or the plan QLoRA used."""
    saved = _base_config(model).get("quantization")
    if saved is not None:
        return saved
    spec = QuantizeConfig.coerce(adapter.get("quantize"))
    if spec is None:
        raise UserError("the fused model is quantized but neither the base nor the adapters say how; pass --dequantize")
    return to_config(plan(GPT2(lm.config), spec), spec)  # GPT2(config) is lazy: only shapes are read
