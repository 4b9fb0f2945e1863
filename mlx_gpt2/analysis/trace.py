"""Look inside GPT-2: embeddings, attention probabilities, q/k/v, the residual stream and the logit lens.

`trace(model, tokenizer, text)` runs one extra forward pass through the model's own submodules (`wte`,
`wpe`, `h[i].ln_1`, `h[i].attn`, ...) with each block's attention on its explicit path
(`Attention.explicit`), which hands every intermediate to a hook, so its probabilities can be kept. The
model's normal forward path is untouched and keeps using the fused `mx.fast.scaled_dot_product_attention`:
tracing costs nothing when it is not used.

Everything a trace returns is a numpy float32 array (whatever the model's dtype, quantized or not), so it
plots, serializes and compares directly. A trace keeps `n_layer x n_head x L^2` attention probabilities;
for gpt2 at the full 1024-token window that is 600 MB, so trace the text you mean to look at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model import GPT2, Block, check_ids
from ..tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)  # == on numpy fields would be ambiguous
class Trace:
    """One text through the model, every intermediate kept. `L` is the number of tokens."""

    token_ids: list[int]
    tokens: list[str]  # each token decoded alone (a partial UTF-8 character shows as U+FFFD)
    token_embeddings: np.ndarray  # [L, n_embd]: the rows of wte for the input tokens
    position_embeddings: np.ndarray  # [L, n_embd]: the rows of wpe for positions 0..L-1
    residual_stream: np.ndarray  # [n_layer + 1, L, n_embd]: embeddings sum, then each block's output
    hidden_states: np.ndarray  # [n_layer + 1, L, n_embd]: as transformers' output_hidden_states (see below)
    after_attention: np.ndarray  # [n_layer, L, n_embd]: x + attn(ln_1(x)) inside each block
    q: np.ndarray  # [n_layer, n_head, L, head_dim]
    k: np.ndarray  # [n_layer, n_head, L, head_dim]
    v: np.ndarray  # [n_layer, n_head, L, head_dim]
    attentions: np.ndarray  # [n_layer, n_head, query, key]: probabilities, each row sums to 1
    logits: np.ndarray  # [L, vocab_size]: the model's own next-token logits at every position

    # hidden_states equals residual_stream except the last entry, which has the final layer norm applied:
    # that is what transformers returns (its output capture swaps the last block's output for
    # last_hidden_state = ln_f(...)). residual_stream keeps the raw last block output for the logit lens.

    @property
    def n_layer(self) -> int:
        return self.attentions.shape[0]

    @property
    def n_head(self) -> int:
        return self.attentions.shape[1]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One possible next token."""

    token_id: int
    token: str
    prob: float
    logprob: float


@dataclasses.dataclass(frozen=True, eq=False)  # == on numpy fields would be ambiguous
class LogitLens:
    """ln_f + head applied to the residual stream after 0..n_layer blocks, as top-k tokens."""

    tokens: list[str]  # the input tokens (positions)
    top_ids: np.ndarray  # [n_layer + 1, L, top]: row 0 reads the embeddings, row i the output of block i-1
    top_probs: np.ndarray  # [n_layer + 1, L, top], each [.., :] sorted most likely first
    top_tokens: list[list[list[str]]]  # the same ids decoded, [n_layer + 1][L][top]


def check_index(name: str, value: int, count: int, what: str) -> None:
    """Refuse an index outside 0..count-1, naming the valid range."""
    if not 0 <= value < count:
        raise UserError(f"{name} must be in 0-{count - 1} (this model has {count} {what}), got {value}")


def token_label(token: str) -> str:
    """A token as one visible line: newlines, tabs and other control characters escaped."""
    escapes = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "".join(escapes.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in token)


def encode(model: GPT2, tokenizer: Tokenizer, text: str | Sequence[int]) -> list[int]:
    """Token ids of `text` (or the ids themselves), checked against the model's window and vocabulary."""
    ids = tokenizer.encode(text) if isinstance(text, str) else check_ids(text, model.config.vocab_size, what="the input")
    if not ids:
        raise UserError("nothing to inspect: the text is empty")
    window = model.config.n_positions
    if len(ids) > window:
        raise UserError(f"the text is {len(ids)} tokens; this model sees at most {window}: shorten it")
    return check_ids(ids, model.config.vocab_size, what="the text")


def _block(block: Block, x: mx.array) -> tuple[mx.array, mx.array, tuple[mx.array, ...]]:
    """One pre-norm block, traced: [1, L, D] -> (after attention, block output, (q, k, v, probabilities)).

    The attention is the model's own explicit path (`Attention.explicit`), its intermediates recorded.
    """
    kept: dict[str, mx.array] = {}

    def record(name: str, value: mx.array) -> mx.array:
        kept[name] = value
        return value

    mid = x + block.attn.explicit(block.ln_1(x), hook=record)
    return mid, mid + block.mlp(block.ln_2(mid)), tuple(kept[n][0] for n in ("q", "k", "v", "pattern"))


def _numpy(x: mx.array) -> np.ndarray:
    # numpy has no bfloat16, and float32 is what plots and comparisons want anyway.
    return np.array(x.astype(mx.float32))


