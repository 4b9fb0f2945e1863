"""LoRA layers: a frozen base Linear (float or quantized) plus a trainable low-rank update.

`y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b`, with `lora_b` starting at zero so a freshly
adapted model computes exactly what the base does. The parameter names (`h.3.attn.c_attn.lora_a`) follow
the checkpoint's, so an adapter file reads like the model it belongs to.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..backend.cpu_quantized import dequantized_weight, use_stored_layout
from ..convert.weights import check_finite
from ..errors import UserError
from ..fileio import read_json

# The four projections of a GPT-2 block that LoRA can wrap, named as in the checkpoint.
LORA_KEYS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTERS = "adapters.safetensors"


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `nn.QuantizedLinear` with a trainable rank-`rank` update beside it."""

    @staticmethod
    def from_base(base: nn.Linear | nn.QuantizedLinear, *, rank: int, scale: float, dropout: float = 0.0) -> LoRALinear:
        output_dims, input_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            input_dims = input_dims * 32 // base.bits  # each uint32 packs 32 / bits weights
        layer = LoRALinear(input_dims, output_dims, rank=rank, scale=scale, dropout=dropout)
        layer.linear = base
        return layer

    def __init__(self, input_dims: int, output_dims: int, *, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)  # the base Linear's own init range
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        # [..., in] -> [..., rank] -> [..., out]; the update is kept in float32, added in x's dtype
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * update).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update as a weight, `[out, in]` like nn.Linear's."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, *, dequantize: bool = False, dtype: mx.Dtype | None = None) -> nn.Linear | nn.QuantizedLinear:
        """One layer computing base + update: quantized again like the base unless `dequantize`.

        The float weight is summed in `dtype` (default: the bias's): a dequantized weight comes back in
        its scales' dtype, which can be narrower than the model's.
        """
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        weight = base.weight
        if quantized:
            weight = dequantized_weight(base)
        output_dims, input_dims = weight.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in base)
        dtype = dtype or (base.bias.dtype if "bias" in base else mx.float32)
        fused.weight = weight.astype(dtype) + self.delta().astype(dtype)
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, group_size=base.group_size, bits=base.bits, mode=base.mode)
        return fused


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which layers are adapted and how; stored in adapter_config.json so the adapters can be rebuilt."""

    num_layers: int
    keys: tuple[str, ...] = LORA_KEYS
    rank: int = 8
    scale: float = 2.0
    dropout: float = 0.0
    full: bool = False  # fine-tune the weights themselves instead of adding low-rank updates

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "keys": list(self.keys)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = ADAPTER_CONFIG) -> LoRASpec:
        """From adapter_config.json's "lora" entry; a field of the wrong type is a one-line UserError."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        keys = values.get("keys", list(LORA_KEYS))
        kinds = {"num_layers": int, "rank": int, "scale": (int, float), "dropout": (int, float), "full": bool}
        wrong = [k for k, kind in kinds.items() if k in values and (not isinstance(values[k], kind)
                 or (kind is not bool and isinstance(values[k], bool)))]  # fmt: skip
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            wrong.append("keys")
        if "num_layers" not in values:
            wrong.append("num_layers (missing)")
        if wrong or not math.isfinite(values.get("scale", 1.0)):
            raise UserError(f"{source}: the \"lora\" entry has bad {', '.join(wrong) or 'scale'}; it was not written by `mlx-gpt2 lora`, retrain")
        return cls(**{**values, "keys": tuple(keys)})


def check_spec(spec: LoRASpec, n_layer: int, n_embd: int) -> None:
    """Refuse options that cannot describe this model, with the allowed range in the message."""
    if not 1 <= spec.num_layers <= n_layer:
        raise UserError(
            f"--num-layers {spec.num_layers} is out of range: this model has {n_layer} layers (blocks); "
            f"pass 1 to {n_layer}, or leave it out to adapt them all"
        )
    unknown = [k for k in spec.keys if k not in LORA_KEYS]
    if unknown or not spec.keys:
        raise UserError(f"--lora-keys {','.join(unknown) or '(none)'} not understood; choose from {','.join(LORA_KEYS)}")
    if not 1 <= spec.rank <= n_embd:  # a rank past the layer's width adds parameters and nothing else
        raise UserError(f"--rank must be in [1, {n_embd}] (this model's width), got {spec.rank}")
    if not 0.0 <= spec.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {spec.dropout}")


def apply_lora(model: nn.Module, spec: LoRASpec) -> None:
    """Freeze `model`, then make trainable what `spec` says: LoRA updates, or (full) the weights themselves.

    Only the last `num_layers` blocks are touched; with `full` and every block chosen, the embeddings and
    the final norm train too.
    """
    check_spec(spec, len(model.h), model.config.n_embd)
    use_stored_layout(model)  # LoRA wraps MLX's own quantized layers (a CPU-loaded model holds them re-laid)
    model.freeze()
    blocks = model.h[len(model.h) - spec.num_layers :]
    if spec.full:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise UserError("--full cannot train a quantized model's weights; use LoRA on it (QLoRA) or a float model")
        if spec.num_layers == len(model.h):
            model.unfreeze()
        else:
            for block in blocks:
                block.unfreeze()
        return
    for block in blocks:
        modules = dict(block.named_modules())
        wrapped = [
            (key, LoRALinear.from_base(modules[key], rank=spec.rank, scale=spec.scale, dropout=spec.dropout))
            for key in spec.keys
        ]
        block.update_modules(tree_unflatten(wrapped))


