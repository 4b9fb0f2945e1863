"""Merge trained adapters into the base weights: an MLX directory that `load` reads, or a transformers one.

The MLX output goes through the converter's own writer; `export_hf` writes the Hub's GPT-2 layout
(bare names, Conv1D weights stored (in, out), safetensors, config.json, vocab.json + merges.txt) through
the same writer and the converter's rename table, so transformers' `GPT2LMHeadModel.from_pretrained` reads it.
"""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from ..convert import resolve_source, write_model_dir
from ..errors import UserError
from ..config import read_config_json
from ..fileio import check_output, claim_output
from ..model import GPT2
from ..quantize import QuantizeConfig, is_quantized, plan, to_config
from .layers import fuse_lora, read_adapter_config

FORMAT_VERSION = 1
QUANTIZATION_KEYS = ("quantization", "quantization_config")


def fuse(
    model: str | Path,
    adapter_path: str | Path,
    out: str | Path,
    *,
    dequantize: bool = False,
    export_hf: bool = False,
    force: bool = False,
) -> Path:
    """Write `model` with the adapters in `adapter_path` merged into its weights, to `out`.

    A quantized base (QLoRA) stays quantized unless `dequantize`; `export_hf` always writes float weights,
    since transformers' GPT-2 has no MLX quantization.
    """
    from ..loading import load

    check_output(out, force=force, inputs=[adapter_path])  # before the slow load: fail fast, overwrite nothing
    adapter = read_adapter_config(adapter_path)
    with claim_output(out, force=force, inputs=[adapter_path, resolve_source(str(model))]) as out:
        lm, tokenizer = load(model, adapter_path=adapter_path)
        fuse_lora(lm, dequantize=dequantize or export_hf)
        weights = dict(tree_flatten(lm.parameters()))
        config = {k: v for k, v in _base_config(model).items() if k not in (*QUANTIZATION_KEYS, "mlx_gpt2")}
        config.update(lm.config.to_dict())
        if is_quantized(lm):
            config.update(dict.fromkeys(QUANTIZATION_KEYS, _quantization_entry(lm, model, adapter)))
        if not export_hf:
            config["mlx_gpt2"] = {"format_version": FORMAT_VERSION, "source": str(model), "adapters": str(adapter_path)}
        write_model_dir(out, weights, config, tokenizer, force=force, hf_layout=export_hf)
    return out


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
