"""The CPU's input-major quantized layers (mlx_gpt2/cpu_quantized.py): MLX's numbers, MLX's arrays back.

Every comparison is against MLX's own `nn.QuantizedLinear` / `nn.QuantizedEmbedding` on the same packed
arrays: the re-laid layers must compute the same function (to float32 summation order), and give back the
stored arrays bit for bit.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gpt2 import generate, load
from mlx_gpt2.backend.cpu_quantized import (
    CPUQuantizedLinear,
    InputMajorQuantizedEmbedding,
    InputMajorQuantizedLinear,
    stored_parameters,
    use_cpu_quantized,
    use_stored_layout,
)
from mlx_gpt2.generation.prompt_cache import model_fingerprint


def _quantized_linear(in_dims: int, out_dims: int, *, bits: int, group_size: int, bias: bool = True) -> nn.QuantizedLinear:
    mx.random.seed(bits * 1000 + group_size)
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        linear.bias = mx.random.normal((out_dims,))  # not zeros: the bias must be added, once
    return nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)


def _close(a: mx.array, b: mx.array) -> float:
    """Max |a - b| relative to max |b|."""
    return float(mx.abs(a - b).max()) / float(mx.abs(b).max())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_linear_computes_mlx_kernels_function(bits, group_size):
    # 200 outputs: not a multiple of the unit group (padded inside, cut off outside)
    stock = _quantized_linear(256, 200, bits=bits, group_size=group_size)
    layer = InputMajorQuantizedLinear(stock)
    for rows in (1, 3, 15, 40):  # the kernel path below DEQUANTIZE_ROWS, the BLAS path above
        x = mx.random.normal((rows, 256))
        assert layer(x).shape == (rows, 200)
        assert _close(layer(x), stock(x)) < 1e-5
    x = mx.random.normal((2, 5, 256))  # leading dimensions are kept
    assert _close(layer(x), stock(x)) < 1e-5
    assert np.array_equal(layer.dequantized()[:, :200], mx.dequantize(stock.weight, stock.scales, stock.biases, group_size, bits).T)


@pytest.mark.parametrize("out_dims", [128, 130, 333])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_re_laying_in_blocks_is_exact(out_dims, bits, monkeypatch):
    """Layers re-laid 64 rows at a time (whole blocks, a padded last block, padding-only blocks) equal
    the layer re-laid at once, and give back the stored arrays."""
    import mlx_gpt2.backend.cpu_quantized as cpu_quantized

    stock = _quantized_linear(256, out_dims, bits=bits, group_size=32)
    whole = InputMajorQuantizedLinear(stock)
    monkeypatch.setattr(cpu_quantized, "CONVERT_ROWS", 64)
    blocks = InputMajorQuantizedLinear(stock)
    assert mx.array_equal(blocks.levels, whole.levels).item()
    assert all(mx.array_equal(a, stock[k]).item() for k, a in blocks.stored_arrays().items())


def test_round_trip_to_the_stored_arrays_is_exact():
    stock = _quantized_linear(384, 333, bits=4, group_size=64, bias=False)
    back = InputMajorQuantizedLinear(stock).stored()
    assert type(back) is CPUQuantizedLinear and "bias" not in back
    assert (back.group_size, back.bits, back.mode) == (64, 4, "affine")
    for name in ("weight", "scales", "biases"):
        assert back[name].dtype == stock[name].dtype and mx.array_equal(back[name], stock[name]).item(), name
    x = mx.random.normal((1, 384))
    assert mx.array_equal(back(x), stock(x)).item()  # MLX's own kernel on MLX's own arrays


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_rows_and_head_equal_mlxs(bits):
    mx.random.seed(0)
    embedding = nn.Embedding(1000, 128)
    stock = nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=bits)
    layer = InputMajorQuantizedEmbedding(stock)
    ids = mx.array([[0, 1, 7, 8, 9, 999], [500, 3, 3, 998, 16, 17]])
    assert np.array_equal(layer(ids), stock(ids))  # the same values, looked up from the other layout
    for rows in (1, 40):
        x = mx.random.normal((rows, 128))
        assert layer.as_linear(x).shape == (rows, 1000)
        assert _close(layer.as_linear(x), stock.as_linear(x)) < 1e-5
    back = layer.stored()
    assert (back.num_embeddings, back.dims) == (1000, 128) and mx.array_equal(back.weight, stock.weight).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_16_bit_layers_are_at_least_as_close_to_float32_as_mlxs_kernel(dtype):
    """The partial sums are combined in float32 (in 16 bits the offsets' term cancels most of them)."""
    stock = _quantized_linear(768, 2304, bits=4, group_size=64)
    stock.update({k: v.astype(dtype) for k, v in stock.parameters().items() if k != "weight"})
    ours = InputMajorQuantizedLinear(stock)
    x = mx.random.normal((3, 768)).astype(dtype)
    exact = nn.QuantizedLinear.from_linear(nn.Linear(768, 2304), group_size=64, bits=4)  # the float32 product
    exact.update({k: v if k == "weight" else v.astype(mx.float32) for k, v in stock.parameters().items()})
    want = exact(x.astype(mx.float32))
    assert ours(x).dtype == stock(x).dtype == dtype
    errors = [float(mx.abs(layer(x).astype(mx.float32) - want).max()) for layer in (ours, stock)]
    print(f"{dtype}: max |y - float32| ours {errors[0]:.3g}, MLX's kernel {errors[1]:.3g}")
    assert errors[0] <= errors[1]


def test_widths_the_fast_kernel_cannot_take_stay_as_stored():
    model = nn.Sequential(_quantized_linear(256, 128, bits=3, group_size=64), _quantized_linear(256, 128, bits=4, group_size=64))
    use_cpu_quantized(model)
    assert type(model.layers[0]) is CPUQuantizedLinear and type(model.layers[1]) is InputMajorQuantizedLinear
    use_stored_layout(model)
    assert [type(m) for m in model.layers] == [CPUQuantizedLinear, CPUQuantizedLinear]


def test_loaded_quantized_model_generates_the_stored_layouts_tokens(trained_small_dir, tmp_path):
    from mlx_gpt2.convert import convert

    out = convert(trained_small_dir, tmp_path / "q4", quantize=True, dtype="float32")
    fast, tokenizer = load(out)
    as_stored, _ = load(out, layout="checkpoint")
    assert isinstance(fast.h[1].mlp.c_proj, InputMajorQuantizedLinear) and isinstance(fast.wte, InputMajorQuantizedEmbedding)
    prompt = "The for statement in Python"
    texts = [generate(m, tokenizer, prompt, max_tokens=24, ignore_eos=True) for m in (fast, as_stored)]
    print(texts[0])
    assert texts[0] == texts[1]
    # What is saved or fingerprinted is the stored form, whatever the layout in memory
    assert model_fingerprint(fast) == model_fingerprint(as_stored)
    names = [name for name, _ in stored_parameters(fast)]
    assert "wte.weight" in names and "h.0.attn.c_attn.scales" in names and not any("levels" in n for n in names)


def test_lora_over_re_laid_layers_computes_the_same_and_fuses(trained_small_dir):
    """Adapters loaded onto a quantized base wrap MLX's layers, which `load` then re-lays under them."""
    from mlx_gpt2.lora.layers import LoRALinear, LoRASpec, apply_lora, fuse_lora

    model, _ = load(trained_small_dir, quantize=True, layout="checkpoint")
    apply_lora(model, LoRASpec(num_layers=1))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05  # a nonzero update
    ids = mx.array([list(range(2000, 2012))])
    expected = model(ids[:, :1]), model(ids)
    use_cpu_quantized(model)
    assert isinstance(model.h[-1].attn.c_attn.linear, InputMajorQuantizedLinear)
    for want, got in zip(expected, (model(ids[:, :1]), model(ids))):
        assert _close(got, want) < 1e-5
    fuse_lora(model)  # back in the stored form, quantized again
    assert isinstance(model.h[-1].attn.c_attn, nn.QuantizedLinear) and not any(isinstance(m, InputMajorQuantizedLinear) for _, m in model.named_modules())
