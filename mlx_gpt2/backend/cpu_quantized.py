"""Quantized layers for MLX's CPU backend: the same weights and numbers, in the layout its kernels run fastest.

An MLX quantized weight W [out, in] is a grid of levels q in [0, 2^bits) packed along `in`, with a scale s
and an offset b for each group of `group_size` inputs: W[n, k] = s[n, g(k)] q[n, k] + b[n, g(k)]. Every
MLX checkpoint (ours, mlx-lm's) stores that form, and MLX's CPU kernel for it (`quantized_matmul(...,
transpose=True)`) is a plain loop, measured here (benchmarks/RESULTS.md):

- one row (decode): 1.6 ms for gpt2's 768 -> 2304 `c_attn`, 33 ms for the 50257-wide head, while the
  kernel for the other form (`transpose=False`: levels packed along `out`, groups along `out`) takes 0.5
  and 10 ms. Groups along `out` would be another quantization (worse, and unreadable to mlx-lm), but a
  quantized weight whose scales are 1 and offsets 0 *is* its levels. So `InputMajorQuantizedLinear`
  holds q^T packed along `out` with unit scales, splits the input into its groups, and lets the fast
  kernel compute every group's partial sums at once, P[g, n] = sum_{k in g} x_k q[n, k]; then
  y[n] = sum_g s[n, g] P[g, n] + b[n, g] sum_{k in g} x_k. Same levels, scales and offsets, the same
  products up to float32 summation order, no extra memory (the unit scales are a broadcast scalar).
- many rows (prefill, perplexity, training): the kernel stays as slow per row, while the float product
  through BLAS with the weight input-major gets faster: from DEQUANTIZE_ROWS rows on the layers
  dequantize the weight (exactly the kernel's values) and multiply through BLAS, 2-2.4x faster at 512 rows.

`use_cpu_quantized` applies both to a loaded model; `use_stored_layout` puts the layers back as MLX's
`nn.QuantizedLinear`/`nn.QuantizedEmbedding` with the stored arrays, for code that reads or writes them
(saving, LoRA, fusing). Bit widths the transposed kernel does not take stay in the stored form.
"""

from __future__ import annotations

from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

# From this many rows on, a quantized product dequantizes its weight on the CPU (measured crossover: 8-16
# rows of gpt2's 2304 x 768 c_attn; at 512 rows the float path is 2.1-2.4x faster, benchmarks/RESULTS.md).
DEQUANTIZE_ROWS = 16
# The unit scales' group along `out`. Any size gives the same numbers (scale 1, offset 0); `out` is padded
# to a multiple of it (gpt2's 50257-wide head to 50304: 0.1% more levels).
UNIT_GROUP = 128
# Float weights dequantized at a time in the many-rows path: this many elements' worth of outputs (4 MB
# in float32), whole UNIT_GROUPs of them. (MLX may run two blocks' dequantizations side by side.)
DEQUANTIZE_BLOCK = 1 << 20
CONVERT_ROWS = 2048  # outputs re-laid at a time: bounds the load-time temporaries to a few MB


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


# --- the fast decode layout: levels input-major, packed along the output ------------------------------------

