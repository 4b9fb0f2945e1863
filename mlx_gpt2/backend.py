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
  Quantized layers cannot be re-laid without re-quantizing (which would change their numbers): they
  stay as stored. On Metal and CUDA, whose kernels are built for `x @ W.T`, weights stay as stored
  (no GPU was available to measure the other layout there).
- MLX's CPU quantized matmul is a plain loop: as fast as the float product for one row (decode), but
  2-2.4x slower than dequantizing the weight and multiplying input-major through BLAS once a product has
  hundreds of rows (prefill, perplexity, training). `use_dequantized_products` makes the quantized layers
  take that path from DEQUANTIZE_ROWS rows on: the same numbers (the weight is dequantized exactly as the
  kernel does), one layer's float weight alive at a time, nothing changed in what is stored.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

LAYOUTS = ("auto", "input-major", "checkpoint")
# From this many rows on, a quantized product dequantizes its weight on the CPU (measured crossover: 8-16
# rows of gpt2's 2304 x 768 c_attn; at 512 rows the float path is 2.1-2.4x faster, benchmarks/RESULTS.md).
DEQUANTIZE_ROWS = 16


def backend_name() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device runs."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def default_dtype(checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """The compute dtype for weights stored as `checkpoint_dtype` on the current backend.

    CPU: float32 for every float checkpoint (16-bit matmuls are no faster there, float16 3-5x slower).
    Metal and CUDA: the checkpoint's own dtype (half the memory traffic, and fast kernels).
    """
    if backend_name() == "cpu" and checkpoint_dtype in (mx.float16, mx.bfloat16):
        return mx.float32
    return checkpoint_dtype


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
    as (in, out) in memory. Quantized layers are left as they are. Returns `model`.

    Re-laying a weight holds it twice for a moment. `evaluate=True` materialises the weights one at a
    time, the largest (the embedding) first, while little else is in memory, so a float model's peak
    does not move; otherwise the copies happen lazily, in the same order, with the first forward. In a
    quantized model the float embedding is larger than everything else together, so it stays as stored:
    a quantized model is chosen for its memory.
    """
    modules = [m for _, m in model.named_modules()]
    targets = [m for m in modules if type(m) is nn.Linear]
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in modules)
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


def _many_rows_on_cpu(x: mx.array) -> bool:
    return x.size >= DEQUANTIZE_ROWS * x.shape[-1] and mx.default_device() == mx.cpu


def dequantized_weight(m: nn.Module, *, after: mx.array | None = None) -> mx.array:
    """The float weight of an MLX quantized layer, computed (with `after`) only once `after` exists."""
    weight = m["weight"] if after is None else mx.depends(m["weight"], after)
    return mx.dequantize(weight, m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)


def _dequantized(m: nn.Module, x: mx.array) -> mx.array:
    # Made to wait for x: otherwise MLX, free to dequantize as early as it likes, materialised the float
    # weights of every pending product at once (16 copies of the 154 MB head in a training step's loss).
    return dequantized_weight(m, after=x).astype(x.dtype)


class CPUQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` that multiplies many rows through BLAS, with its weight dequantized input-major."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _many_rows_on_cpu(x):
            return super().__call__(x)
        y = x @ mx.contiguous(_dequantized(self, x).T)  # (in, out): the fast case of the CPU matmul
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose output-head product (`as_linear`) takes the same path as above."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _many_rows_on_cpu(x):
            return super().as_linear(x)
        # Left (vocab, D): a re-laid copy of gpt2's 154 MB head would double the transient memory.
        return x @ _dequantized(self, x).T


def dequantized_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """`model.head`, but for a quantized head on the CPU the float weight is dequantized once, here, and
    shared by every call: a loss computed slice by slice then holds one copy (154 MB on gpt2), not one
    per slice, and dequantizes once."""
    head = model.lm_head if "lm_head" in model else model.wte
    if not isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or mx.default_device() != mx.cpu:
        return model.head
    weight = dequantized_weight(head)
    return lambda x: x @ weight.astype(x.dtype).T


def use_dequantized_products(model: nn.Module) -> nn.Module:
    """Give every MLX quantized layer of `model` the many-rows path above (same parameters, same numbers)."""
    swaps = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]  # the parameters stay where they are
    return model


def prepare(model: nn.Module, *, layout: str = "auto", evaluate: bool = False) -> nn.Module:
    """Apply the backend's fastest weight layout and quantized path (see `resolve_layout`); returns `model`."""
    if resolve_layout(layout):
        use_input_major(model, evaluate=evaluate)
        use_dequantized_products(model)
    return model
