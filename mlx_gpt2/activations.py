"""GPT-2's activation functions: the tanh GELU it was trained with, fast and exact, and the table of every
activation transformers accepts for GPT-2, by the name `config.json` gives it.

To add an activation: a function of one array here, its name in `ACTIVATIONS` (the name transformers
uses in `activation_function`), and a test against transformers' `ACT2FN` in tests/test_model.py.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

# GPT-2 was trained with the tanh approximation of GELU ("gelu_new"), not the exact erf GELU. MLX's CPU
# tanh costs ~18 ns an element here (~30% of a LoRA step), so tanh is a rational function instead
# (Eigen's and XLA's fast float tanh, within 4e-7), fused by `mx.compile` into one kernel: 168 -> 8 ms
# forward on [512, 3072]. Compiled per shape (~1 ms a new shape): the shapeless form split into several
# kernels with 38 MB of temporaries there. (x / (1 + exp(-2u)), the same function, fused shapeless with no
# temporaries but ran ~6% slower per LoRA step.)
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)  # fmt: skip
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805  # beyond it the rational function's value rounds to +-1 in float32
_C = math.sqrt(2.0 / math.pi)


def _tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    p, q = _TANH_P[-1], _TANH_Q[-1]
    for c in _TANH_P[-2::-1]:
        p = p * x2 + c
    for c in _TANH_Q[-2::-1]:
        q = q * x2 + c
    return x * p / q


def _tanh_u(y: mx.array) -> mx.array:
    return _tanh(_C * (y + 0.044715 * y * y * y))  # tanh(u), u = c (x + 0.044715 x^3)


@mx.compile
def _gelu_tanh_forward(x: mx.array) -> mx.array:
    y = x.astype(mx.float32)  # float32 whatever the input (the smallest coefficients underflow float16)
    return (0.5 * y * (1.0 + _tanh_u(y))).astype(x.dtype)


@mx.compile
def _gelu_tanh_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    # d/dx 0.5 x (1 + tanh(u)) = 0.5 (1 + t) + 0.5 x (1 - t^2) u',  u = c (x + 0.044715 x^3)
    y = x.astype(mx.float32)
    t = _tanh_u(y)
    du = _C * (1.0 + 3 * 0.044715 * y * y)
    return (cotangent * (0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * du)).astype(cotangent.dtype)


# A hand-written derivative: autograd would keep several [tokens, 3072] intermediates per block; this
# one fused kernel keeps only x.
@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), with its own derivative."""
    return _gelu_tanh_forward(x)


@gelu_tanh.vjp
def _gelu_tanh_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _gelu_tanh_backward(x, cotangent)  # (one input, one output: arrays, not lists)


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "gelu": nn.gelu,
    "gelu_python": nn.gelu,
    "gelu_10": lambda x: mx.clip(nn.gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "relu2": lambda x: mx.square(nn.relu(x)),
    "relu6": nn.relu6,
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),
    "silu": nn.silu,
    "swish": nn.silu,
    "hardswish": nn.hardswish,
    "mish": nn.mish,
    "sigmoid": mx.sigmoid,
    "tanh": mx.tanh,
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + mx.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: mx.sqrt(nn.softplus(x)),
}
