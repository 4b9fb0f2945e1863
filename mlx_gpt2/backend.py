"""What is fast on the backend MLX runs on: the compute dtype and the memory layout of the weights.

Two facts about MLX's CPU backend (measured in benchmarks/RESULTS.md) decide the defaults here:

- float16 matrix products run 3-5x slower than float32 (bfloat16 about as fast as float32, never faster;
  float16 quantization scales make quantized products ~50x slower), so 16-bit weights and scales are
  computed in float32 on the CPU, at twice their memory. Metal and CUDA keep the checkpoint's dtype.
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
  their own input-major form and a BLAS path for many rows (`mlx_gpt2/cpu_quantized.py`), with the
  same levels, scales and numbers as stored.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from .cpu_quantized import QUANTIZED, use_cpu_quantized

LAYOUTS = ("auto", "input-major", "checkpoint")
# Prompt tokens per prefill chunk. On the CPU, 128-token chunks measured as fast as 512 (the reference BLAS
# costs the same per row; chunks stay in cache) with a 10-15 MB lower peak on gpt2 (benchmarks/RESULTS.md).
# Elsewhere 512, unmeasured (GPUs want large chunks; mlx-lm uses 2048).
PREFILL_STEP = {"cpu": 128}


def backend_name() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device runs."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def physical_memory() -> int:
    """Bytes of memory this machine has (the bound no single allocation may pass)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): MLX's own view of the device
        return int(mx.device_info().get("memory_size", 2**40)) if hasattr(mx, "device_info") else 2**40


def default_dtype(checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """The compute dtype for weights stored as `checkpoint_dtype` on the current backend.

    CPU: float32 for every float checkpoint (16-bit matmuls are no faster there, float16 3-5x slower).
    Metal and CUDA: the checkpoint's own dtype (half the memory traffic, and fast kernels).
    """
    if backend_name() == "cpu" and checkpoint_dtype in (mx.float16, mx.bfloat16):
        return mx.float32
    return checkpoint_dtype


def prefill_step(step_size: int | None = None) -> int:
    """`step_size`, or the backend's default prefill chunk (PREFILL_STEP) when it is None."""
    return step_size or PREFILL_STEP.get(backend_name(), 512)


def prefers_input_major() -> bool:
    """True where `x @ W` with W stored (in, out) beats the checkpoint layout: MLX's CPU backend."""
    return backend_name() == "cpu"


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
        if getattr(module, "_input_major", None) == id(module.weight):
            continue  # already re-laid (a weight assigned since then has another id)
        module.weight = _input_major(module.weight)
        module._input_major = id(module.weight)
        if evaluate:
            mx.eval(module.weight)
    return model


def prepare(model: nn.Module, *, layout: str = "auto", evaluate: bool = False) -> nn.Module:
    """Apply the backend's fastest weight layout and quantized path (see `resolve_layout`); returns `model`."""
    if resolve_layout(layout):
        use_input_major(model, evaluate=evaluate)
        use_cpu_quantized(model)
    return model
