"""Which layers are quantized, at which bits, and how that is recorded in config.json.

Every Linear of the blocks becomes an `nn.QuantizedLinear`, and the tied token embedding (which is also
the output head, through `as_linear`) an `nn.QuantizedEmbedding`, unless `keep_embeddings`. The position
embedding stays in float: it is 0.6% of gpt2's weights and every token reads it.

config.json records the plan in mlx-lm's format, so mlx-lm reads our directories and we read its:

    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.wpe": false,                                  # left in float
                     "model.h.0.mlp.c_proj": {"group_size": 64, "bits": 8, "mode": "affine"}}

The top-level settings apply to every quantizable layer; a layer that differs has its own entry (a dict,
or `false` for float), named by its path in mlx-lm's module tree (ours with a `model.` prefix).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import GPT2Config
from ..backend.cpu_quantized import QUANTIZED, InputMajorQuantizedLinear
from ..errors import CheckpointError, UserError
from ..model import GPT2

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
STORED_BITS = (2, 3, 4, 5, 6, 8)  # what a saved (e.g. mlx-lm) model may hold; we write BITS
RECIPES = ("mixed",)
MODE = "affine"  # MLX's other modes (mxfp4, nvfp4, ...) fix bits and group size; affine is the general one
PATH_PREFIX = "model."  # mlx-lm's Model wraps the GPT-2 tree in `.model`
FLOAT16_MAX = 6e4  # scales or biases beyond float16's range (65504) stay in float32

# The mixed recipe: block layers are promoted from the base width to 8 bits, in the order of their measured
# sensitivity per weight (benchmarks/quantization/sensitivity.py: the KL divergence a layer causes alone,
# largest for the attention projections of the first block), outermost blocks first, while the model's
# average stays within MIXED_EXTRA_BITS of the base width (0.9: 4-bit mixed stays under 5.0 bits).
MIXED_HIGH_BITS = 8
MIXED_ORDER = ("attn.c_attn", "attn.c_proj", "mlp.c_proj", "mlp.c_fc")
MIXED_EXTRA_BITS = 0.9
SCALE_BITS = 32  # a float16 scale and a float16 bias per group, as stored
FIT_SHRINKS = (1.0, 0.9, 0.8, 0.7)  # fit_affine's starting ranges, as fractions of each group's min-max range
FIT_STEPS = 6  # least-squares refits from each start: the error stops falling after ~5


class QuantizationWarning(UserWarning):
    """A layer could not be quantized as asked (its width is not a multiple of the group size)."""


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize: `load(..., quantize=QuantizeConfig(bits=8))` or `quantize=dict(bits=8)`.

    bits: 2, 3, 4, 6 or 8. group_size: 32, 64 or 128 weights share one scale and bias. keep_embeddings:
    leave the tied token embedding / output head in float. recipe: None (every layer at `bits`) or
    "mixed" (the layers measured most sensitive at 8 bits, the rest at `bits`, all with fitted scales).
    fit_scales: fit each group's scale and bias by least squares instead of MLX's min/max rule (see
    `fit_affine`): the same format and size, a lower error, a slower conversion.
    """

    bits: int = 4
    group_size: int = 64
    keep_embeddings: bool = False
    recipe: str | None = None
    fit_scales: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
            raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name in ("keep_embeddings", "fit_scales"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"quantize option {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def fitted(self) -> bool:
        """Whether scales are fitted by least squares: asked for, or part of the mixed recipe."""
        return self.fit_scales or self.recipe == "mixed"

    @classmethod
    def coerce(cls, value: QuantizeConfig | dict | bool | None) -> QuantizeConfig | None:
        """None/False -> None; True -> the defaults (4 bits, group 64); a dict -> its fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise UserError(f"quantize= got unknown option(s) {', '.join(sorted(unknown))}; use bits, group_size, keep_embeddings, recipe, fit_scales")
            return cls(**value)
        raise UserError(f"quantize= takes True, a dict or a QuantizeConfig, got {type(value).__name__}")


def layer_params(bits: int, group_size: int) -> dict[str, Any]:
    return {"group_size": group_size, "bits": bits, "mode": MODE}


def _quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for every layer MLX can quantize (Linear and Embedding), in model order."""
    layers = [(path, m) for path, m in reversed(model.named_modules()) if hasattr(m, "to_quantized") and path]
    return dict(sorted(layers, key=lambda item: [int(p) if p.isdigit() else -1 for p in item[0].split(".")]))


def _fallback_group(width: int, group_size: int) -> int | None:
    """The largest allowed group size, not above the one asked for, that divides `width`; None if none does."""
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= group_size and width % g == 0), None)