def _transpose_fields(words: mx.array, bits: int) -> mx.array:
    """Packed levels [rows, cols * bits / 32] -> the transposed grid packed the same way, [cols, rows * bits / 32].

    Every `per` = 32 / bits consecutive rows of one word column form a per x per grid of bit fields;
    transposing each grid inside its words (log2(per) rounds of masked swaps between word pairs, the
    classic bit-matrix transpose) and then the grid of words costs one pass over the words: 5x faster
    than unpacking every level and packing it again. `rows` must be a multiple of `per`.
    """
    per = 32 // bits
    rows, width = words.shape
    x, half = words.reshape(rows // per, per, width), per // 2
    while half:
        shift = half * bits
        low = sum(((1 << shift) - 1) << g for g in range(0, 32, 2 * shift))  # the low `half` fields of each pair
        pairs = x.reshape(rows // per, per // (2 * half), 2, half, width)
        a, b = pairs[:, :, 0], pairs[:, :, 1]  # rows i and i + half of each 2 * half block
        t = ((a >> shift) ^ b) & low  # a's high fields against b's low fields
        x = mx.stack([a ^ (t << shift), b ^ t], axis=2).reshape(rows // per, per, width)
        half //= 2
    return x.transpose(2, 1, 0).reshape(width * per, rows // per)


def _transposed_levels(words: mx.array, bits: int, *, cols: int, rows_to: int) -> mx.array:
    """Packed levels [rows, >= cols] -> their first `cols` columns transposed and packed again, [cols, rows_to],
    the rows zero-padded to `rows_to`. Re-laid CONVERT_ROWS rows at a time, each block written in place
    and evaluated at once, so the load holds one layer twice plus a few MB, whatever the layer."""
    rows, per = words.shape[0], 32 // bits
    out = mx.zeros((cols, rows_to // per), mx.uint32)
    for start in range(0, rows_to, CONVERT_ROWS):
        block = words[start : min(start + CONVERT_ROWS, rows)]
        if start + CONVERT_ROWS >= rows and rows_to > rows:
            block = mx.pad(block, [(0, min(rows_to - start, CONVERT_ROWS) - block.shape[0]), (0, 0)])
        fields = _transpose_fields(block, bits)[:cols]
        out = mx.slice_update(out, fields, mx.array([0, start // per]), axes=(0, 1))  # donated: in place
        mx.eval(out)
    return out


def supports_input_major(m: nn.Module) -> bool:
    """Whether a quantized layer has a levels-input-major form: affine, with a width that packs a word evenly."""
    return getattr(m, "mode", "affine") == "affine" and "biases" in m and 32 % m.bits == 0


def _unit(dtype: mx.Dtype, shape: tuple[int, ...]) -> tuple[mx.array, mx.array]:
    """Scales of 1 and offsets of 0: a broadcast scalar each, no memory (the kernel reads them as fast)."""
    return mx.broadcast_to(mx.array(1, dtype), shape), mx.broadcast_to(mx.array(0, dtype), shape)


class InputMajorQuantizedLinear(nn.Module):
    """An MLX quantized Linear with its levels held [in, out], packed along `out` (see the top of the file).

    Parameters: `levels` [in, out_padded * bits / 32] uint32, `group_scales` and `group_biases`
    [in / group_size, out_padded] (the stored scales and offsets, transposed, zero past `out`), `bias`.
    `stored()` gives back the `nn.QuantizedLinear` it was made from, array for array.
    """

    STORED = CPUQuantizedLinear

    def __init__(self, m: nn.QuantizedLinear | nn.QuantizedEmbedding) -> None:
        super().__init__()
        self.group_size, self.bits, self.mode = m.group_size, m.bits, m.mode
        out, words = m["weight"].shape
        self.output_dims, self.input_dims = out, words * 32 // m.bits
        padded = -(-out // UNIT_GROUP) * UNIT_GROUP
        self.levels = _transposed_levels(m["weight"], m.bits, cols=self.input_dims, rows_to=padded)
        pad = [(0, 0), (0, padded - out)]
        self.group_scales, self.group_biases = mx.pad(m["scales"].T, pad), mx.pad(m["biases"].T, pad)
        mx.eval(self.group_scales, self.group_biases)
        if "bias" in m:
            self.bias = m["bias"]
        self.freeze()

    def _product(self, x: mx.array) -> mx.array:
        """x [..., in] -> x @ W.T [..., out_padded], without the bias."""
        rows = x.reshape(-1, self.input_dims)
        y = self._dequantized_product(rows) if _many_rows_on_cpu(rows) else self._kernel_product(rows)
        return y.reshape(*x.shape[:-1], -1)

    def _kernel_product(self, rows: mx.array) -> mx.array:
        """rows @ W.T on MLX's fast kernel: every input group's partial sums, combined with the stored scales.

        In float32 whatever the rows' dtype: the offsets' term cancels much of the scaled partial sums, and
        16-bit partial sums were 5x further from the float32 model than MLX's 16-bit kernel (gpt2 in
        bfloat16: 0.36 vs 0.26 of a logit); in float32 they are 5x closer (0.05).
        """
        groups, f32 = self.group_scales.shape[0], mx.float32
        xg = rows.astype(f32).reshape(-1, groups, self.group_size).transpose(1, 0, 2)  # [groups, rows, group_size]
        levels = self["levels"].reshape(groups, self.group_size, -1)
        unit, zero = _unit(f32, (*levels.shape[:2], self.group_scales.shape[1] // UNIT_GROUP))
        partial = mx.quantized_matmul(xg, levels, unit, zero, transpose=False, group_size=UNIT_GROUP, bits=self.bits)
        scales, biases = self.group_scales.astype(f32), self.group_biases.astype(f32)
        return ((partial * scales[:, None]).sum(axis=0) + xg.sum(axis=-1).T @ biases).astype(rows.dtype)

    def _dequantized_product(self, rows: mx.array) -> mx.array:
        """rows @ W.T through BLAS, the weight dequantized a block of outputs (DEQUANTIZE_BLOCK) at a time,
        each once the previous product is done: a few MB of float weight alive, not the layer's (gpt2's
        head: 308 MB). Each output is the same dot product as with the whole weight, so the numbers are too."""
        columns = max(1, DEQUANTIZE_BLOCK // self.input_dims // UNIT_GROUP) * UNIT_GROUP
        blocks, after = [], rows
        for start in range(0, self.group_scales.shape[1], columns):
            weight = self.dequantized(start, start + columns, after=after)
            after = rows @ weight.astype(rows.dtype)  # already (in, out): BLAS's fast case
            blocks.append(after)
        return mx.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = self._product(x)
        if y.shape[-1] != self.output_dims:
            y = y[..., : self.output_dims]
        return y + self["bias"] if "bias" in self else y

    def dequantized(self, start: int = 0, stop: int | None = None, *, after: mx.array | None = None) -> mx.array:
        """The float weight input-major, [in, out_padded], or its outputs `start:stop` (multiples of
        UNIT_GROUP): s * q + b, the values MLX's dequantize gives. Computed once `after` exists."""
        per = 32 // self.bits
        stop = min(stop or self.group_scales.shape[1], self.group_scales.shape[1])
        levels = self["levels"][:, start // per : stop // per]
        levels = levels if after is None else mx.depends(levels, after)
        groups, width = self.group_scales.shape[0], stop - start
        levels = levels.reshape(groups, self.group_size, -1)
        unit, zero = _unit(self.group_scales.dtype, (groups, self.group_size, width // UNIT_GROUP))
        # 3-d from the start: measured 9 MB less in a 512-token MLP than scaling a reshaped 2-d q
        q = mx.dequantize(levels, unit, zero, group_size=UNIT_GROUP, bits=self.bits)
        scales, biases = self.group_scales[:, None, start:stop], self.group_biases[:, None, start:stop]
        return (q * scales + biases).reshape(self.input_dims, width)

    def stored_arrays(self) -> dict[str, mx.array]:
        """The arrays of the stored form: `weight` (packed along `in`), `scales`, `biases`[, `bias`]."""
        arrays = {
            "weight": _transposed_levels(self["levels"], self.bits, cols=self.output_dims, rows_to=self.input_dims),
            "scales": mx.contiguous(self.group_scales[:, : self.output_dims].T),
            "biases": mx.contiguous(self.group_biases[:, : self.output_dims].T),
        }
        return {**arrays, "bias": self["bias"]} if "bias" in self else arrays

    def stored(self) -> nn.Module:
        """The stored form: a `STORED` layer (MLX's, with the many-rows path) holding exactly the arrays this
        layer was made from."""
        layer = self.STORED.__new__(self.STORED)
        nn.Module.__init__(layer)  # not MLX's __init__: it would quantize a random weight first
        layer.group_size, layer.bits, layer.mode = self.group_size, self.bits, self.mode
        for name, array in self.stored_arrays().items():
            setattr(layer, name, array)
        return layer.freeze()

    def _extra_repr(self) -> str:
        return f"input_dims={self.input_dims}, output_dims={self.output_dims}, bits={self.bits}, group_size={self.group_size}"


class InputMajorQuantizedEmbedding(InputMajorQuantizedLinear):
    """An MLX quantized Embedding held like the Linear above: rows looked up from the [dims, vocab] levels,
    and the output head (`as_linear`) on the fast kernel."""

    STORED = CPUQuantizedEmbedding

    def __call__(self, ids: mx.array) -> mx.array:
        flat = ids.reshape(-1)
        per = 32 // self.bits
        words = mx.take(self["levels"], flat // per, axis=1)  # [dims, n]: the word holding each id's level
        q = ((words >> ((flat % per) * self.bits).astype(mx.uint32)) & (2**self.bits - 1)).T
        scales, biases = mx.take(self.group_scales, flat, axis=1).T, mx.take(self.group_biases, flat, axis=1).T
        groups = scales.shape[1]
        rows = q.astype(scales.dtype).reshape(-1, groups, self.group_size) * scales[..., None] + biases[..., None]
        return rows.reshape(*ids.shape, self.input_dims)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._product(x)[..., : self.output_dims]

    def stored(self) -> nn.Module:
        layer = super().stored()
        layer.num_embeddings, layer.dims = self.output_dims, self.input_dims
        return layer


QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, InputMajorQuantizedLinear)  # InputMajor*Embedding too


def _replace(model: nn.Module, wanted: Callable[[nn.Module], bool], convert: Callable[[nn.Module], nn.Module]) -> None:
    """Swap each wanted submodule for `convert(it)`, one at a time and evaluated, so that one layer at a
    time is held in both forms."""
    names = [name for name, module in model.named_modules() if wanted(module)]
    for name in names:  # by name: a list of the modules themselves would keep every replaced one alive
        module = model
        for part in name.split("."):  # walked directly: re-listing the modules each time took 0.2 s on gpt2-medium
            module = module[int(part)] if isinstance(module, list) else module[part]
        new = convert(module)
        del module
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(name, new)]))


def use_cpu_quantized(model: nn.Module) -> nn.Module:
    """Give every MLX quantized layer of `model` the CPU paths at the top: input-major levels where the bit
    width allows (re-laid at once, layer by layer), else the stored form with the many-rows path."""
    stock = (nn.QuantizedLinear, CPUQuantizedLinear, nn.QuantizedEmbedding, CPUQuantizedEmbedding)
    on_cpu = mx.default_device() == mx.cpu  # GPU kernels are built for the stored form
    _replace(
        model,
        lambda m: on_cpu and type(m) in stock and supports_input_major(m),
        lambda m: (InputMajorQuantizedEmbedding if isinstance(m, nn.QuantizedEmbedding) else InputMajorQuantizedLinear)(m),
    )
    swaps = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]  # the parameters stay where they are
    return model


def use_stored_layout(model: nn.Module) -> nn.Module:
    """Put every input-major quantized layer back in its stored form (MLX's own layers, the arrays a
    checkpoint holds), for code that reads, trains around or writes them. Returns `model`."""
    _replace(model, lambda m: isinstance(m, InputMajorQuantizedLinear), lambda m: m.stored())
    return model


def stored_parameters(model: nn.Module) -> Iterator[tuple[str, mx.array]]:
    """(name, array) for every parameter as a checkpoint holds it, whatever the layout in memory: an
    input-major quantized layer's stored arrays are made one layer at a time, and dropped after use."""
    for name, module in model.named_modules():
        if isinstance(module, InputMajorQuantizedLinear):
            arrays = module.stored_arrays()
        else:
            arrays = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        for key in sorted(arrays):
            yield f"{name}.{key}" if name else key, arrays[key]


def dequantized_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """`model.head`, but for a quantized head on the CPU the float weight is dequantized once, here, and
    shared by every call: a loss computed slice by slice then holds one copy (154 MB on gpt2), not one
    per slice, and dequantizes once."""
    head = model.lm_head if "lm_head" in model else model.wte
    if not isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or mx.default_device() != mx.cpu:
        return model.head
    weight = dequantized_weight(head)
    return lambda x: x @ weight.astype(x.dtype).T