def fuse_lora(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Replace every LoRALinear by its fused layer; with `dequantize`, quantized layers become float too.

    Float weights come out in the model's dtype, read off its final layer norm (never quantized).
    """
    dtype = model.ln_f.weight.dtype
    use_stored_layout(model)  # the fused layers are quantized again, or saved, in the stored form
    fused = [(name, m.fuse(dequantize=dequantize, dtype=dtype)) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        _dequantize_rest(model, dtype)
    return model


def _dequantize_rest(model: nn.Module, dtype: mx.Dtype) -> None:
    """Quantized layers LoRA did not touch (other blocks, the embedding) back to float."""
    replaced = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = dequantized_weight(m).astype(dtype)
            if isinstance(m, nn.QuantizedEmbedding):
                layer = nn.Embedding(*weight.shape)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
                if "bias" in m:
                    layer.bias = m.bias
            layer.weight = weight
            replaced.append((name, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    """What an adapter file holds: every trainable parameter, by its checkpoint-style name."""
    return dict(tree_flatten(model.trainable_parameters()))


def read_adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    path = Path(adapter_path).expanduser() / ADAPTER_CONFIG
    if not Path(adapter_path).expanduser().is_dir():
        raise UserError(f"adapter path {adapter_path} is not a directory; pass the --adapter-path training wrote")
    raw = read_json(path, missing=f"is {adapter_path} an adapter directory written by `mlx-gpt2 lora`?")
    if not isinstance(raw, dict) or not isinstance(raw.get("lora"), dict):
        raise UserError(f"{path} has no \"lora\" section; it was not written by `mlx-gpt2 lora`")
    return raw


def recorded_base(model: str | Path | None, adapter_path: str | Path | None) -> str:
    """`model` if given; else the base model the adapters in `adapter_path` were trained on; else "gpt2".

    `mlx-gpt2 lora` records its `--model` (a repo id, or a directory as an absolute path) in
    adapter_config.json, so `generate --adapter-path A` and `fuse --adapter-path A` need no `--model`.
    """
    if model is not None:
        return str(model)
    if adapter_path is None:
        return "gpt2"
    base = read_adapter_config(adapter_path).get("base_model")
    if not isinstance(base, str) or not base:
        raise UserError(f"{Path(adapter_path) / ADAPTER_CONFIG} records no base model; pass --model")
    if base.startswith(("/", "~", ".")) and not Path(base).expanduser().is_dir():
        raise UserError(f"the adapters in {adapter_path} were trained on {base}, which is not there any more; pass --model")
    return base


def base_of_record(model: str) -> str:
    """What adapter_config.json records as the base: a repo id as given, a local directory as an absolute path."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def check_base(model: nn.Module, adapter_path: str | Path, given: str) -> None:
    """Warn when `model` is not the base the adapters were trained on: shapes that fit prove nothing, so the
    weights' fingerprint (as prompt caches use) is compared with the one training recorded."""
    from ..generation.prompt_cache import model_fingerprint

    recorded = read_adapter_config(adapter_path)
    expected = recorded.get("base_fingerprint")
    if isinstance(expected, str) and model_fingerprint(model) != expected:
        warnings.warn(
            f"the adapters in {adapter_path} were trained on {recorded.get('base_model')}, and {given} is another "
            f"model (its weights' fingerprint differs); the output may be meaningless"
        )


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Rebuild the LoRA layers adapter_config.json describes and load adapters.safetensors into them."""
    spec = LoRASpec.from_dict(read_adapter_config(adapter_path)["lora"], source=str(Path(adapter_path) / ADAPTER_CONFIG))
    path = Path(adapter_path).expanduser() / ADAPTERS
    if not path.is_file():
        raise UserError(f"{path} not found: training has not saved adapters there yet")
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError):
        raise UserError(f"{path} is truncated or not a safetensors file") from None
    apply_lora(model, spec)
    check_adapter_weights(weights, trainable_weights(model), source=str(path))
    check_finite(weights, source=str(path))  # a diverged run's adapters would make every logit NaN
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()  # loaded for use, not for more training
    return model


def check_adapter_weights(weights: dict[str, mx.array], expected: dict[str, mx.array], *, source: str) -> None:
    """Every adapter tensor present, with its shape, and nothing else: one error listing all problems."""
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} != {tuple(expected[k].shape)}"
             for k in sorted(set(weights) & set(expected)) if weights[k].shape != expected[k].shape]  # fmt: skip
    problems = [f"{label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", unknown), ("wrong shape", wrong)) if items]  # fmt: skip
    if problems:
        raise UserError(f"{source} does not fit this model ({'; '.join(problems)}); was it trained on another model?")
