"""GPT-2 as an MLX module: (tokens, cache) -> logits.

Attribute names are the checkpoint's names (`wte`, `wpe`, `h[i].ln_1`, `h[i].attn.c_attn`, ...), so the
weight tree has the shape of the call graph. Every rename and transpose lives in `convert/`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .activations import ACTIVATIONS
from .cache import KVCache
from .config import GPT2Config
from .errors import UserError


Hook = Callable[[str, mx.array], mx.array]  # (name of an intermediate, its value) -> the value to use


def _identity(name: str, value: mx.array) -> mx.array:
    return value


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

    def heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """[B, L, D] -> q, k, v, each [B, n_head, L, head_dim]: the long QKV vector cut into heads."""
        B, L, D = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)  # [B, L, 3 D] -> 3 x [B, L, D]
        return tuple(t.reshape(B, L, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))

    def _upcast(self, *arrays: mx.array) -> tuple[mx.array, ...]:
        if self.upcast and arrays[0].dtype != mx.float32:  # the upcast is the whole point of that option
            return tuple(a.astype(mx.float32) for a in arrays)
        return arrays

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        """The fast path: one fused scaled-dot-product attention, probabilities never materialised."""
        B, L, D = x.shape
        q, k, v = self.heads(x)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(*self._upcast(q, k, v), scale=self.scale, mask=mask).astype(q.dtype)
        # [B, n_head, L, head_dim] -> [B, L, D]: heads concatenated back
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))

    def explicit(self, x: mx.array, hook: Hook | None = None) -> mx.array:
        """The same attention written out, every step on view: [B, L, D] -> [B, L, D], causal, no cache.

        Each intermediate goes through `hook(name, value)`, which may read or replace it: "q", "k", "v"
        `[B, n_head, L, head_dim]`; "scores" `[B, n_head, L, L]` (q.k^T x scale, the future at -inf);
        "pattern" (the softmax of the scores: each row sums to 1); "z" `[B, L, n_head, head_dim]` (the
        weighted values, before the heads are concatenated and projected by c_proj). The numbers are those
        of the fused path and of transformers' eager attention.
        """
        hook = hook or _identity
        B, L, D = x.shape
        q, k, v = (hook(name, t) for name, t in zip(("q", "k", "v"), self.heads(x)))
        qc, kc, vc = self._upcast(q, k, v)
        scores = (qc @ kc.transpose(0, 1, 3, 2)) * self.scale  # [B, n_head, L, L]
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        # -inf, not a large negative number, so the future gets exactly zero probability.
        scores = hook("scores", mx.where(causal, scores, mx.array(float("-inf"), dtype=scores.dtype)))
        pattern = hook("pattern", mx.softmax(scores, axis=-1, precise=True))
        z = (pattern.astype(vc.dtype) @ vc).astype(q.dtype).transpose(0, 2, 1, 3)  # -> [B, L, n_head, head_dim]
        return self.c_proj(hook("z", z).reshape(B, L, D))


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
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


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