def plan(model: nn.Module, spec: QuantizeConfig) -> dict[str, dict[str, Any] | None]:
    """Path -> to_quantized params (or None: float) for every quantizable layer; warns about fallbacks."""
    result: dict[str, dict[str, Any] | None] = {}
    fallbacks: dict[tuple[int, int | None], list[str]] = {}
    for path, module in _quantizable(model).items():
        if path == "wpe" or (path == "wte" and spec.keep_embeddings):
            result[path] = None
            continue
        width = module.weight.shape[-1]  # groups run along the input (last) dimension
        group = _fallback_group(width, spec.group_size)
        if group != spec.group_size:
            fallbacks.setdefault((width, group), []).append(path)
        result[path] = None if group is None else layer_params(spec.bits, group)
    for (width, group), paths in fallbacks.items():
        _warn_fallback(paths, width, spec.group_size, group)
    if spec.recipe == "mixed":
        for path in mixed_high_precision_layers(model, result, spec.bits):
            result[path] = layer_params(MIXED_HIGH_BITS, result[path]["group_size"])
    return result


def mixed_high_precision_layers(model: nn.Module, layers: dict[str, dict[str, Any] | None], bits: int) -> list[str]:
    """The block layers the mixed recipe promotes to 8 bits: in MIXED_ORDER, outermost blocks first, for as
    long as the model's average stays within MIXED_EXTRA_BITS of `bits` (scales and float tensors counted)."""
    if bits >= MIXED_HIGH_BITS:
        return []
    modules = dict(model.named_modules())
    n_layer = len(model.h)
    ends_first = sorted(range(n_layer), key=lambda i: min(i, n_layer - 1 - i))  # 0, n-1, 1, n-2, ...
    candidates = [f"h.{i}.{role}" for role in MIXED_ORDER for i in ends_first if layers.get(f"h.{i}.{role}")]
    n_weights = sum(p.size for _, p in tree_flatten(model.parameters()))
    budget = (bits + MIXED_EXTRA_BITS) * n_weights - _stored_bits(model, layers)
    chosen = []
    for path in candidates:
        cost = modules[path].weight.size * (MIXED_HIGH_BITS - bits)
        if cost <= budget:
            chosen.append(path)
            budget -= cost
    return chosen


def _stored_bits(model: nn.Module, layers: dict[str, dict[str, Any] | None]) -> float:
    """The bits the model will take once quantized as `layers` says (float tensors at their own width)."""
    total = 0.0
    for path, p in tree_flatten(model.parameters()):
        layer, _, name = path.rpartition(".")
        params = layers.get(layer) if name == "weight" else None
        total += p.size * (params["bits"] + SCALE_BITS / params["group_size"]) if params else p.nbytes * 8
    return total


def _warn_fallback(paths: list[str], width: int, asked: int, used: int | None) -> None:
    outcome = f"they use group size {used}" if used else "they stay in float"
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    warnings.warn(
        f"group size {asked} does not divide the input width {width} of {len(paths)} layer(s) ({shown}); {outcome}",
        QuantizationWarning, stacklevel=3,
    )


def to_config(layers: dict[str, dict[str, Any] | None], spec: QuantizeConfig) -> dict[str, Any]:
    """The config.json "quantization" entry: the defaults plus every layer that differs from them."""
    default = layer_params(spec.bits, spec.group_size)
    entry: dict[str, Any] = dict(default)
    for path, params in layers.items():
        if params != default:
            entry[PATH_PREFIX + path] = params if params is not None else False
    return entry


