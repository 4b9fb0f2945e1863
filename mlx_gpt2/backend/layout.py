"""The memory layout of the weights that is fast on the backend MLX runs on.

What MLX's CPU backend measured (benchmarks/RESULTS.md) decides the default here:

- `x @ W.T` with W stored `(out, in)` -- the layout of `nn.Linear`, and the one every checkpoint uses --
  is the slow case of the CPU matmul: reference BLAS reduces each output over a strided inner product,
  and MLX's CPU quantized kernels likewise. The same product with W's memory laid out `(in, out)` runs
  2.5-3x faster (1.7x for the 50257-wide head). `use_input_major` keeps every weight's shape `(out, in)` and its values, and changes only
  where its numbers sit in memory: the parameter becomes a transposed view of an `(in, out)` buffer, so
  `nn.Linear` (which computes `x @ weight.T`) reads contiguous rows. Names, shapes, saving, quantizing,
  LoRA and gradients all see the same array as before; there is no second copy of any weight.
  On Metal and CUDA, whose kernels are built for `x @ W.T`, weights stay as stored (no GPU was
  available to measure the other layout there).
- MLX's CPU quantized kernels have the same asymmetry, and are slow for many rows: quantized layers get
  their own input-major form and a BLAS path for many rows (`cpu_quantized.py` beside this file), with the
  same levels, scales and numbers as stored.
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn

from .cpu_quantized import QUANTIZED, use_cpu_quantized
from .device import prefers_input_major

LAYOUTS = ("auto", "input-major", "checkpoint")
# The weights this module re-laid, by the id of the layer holding them: weak, so they are forgotten with
# their arrays, and a layer counts as done only while it still holds the very array (MLX's own modules are
# not ours to mark).
_RELAID: weakref.WeakValueDictionary[int, mx.array] = weakref.WeakValueDictionary()


def resolve_layout(layout: str) -> bool:
    """"auto" (input-major on CPU), "input-major" or "checkpoint" -> whether to re-lay the weights."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout == "input-major" or (layout == "auto" and prefers_input_major())


def _input_major(weight: mx.array, rows: int = 256) -> mx.array:
    """[out, in] -> an [in, out] buffer, seen again as [out, in]: same values and shape, transposed memory."""
    if weight.shape[0] <= rows:
        return mx.contiguous(weight.T).T
    # Transposing 256 rows at a time stays in cache: ~3x faster than one strided copy of the whole matrix.
    return mx.concatenate([weight[i : i + rows].T for i in range(0, weight.shape[0], rows)], axis=1).T


def use_input_major(model: nn.Module, *, evaluate: bool = False) -> nn.Module:
    """Re-lay every float `nn.Linear` weight, and the token embedding when it is the tied output head,
    as (in, out) in memory. Quantized layers are left to `cpu_quantized`. Returns `model`.

    Re-laying a weight holds it twice for a moment. `evaluate=True` materialises the weights one at a
    time, the largest (the embedding) first, while little else is in memory, so a float model's peak
    does not move; otherwise the copies happen lazily, in the same order, with the first forward. In a
    quantized model the float embedding is larger than everything else together, so it stays as stored:
    a quantized model is chosen for its memory.
    """
    modules = [m for _, m in model.named_modules()]
    targets = [m for m in modules if type(m) is nn.Linear]
    quantized = any(isinstance(m, QUANTIZED) for m in modules)
    wte = getattr(model, "wte", None)
    if type(wte) is nn.Embedding and "lm_head" not in model and not quantized:  # the tied output head
        targets.insert(0, wte)
    for module in targets:
        if _RELAID.get(id(module)) is module.weight:
            continue  # already re-laid (a weight assigned since then is another array)
        module.weight = _input_major(module.weight)
        _RELAID[id(module)] = module.weight
        if evaluate:
            mx.eval(module.weight)
    return model


def prepare(model: nn.Module, *, layout: str = "auto", evaluate: bool = False) -> nn.Module:
    """Apply the backend's fastest weight layout and quantized path (see `resolve_layout`); returns `model`."""
    if resolve_layout(layout):
        use_input_major(model, evaluate=evaluate)
        use_cpu_quantized(model)
    return model
