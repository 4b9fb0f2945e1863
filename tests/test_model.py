"""Our MLX GPT-2 is the same function as transformers' GPT2LMHeadModel: logits compared tensor by tensor."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import LAYOUTS, make_hf_model, write_checkpoint
from conftest import PEAKED, hf_logits
from mlx_gpt2 import GPT2Config, UserError, load, make_cache
from mlx_gpt2.config import ACTIVATIONS

TOL = 1e-4


def max_diff(model, hf, ids) -> float:
    diff = float(np.abs(np.array(model(mx.array(ids))) - hf_logits(hf, ids)).max())
    print(f"OK, maxdiff = {diff:.3g}")
    return diff


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_transformers(layout, small_hf, tmp_path, ids):
    model, _ = load(write_checkpoint(small_hf, tmp_path / layout, layout))
    assert max_diff(model, small_hf, ids) <= TOL


VARIANTS = [
    {"tie_word_embeddings": False},
    {"n_inner": 96},
    {"scale_attn_by_inverse_layer_idx": True},
    {"reorder_and_upcast_attn": True},
    {"layer_norm_epsilon": 1e-3},
    {"vocab_size": 50260},
    *({"activation_function": a} for a in ("gelu", "gelu_new", "relu", "quick_gelu", "silu", "tanh", "gelu_10",
                                            "laplace", "mish", "relu2", "leaky_relu", "sigmoid", "linear")),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_config_variants_match_transformers(variant, tmp_path, ids):
    hf = make_hf_model({**PEAKED, **variant}, seed=1)
    model, _ = load(write_checkpoint(hf, tmp_path / "m", "hub"))
    assert max_diff(model, hf, ids) <= TOL


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_equals_transformers(name):
    """Checked on the function itself: inside a random model, gelu and gelu_new differ by < 1e-4 in logits."""
    from transformers.activations import ACT2FN

    from mlx_gpt2.activations import ACTIVATIONS

    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    ours = np.array(ACTIVATIONS[name](mx.array(x)))
    with torch.no_grad():
        ref = ACT2FN[name](torch.tensor(x)).numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"OK, maxdiff = {diff:.3g}")
    assert diff <= 2e-6


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpt2_gelu_and_its_gradient_equal_torch_in_every_dtype(dtype):
    """GPT-2's GELU is a rational tanh with a hand-written derivative: both against torch's, rounded once."""
    from mlx_gpt2.activations import ACTIVATIONS

    x = np.linspace(-12, 12, 4801, dtype=np.float32)
    gelu = ACTIVATIONS["gelu_new"]
    xm = mx.array(x).astype(getattr(mx, dtype))
    ours, grad = gelu(xm), mx.grad(lambda v: gelu(v).astype(mx.float32).sum())(xm)
    assert ours.dtype == grad.dtype == xm.dtype
    xt = torch.tensor(np.array(xm.astype(mx.float32)), dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.gelu(xt, approximate="tanh")
    ref.sum().backward()
    ulp = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}[dtype]  # about one rounding of the dtype
    for name, a, b in (("value", ours, ref.detach()), ("gradient", grad, xt.grad)):
        err = np.abs(np.array(a.astype(mx.float32), dtype=np.float64) - b.numpy()) / np.maximum(np.abs(b.numpy()), 1)
        print(f"{dtype} {name}: max relative error {err.max():.2g}")
        assert err.max() <= ulp


def test_activation_test_can_fail():
    from mlx_gpt2.activations import ACTIVATIONS

    x = mx.linspace(-3, 3, 601)
    assert float(mx.abs(ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_new"](x)).max()) > 1e-4


def test_full_size_gpt2_matches_transformers(tmp_path):
    """The real 124M shape: 12 layers, 768 wide, 1024 positions, 50257 tokens."""
    hf = make_hf_model({"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}, seed=0)
    model, _ = load(write_checkpoint(hf, tmp_path / "gpt2", "hub"))
    ids = np.random.default_rng(1).integers(0, 50257, (1, 24))
    assert max_diff(model, hf, ids) <= TOL


def test_cached_decoding_equals_full_forward(small_loaded, ids):
    model, _ = small_loaded
    full = np.array(model(mx.array(ids)))
    cache = make_cache(len(model.h))
    pieces = [model(mx.array(ids[:, :10]), cache), model(mx.array(ids[:, 10:20]), cache)]
    pieces += [model(mx.array(ids[:, i : i + 1]), cache) for i in range(20, ids.shape[1])]
    stepped = np.concatenate([np.array(p) for p in pieces], axis=1)
    diff = float(np.abs(stepped - full).max())
    print(f"OK, maxdiff = {diff:.3g}")
    assert diff <= TOL
    assert cache[0].offset == ids.shape[1]


def test_cache_grows_in_steps_without_losing_history(small_loaded):
    model, _ = small_loaded
    cache = make_cache(len(model.h))
    ids = np.random.default_rng(3).integers(0, 50257, (1, 100))
    for i in range(100):
        model(mx.array(ids[:, i : i + 1]), cache)
    assert cache[0].keys.shape[2] == cache[0].step  # one allocation of `step` positions
    full = np.array(model(mx.array(ids)))[:, -1]
    cache2 = make_cache(len(model.h))
    model(mx.array(ids[:, :99]), cache2)
    assert np.abs(np.array(model(mx.array(ids[:, 99:]), cache2))[:, -1] - full).max() <= TOL


def test_position_past_window_is_refused(small_loaded):
    model, _ = small_loaded
    n = model.config.n_positions
    model(mx.array([[1] * n]))  # exactly the window is fine
    with pytest.raises(UserError, match=f"window of {n} positions"):
        model(mx.array([[1] * (n + 1)]))
    cache = make_cache(len(model.h))
    model(mx.array([[1] * n]), cache)
    with pytest.raises(UserError, match="past this model's window"):
        model(mx.array([[1]]), cache)


def test_module_names_are_the_checkpoint_names(small_loaded):
    from mlx.utils import tree_flatten

    model, _ = small_loaded
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias",
            "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "h.1.ln_2.bias", "ln_f.weight"} <= names


def test_config_reads_n_ctx_and_ignores_unknown_keys():
    config = GPT2Config.from_dict({"n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2, "summary_type": "x"})
    assert config.n_positions == 256


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reorder_and_upcast_attn_matches_transformers_in_half_precision(dtype, tmp_path, ids):
    """The upcast only matters below float32: computed in half precision, ours with it equals transformers'
    eager attention with it, and is closer to it than the same model without the upcast."""
    hf = make_hf_model({**PEAKED, "reorder_and_upcast_attn": True, "attn_implementation": "eager"}, seed=1)
    hf = hf.to(getattr(torch, dtype))
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.float().numpy()
    model, _ = load(write_checkpoint(hf, tmp_path / "m", "hub"), dtype=dtype)
    assert all(block.attn.upcast for block in model.h)
    diff = lambda m: float(np.abs(np.array(m(mx.array(ids)).astype(mx.float32)) - reference).max())
    with_upcast = diff(model)
    for block in model.h:
        block.attn.upcast = False
    without = diff(model)
    print(f"{dtype}: max |logits - transformers| {with_upcast:.3g} with the upcast, {without:.3g} without")
    assert with_upcast < without and with_upcast < (0.05 if dtype == "float16" else 0.5)