def trace(model: GPT2, tokenizer: Tokenizer, text: str | Sequence[int]) -> Trace:
    """Run `text` (a string, or token ids) through `model`, keeping every intermediate; see `Trace`."""
    ids = encode(model, tokenizer, text)
    tokens = mx.array([ids])  # [1, L]
    x = model.embed(tokens, 0)  # the model's own embedding sum, window check included
    residual, mids, per_layer = [x], [], []
    for block in model.h:
        mid, x, qkvp = _block(block, x)
        residual.append(x)
        mids.append(mid)
        per_layer.append(qkvp)
    final = model.ln_f(x)
    arrays = {
        "token_embeddings": model.wte(tokens)[0],
        "position_embeddings": model.wpe(mx.arange(len(ids))),
        "residual_stream": mx.concatenate(residual),  # [n_layer + 1, L, D]
        "hidden_states": mx.concatenate([*residual[:-1], final]),  # [n_layer + 1, L, D]
        "after_attention": mx.concatenate(mids),  # [n_layer, L, D]
        # each [n_layer, n_head, L, head_dim], and the probabilities [n_layer, n_head, L, L]
        **{name: mx.stack([p[i] for p in per_layer]) for i, name in enumerate(("q", "k", "v", "attentions"))},
        "logits": model.head(final)[0],  # [L, vocab_size]
    }
    mx.eval(arrays)
    tokens_text = [tokenizer.decode([i]) for i in ids]
    return Trace(token_ids=ids, tokens=tokens_text, **{name: _numpy(a) for name, a in arrays.items()})


def _check_top(top: int, vocab_size: int) -> None:
    if not 1 <= top <= vocab_size:
        raise UserError(f"top must be in 1-{vocab_size}, got {top}")


def _top_k(logits: mx.array, top: int) -> tuple[mx.array, mx.array]:
    """[..., vocab] logits -> ([..., top] ids, [..., top] log-probabilities), most likely first."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if top == 1:  # argmax is one pass; MLX's CPU argpartition costs ~0.8 s on [160, 50257]
        ids = mx.argmax(logprobs, axis=-1, keepdims=True)
        return ids, mx.take_along_axis(logprobs, ids, axis=-1)
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[..., :top]
    chosen = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-chosen, axis=-1)  # argpartition leaves the top k unordered
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(chosen, order, axis=-1)


def lens_logits(model: GPT2, t: Trace, depth: int) -> np.ndarray:
    """ln_f + head applied to the residual stream after `depth` blocks (0..n_layer): [L, vocab_size].

    At depth n_layer this is the model's own logits.
    """
    check_index("depth", depth, t.n_layer + 1, "residual streams (embeddings, then one per block)")
    return _numpy(_lens(model, t.residual_stream[depth]))


def _lens(model: GPT2, residual: np.ndarray) -> mx.array:
    """[L, n_embd] residual stream -> [L, vocab_size] logits through the final norm and the head."""
    # The model's own compute dtype (LayerNorm is never quantized), so a half model reads as it runs.
    x = mx.array(residual, dtype=model.ln_f.weight.dtype)
    return model.head(model.ln_f(x))


def lens_top(model: GPT2, residual: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, n_embd] residual stream -> ([L, top] ids, [L, top] probabilities) through ln_f and the head."""
    _check_top(top, model.config.vocab_size)
    ids, logprobs = _top_k(_lens(model, residual), top)
    mx.eval(ids, logprobs)
    return np.array(ids), np.exp(np.array(logprobs))


def logit_lens(model: GPT2, tokenizer: Tokenizer, t: Trace, *, top: int = 5) -> LogitLens:
    """What the model would predict if it stopped after 0, 1, ..., n_layer blocks, at every position."""
    _check_top(top, model.config.vocab_size)
    ids, probs = [], []
    for depth in range(t.n_layer + 1):  # one layer at a time: [L, vocab] at once, not [n_layer + 1, L, vocab]
        layer_ids, layer_probs = lens_top(model, t.residual_stream[depth], top)
        ids.append(layer_ids)
        probs.append(layer_probs)
    top_ids = np.stack(ids)  # [n_layer + 1, L, top]
    names = [[[tokenizer.decode([int(i)]) for i in row] for row in layer] for layer in top_ids]
    return LogitLens(tokens=t.tokens, top_ids=top_ids, top_probs=np.stack(probs), top_tokens=names)


def next_tokens(model: GPT2, tokenizer: Tokenizer, text: str | Sequence[int], *, top: int = 10) -> list[Candidate]:
    """The `top` most likely next tokens after `text`, by the model's normal (fused) forward pass."""
    _check_top(top, model.config.vocab_size)
    ids = encode(model, tokenizer, text)
    top_ids, top_logprobs = _top_k(model(mx.array([ids]))[0, -1], top)
    return [
        Candidate(token_id=i, token=tokenizer.decode([i]), prob=float(np.exp(lp)), logprob=lp)
        for i, lp in zip(top_ids.tolist(), top_logprobs.tolist())
    ]
