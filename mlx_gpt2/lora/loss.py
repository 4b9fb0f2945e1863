"""The training loss: masked next-token cross-entropy, in as little memory as the model allows.

Two things dominate the memory of a GPT-2 training step: each block's activations, kept for the backward
pass (gradient checkpointing keeps only each block's input and recomputes the rest), and the output
head's `[tokens, 50257]` logits with the softmax and gradient arrays autograd builds from them (about five
arrays of 100 MB per 512 tokens). With LoRA the head is frozen, so its backward pass is only
`d loss / d hidden = (softmax - onehot) @ W`: `fused_head_loss` computes that in the forward pass, one
slice of tokens at a time, so the logits never exist whole. The arithmetic is the same as autograd's.

Slices are small because MLX allocates each operation's output when it queues the operation, and keeps
about ten operations queued ahead of the one running: with 512-token slices (103 MB of logits each) every
slice of a 2048-token batch was allocated at once. Measured on gpt2's shape, batch 4 x 511 tokens, with
gradient checkpointing: 0.91 GB above the weights with 64-token slices, 1.46 GB with 512-token slices.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..backend.cpu_quantized import dequantized_head

LOSS_CHUNK = 64  # tokens per slice of the head (see below for why so few)


def hidden_states(model: nn.Module, inputs: mx.array, *, checkpoint: bool = False) -> mx.array:
    """[B, T] ids -> [B, T, n_embd], final-normed; with `checkpoint`, blocks recompute in the backward pass."""
    if not checkpoint:
        return model.hidden(inputs)
    x = model.embed(inputs, 0)
    for block in model.h:
        x = _checkpointed(block)(x)
    return model.ln_f(x)


def _checkpointed(block: nn.Module) -> Callable[[mx.array], mx.array]:
    def run(params: dict, x: mx.array) -> mx.array:
        block.update(params)  # the traced parameters, so gradients reach them through the checkpoint
        return block(x, "causal", None)

    return lambda x: mx.checkpoint(run)(block.trainable_parameters(), x)


def head_is_trainable(model: nn.Module) -> bool:
    head = model.lm_head if "lm_head" in model else model.wte
    return bool(tree_flatten(head.trainable_parameters()))


def head_loss(head: Callable, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum of the masked cross-entropy of `head(hidden)`, a slice at a time (no gradient shortcut)."""
    h, t, m = _flat(hidden, targets, mask)
    total = mx.array(0.0)
    for s in range(0, h.shape[0], LOSS_CHUNK):
        # Each slice waits for the running total, so one slice's logits exist at a time (see the top).
        logits = head(mx.depends(h[s : s + LOSS_CHUNK], total) if s else h[s : s + LOSS_CHUNK]).astype(mx.float32)
        total = total + (nn.losses.cross_entropy(logits, t[s : s + LOSS_CHUNK]) * m[s : s + LOSS_CHUNK]).sum()
    return total


def fused_head_loss(head: Callable, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """`head_loss` for a frozen head, with d loss / d hidden computed slice by slice in the forward pass."""
    h, t, m = _flat(hidden, targets, mask)

    @mx.custom_function
    def loss_and_grad(h: mx.array, t: mx.array, m: mx.array) -> tuple[mx.array, mx.array]:
        # One float32 array per slice, [n, D + 1] = (d loss / d hidden, each token's loss). Each slice's
        # input depends on the previous slice's result, so MLX finishes (and frees) one slice's logits
        # before it computes the next: left to itself it would compute them all first.
        pieces: list[mx.array] = []
        for s in range(0, h.shape[0], LOSS_CHUNK):
            h_slice = mx.depends(h[s : s + LOSS_CHUNK], pieces[-1]) if pieces else h[s : s + LOSS_CHUNK]
            pieces.append(_slice_loss_and_grad(head, h_slice, t[s : s + LOSS_CHUNK], m[s : s + LOSS_CHUNK]))
        packed = mx.concatenate(pieces)
        return packed[:, -1].sum(), packed[:, :-1].astype(h.dtype)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals: list, cotangents: list, outputs: list) -> tuple:
        return cotangents[0] * outputs[1], mx.zeros_like(primals[1]), mx.zeros_like(primals[2])

    return loss_and_grad(h, t, m)[0]


def _slice_loss_and_grad(head: Callable, h: mx.array, t: mx.array, m: mx.array) -> mx.array:
    """[n, D + 1]: d loss / d h in the first D columns, each token's masked loss in the last."""
    logits = head(h).astype(mx.float32)  # [n, vocab]
    # One exp per logit, shared by the loss and the softmax (logsumexp then softmax would take two): on the
    # CPU backend exp runs one element at a time, and 50257 of them per token are a measurable part of a step.
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    lse = (top + mx.log(total))[:, 0]
    picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    # d loss / d logits = (softmax - onehot(target)) * mask, then back through the head to the hidden state
    grad = e * (m[:, None] / total)
    grad = mx.put_along_axis(grad, t[:, None], mx.take_along_axis(grad, t[:, None], axis=-1) - m[:, None], axis=-1)
    _, (grad_h,) = mx.vjp(head, [h], [grad.astype(h.dtype)])
    return mx.concatenate([grad_h.astype(mx.float32), ((lse - picked) * m)[:, None]], axis=1)


def _flat(hidden: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    # [B, T, D] -> [B*T, D]; [B, T] -> [B*T]
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), mask.reshape(-1).astype(mx.float32)


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, *,
            checkpoint: bool = False, fused_head: bool = False) -> tuple[mx.array, mx.array]:  # fmt: skip
    """(mean cross-entropy over the masked targets, number of those targets).

    `fused_head` (only for a frozen head) takes the memory-saving gradient path above.
    """
    hidden = hidden_states(model, inputs, checkpoint=checkpoint)
    head = model.head if head_is_trainable(model) else dequantized_head(model)  # a trained head stays a parameter
    total = (fused_head_loss if fused_head else head_loss)(head, hidden, targets, mask)
    n_tokens = mask.sum()
    return total / n_tokens, n_tokens