def quantize_model(
    model: nn.Module, spec: QuantizeConfig | dict | bool, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Quantize `model` in place as `spec` says; return its config.json "quantization" entry.

    The quantized weights are computed layer by layer, so the float originals are dropped as they go
    instead of being held all at once. `progress(layers done, layers)` follows them (fitted scales take
    tens of seconds on gpt2's shape).
    """
    spec = QuantizeConfig.coerce(spec) or QuantizeConfig()
    if is_quantized(model):
        raise UserError("this model is already quantized; load its float version to quantize it again")
    layers = plan(model, spec)
    floats = {path: m.weight for path, m in _quantizable(model).items() if layers.get(path)} if spec.fitted else {}
    nn.quantize(model, class_predicate=lambda path, _: layers.get(path) or False)
    todo = [(path, module) for path, module in model.named_modules() if layers.get(path) is not None]
    for done, (path, module) in enumerate(todo, start=1):
        if path in floats:
            module.weight, module.scales, module.biases = fit_affine(floats.pop(path), **layers[path])
        else:
            _round_scales_to_16_bits(module)
        mx.eval(module.parameters())
        if progress is not None:
            progress(done, len(todo))
    return to_config(layers, spec)


def fit_affine(w: mx.array, *, bits: int, group_size: int, mode: str = MODE) -> tuple[mx.array, mx.array, mx.array]:
    """`mx.quantize(w)`'s (packed, scales, biases), with each group's scale and bias fitted by least squares.

    MLX maps each group's min and max onto the end levels, so one outlier stretches the step for all 64
    weights. Here each group starts from MLX's choice and from its min-max range shrunk by each of
    FIT_SHRINKS around its middle (clipping the outliers); from each start, the levels and the line
    (scale, bias) are refitted in turn FIT_STEPS times, each the least-squares best for the other (Lloyd's
    iteration on an evenly spaced grid). Every group keeps its best of all those, with scales and biases
    rounded to the float16 they are stored in, so it is never worse than MLX's. Same format and size: MLX
    (and mlx-lm) dequantize it unchanged. On tests/data/trained-small's token embedding at 4 bits: 18%
    less squared error, about half the KL divergence (benchmarks/quantization/REPORT.md).
    """
    assert mode == MODE
    top = 2**bits - 1
    g = w.astype(mx.float32).reshape(-1, group_size)
    low, high = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    g_mean = g.mean(axis=-1, keepdims=True)
    _, mlx_scales, mlx_biases = mx.quantize(w, group_size=group_size, bits=bits)
    starts = [(mlx_scales.reshape(-1, 1), mlx_biases.reshape(-1, 1))]  # MLX's own: never worse than it
    for shrink in FIT_SHRINKS:
        half = (high - low) / 2 * shrink
        starts.append((mx.maximum(2 * half / top, 1e-8), (low + high) / 2 - half))
    best = None
    for s, b in starts:
        s, b = _as_stored(s), _as_stored(b)
        for _ in range(FIT_STEPS):
            q = mx.clip(mx.round((g - b) / s), 0, top)
            err = mx.square(s * q + b - g).sum(axis=-1, keepdims=True)
            if best is None:
                best = (err, q, s, b)
            else:
                better = err < best[0]
                best = tuple(mx.where(better, new, old) for new, old in zip((err, q, s, b), best))
            q_mean = q.mean(axis=-1, keepdims=True)
            var = mx.square(q - q_mean).sum(axis=-1, keepdims=True)
            slope = ((q - q_mean) * (g - g_mean)).sum(axis=-1, keepdims=True) / mx.maximum(var, 1e-30)
            s = _as_stored(mx.where((var > 0) & (slope > 0), slope, s))
            b = _as_stored(g_mean - s * q_mean)
            mx.eval(best, s, b)
    _, q, s, b = best
    rows = w.shape[0]
    return pack_levels(q.reshape(rows, -1).astype(mx.uint32), bits), s.reshape(rows, -1), b.reshape(rows, -1)


def _as_stored(x: mx.array) -> mx.array:
    """float32 values rounded to float16 where float16 holds them (as `_round_scales_to_16_bits` stores)."""
    half = x.astype(mx.float16).astype(mx.float32)
    return mx.where(mx.abs(x) < FLOAT16_MAX, half, x)


def pack_levels(q: mx.array, bits: int) -> mx.array:
    """[rows, cols] levels in [0, 2^bits) -> MLX's packed uint32 words: a little-endian bit stream per row."""
    rows, cols = q.shape
    blocks = q.reshape(rows, -1, 32).astype(mx.uint64)  # 32 levels fill exactly `bits` words
    words = [mx.zeros(blocks.shape[:2], mx.uint64) for _ in range(bits + 1)]
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        shifted = blocks[:, :, j] << offset
        words[word] = words[word] | (shifted & 0xFFFFFFFF)
        words[word + 1] = words[word + 1] | (shifted >> 32)
    return mx.stack(words[:bits], axis=-1).astype(mx.uint32).reshape(rows, cols * bits // 32)


def _round_scales_to_16_bits(module: nn.Module) -> None:
    """float32 scales and biases -> float16 values (still held as float32), so that they are stored in 16
    bits: half the overhead on disk (0.5 bit per weight at group 64, not 1), as for a 16-bit checkpoint.

    A float16 scale is exact to 1 part in 2048, far below one quantization step (1 in 255 at 8 bits).
    The values stay float32 in memory so the model computes as before and equals its reloaded copy.
    """
    for name in ("scales", "biases"):
        value = module.get(name)
        if value is not None and value.dtype == mx.float32 and mx.abs(value).max().item() < FLOAT16_MAX:
            setattr(module, name, value.astype(mx.float16).astype(mx.float32))


def _for_storage(name: str, value: mx.array) -> mx.array:
    """Scales and biases that hold float16 values are written as float16."""
    if name.endswith((".scales", ".biases")) and value.dtype == mx.float32:
        half = value.astype(mx.float16)
        if mx.array_equal(half.astype(mx.float32), value).item():
            return half
    return value


def quantize_weights(
    config: GPT2Config, raw_config: dict, weights: dict[str, mx.array], spec: QuantizeConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, mx.array], dict[str, Any], dict[str, Any]]:
    """Float weights -> (quantized weights, config.json "quantization" entry, a summary for humans)."""
    if saved_quantization(raw_config) is not None:
        raise UserError("the source is already quantized; convert its float checkpoint to quantize it differently")
    model = GPT2(config)
    model.load_weights(list(weights.items()), strict=True)
    entry = quantize_model(model, spec, progress=progress)
    stored = {name: _for_storage(name, v) for name, v in tree_flatten(model.parameters())}
    summary = {
        "bits": spec.bits, "group_size": spec.group_size, "keep_embeddings": spec.keep_embeddings,
        "recipe": spec.recipe, "fit_scales": spec.fitted, "bits_per_weight": round(bits_per_weight(model, stored), 3),
    }
    return stored, entry, summary


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def saved_quantization(raw_config: dict) -> dict[str, Any] | None:
    """The "quantization" entry of a config.json (mlx-lm also mirrors it as "quantization_config")."""
    entry = raw_config.get("quantization")
    if entry is None:
        legacy = raw_config.get("quantization_config")
        if isinstance(legacy, dict) and "bits" in legacy and "quant_method" not in legacy:
            entry = legacy
    if entry is not None and not (isinstance(entry, dict) and "bits" in entry and "group_size" in entry):
        raise CheckpointError(f"config.json: quantization must be an object with bits and group_size, got {entry!r}")
    return entry


def apply_saved_quantization(model: nn.Module, entry: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turn the layers of a fresh (unloaded) model into the quantized layers a saved model holds.

    A layer named in `entry` gets those settings (`false`: float). Any other layer is quantized if its
    `.scales` were saved, with bits and group size read off the stored shapes as mlx-lm does (mlx-lm's
    default, for one, quantizes the position embedding without naming it); else it stays float.
    """
    def predicate(path: str, module: nn.Module) -> dict[str, Any] | bool:
        own = entry.get(PATH_PREFIX + path, entry.get(path))
        if own is not None:
            return _checked_params(path, own) if own is not False else False
        if f"{path}.scales" not in weights:
            return False
        return _inferred_params(path, module, weights)

    nn.quantize(model, class_predicate=predicate)


def _checked_params(path: str, params: Any) -> dict[str, Any]:
    if not (isinstance(params, dict) and {"bits", "group_size"} <= set(params)):
        raise CheckpointError(f"config.json: quantization entry for {path} must be false or an object with bits and group_size")
    if params["bits"] not in STORED_BITS or params["group_size"] not in GROUP_SIZES or \
            any(isinstance(params[k], bool) for k in ("bits", "group_size")):
        raise CheckpointError(
            f"config.json: quantization entry for {path} has bits {str(params['bits'])[:20]} and group_size "
            f"{str(params['group_size'])[:20]}; MLX stores bits {', '.join(map(str, STORED_BITS))} in groups of "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    return {"group_size": params["group_size"], "bits": params["bits"], "mode": params.get("mode", MODE)}


def _inferred_params(path: str, module: nn.Module, weights: dict[str, mx.array]) -> dict[str, Any]:
    """Bits and group size from the packed shapes: uint32 words hold 32/bits weights; one scale per group."""
    width = module.weight.shape[-1]
    packed, scales = weights.get(f"{path}.weight"), weights[f"{path}.scales"]
    if packed is None or packed.dtype != mx.uint32 or width % scales.shape[-1]:
        raise CheckpointError(f"{path}: saved quantized weights do not match its shape {tuple(module.weight.shape)}; re-convert the model")
    return layer_params((packed.shape[-1] * 32) // width, width // scales.shape[-1])


def bits_per_weight(model: nn.Module, tensors: dict[str, mx.array] | None = None) -> float:
    """Bits per weight as mlx-lm counts them: every byte of `tensors` (packed weights, scales, biases, float
    tensors; default: the model's parameters as held in memory) over the number of weights of the float model."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    arrays = tensors.values() if tensors is not None else [p for _, p in tree_flatten(model.parameters())]
    return sum(a.nbytes * 8 for a in arrays) / sum(_n_weights(module) for _, module in leaves)


def _n_weights(module: nn.Module) -> int:
    if isinstance(module, InputMajorQuantizedLinear):
        return module.input_dims * module.output_dims + (module["bias"].size if "bias" in module else 0)
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        bias = module["bias"].size if "bias" in module else 0
        return module.weight.size * 32 // module.bits + bias  # each uint32 packs 32 / bits weights
    return sum(p.size for _, p in tree_flatten(module.parameters()))
