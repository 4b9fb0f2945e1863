"""GPT-2 as an MLX module: (tokens, cache) -> logits.

Attribute names are the checkpoint's names (`wte`, `wpe`, `h[i].ln_1`, `h[i].attn.c_attn`, ...), so the
weight tree has the shape of the call graph. Every rename and transpose lives in `convert/`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import GPT2Config
from .errors import UserError


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
def _gelu_tanh(x: mx.array) -> mx.array:
    return _gelu_tanh_forward(x)


@_gelu_tanh.vjp
def _gelu_tanh_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _gelu_tanh_backward(x, cotangent)  # (one input, one output: arrays, not lists)


_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
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


def check_ids(ids: Sequence[int], vocab_size: int, *, what: str = "the prompt") -> list[int]:
    """`ids` as a list of ints, each checked to have an embedding; anything else is a one-line UserError.

    MLX's embedding lookup does not check its indices: an id past the table reads memory it does not own
    (a crash, or silent garbage), so every id from outside the model (prompts given as ids, prompt-cache
    files, logit biases, API requests) passes through here first. Sampled ids never need it.
    """
    out = list(ids)
    for position, token in enumerate(out):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            shown = repr(token) if len(repr(token)) <= 24 else repr(token)[:21] + "..."
            raise UserError(
                f"{what} holds token id {shown} (at position {position}); this model's token ids are "
                f"integers 0..{vocab_size - 1}"
            )
    return out


class Attention(nn.Module):
    """Masked multi-head self-attention with one fused QKV projection."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # a stability trick from Mistral's GPT-2 runs
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        B, L, D = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        # [B, L, D] -> [B, n_head, L, head_dim]
        q, k, v = (t.reshape(B, L, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        dtype = q.dtype
        if self.upcast and dtype != mx.float32:  # the upcast is the whole point of that option
            q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask).astype(dtype)
        # [B, n_head, L, head_dim] -> [B, L, D]: heads concatenated back
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    """n_embd -> n_inner (4 x n_embd by default) -> n_embd."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd)
        # The activation's name, not the function: compiled functions cannot be copied or pickled, and the
        # model should be (copy.deepcopy, multiprocessing).
        self.activation = config.activation_function

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(_ACTIVATIONS[self.activation](self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT2LMHeadModel: token + position embeddings, n_layer blocks, final norm, output head."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = [Block(config, i) for i in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def embed(self, tokens: mx.array, offset: int, positions: mx.array | None = None) -> mx.array:
        """[B, L] ids -> [B, L, n_embd]: token embedding + position embedding."""
        length = tokens.shape[-1]
        if positions is None:
            if offset + length > self.config.n_positions:
                raise UserError(
                    f"position {offset + length - 1} is past this model's window of {self.config.n_positions} "
                    f"positions; shorten the input (generation slides the window by itself)"
                )
            positions = mx.arange(offset, offset + length)
        return self.wte(tokens) + self.wpe(positions)

    def head(self, x: mx.array) -> mx.array:
        """[..., n_embd] -> [..., vocab_size] logits (the tied embedding, unless the head is untied)."""
        return self.lm_head(x) if "lm_head" in self else self.wte.as_linear(x)

    def hidden(
        self,
        tokens: mx.array,
        cache: list[KVCache] | None = None,
        *,
        mask: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        """The final-layer-normed residual stream, `[B, L, n_embd]`."""
        offset = cache[0].offset if cache else 0
        x = self.embed(tokens, offset, positions)
        if mask is None and tokens.shape[-1] > 1:
            mask = "causal"  # bottom-right aligned, so chunked prefill over a filled cache is right too
        for i, block in enumerate(self.h):
            x = block(x, mask, cache[i] if cache else None)
        return self.ln_f(x)

    def __call__(
        self,
        tokens: mx.array,
        cache: list[KVCache] | None = None,
        *,
        mask: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        """[B, L] token ids -> [B, L, vocab_size] logits. `mask`/`positions` serve left-padded batches."""
        return self.head(self.hidden(tokens, cache, mask=mask, positions=positions))

    @property
    def layers(self) -> list[Block]:
        return self.h
