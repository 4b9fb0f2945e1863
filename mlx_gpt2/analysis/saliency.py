"""Input saliency: how much each input token's embedding drives one output token's logit (ECCO's views).

Both methods differentiate the target logit at a position with respect to the token embeddings (the rows
of `wte`; position embeddings are added after, as the model does), through `mx.grad`:

- "gradient_x_input": gradient x embedding;
- "integrated_gradients": the embedding x the gradient averaged along the straight path from a zero
  embedding (a right Riemann sum of `steps` points, all of them one batch). Its per-token sums add up to
  the logit's change from the zero input to the real one, as `steps` grows (completeness).

Each token gets `scores`, the signed sum of its attribution vector, and `shares`, that vector's L2 norm
divided by the sum of all tokens' norms (ECCO's normalised view, which sums to 1).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model import GPT2
from .hooks import as_batch

SALIENCY_METHODS = ("gradient_x_input", "integrated_gradients")
_TOKENS_PER_BATCH = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class Saliency:
    target: int  # the output token whose logit is explained
    position: int  # where its logit is read (the prediction made after that input token)
    method: str
    attributions: np.ndarray  # [L, n_embd]
    scores: np.ndarray  # [L]: attributions summed over the embedding
    shares: np.ndarray  # [L]: L2 norms, normalised to sum to 1


def _target_logit(model: GPT2, tokens: mx.array, target: int, position: int):
    """embeddings [S, L, D] -> the sum over the S copies of `target`'s logit at `position`."""

    def f(embeddings: mx.array) -> mx.array:
        # The model's own fused blocks (not the hooked pass): the gradient then keeps no [H, L, L] arrays
        dtype = model.ln_f.weight.dtype
        x = embeddings.astype(dtype) + model.wpe(mx.arange(tokens.shape[1]))
        for block in model.h:
            x = block(x, "causal", None)
        return model.head(model.ln_f(x[:, position]))[:, target].astype(mx.float32).sum()

    return f


def saliency(model: GPT2, tokens, target: int, *, position: int = -1, method: str = "gradient_x_input",
             steps: int = 32) -> Saliency:
    """Attribution of `target`'s logit at `position` to each input token (one text)."""
    batch = as_batch(model, tokens)
    if batch.shape[0] != 1:
        raise UserError("saliency takes one text")
    if method not in SALIENCY_METHODS:
        raise UserError(f"saliency method must be one of {', '.join(SALIENCY_METHODS)}, got {method!r}")
    if not isinstance(target, int) or not 0 <= target < model.config.vocab_size:
        raise UserError(f"the target token must be an id in 0-{model.config.vocab_size - 1}, got {target!r}")
    L = batch.shape[1]
    if not -L <= position < L:
        raise UserError(f"position must be in 0-{L - 1} (or negative from the end), got {position}")
    if not 1 <= steps <= 1024:
        raise UserError(f"steps must be in 1-1024, got {steps}")
    # float32 whatever the model's dtype: gradients of half-precision logits are too coarse to rank tokens
    embeddings = model.wte(batch).astype(mx.float32)  # [1, L, D]
    grad = mx.grad(_target_logit(model, batch, target, position % L))
    if method == "gradient_x_input":
        attributions = (grad(embeddings) * embeddings)[0]
    else:
        alphas = mx.arange(1, steps + 1, dtype=mx.float32) / steps
        per_batch = max(1, _TOKENS_PER_BATCH // L)  # the path's points run in batches of bounded size
        total = mx.zeros_like(embeddings[0])
        for start in range(0, steps, per_batch):
            chunk = alphas[start:start + per_batch][:, None, None]  # [S, 1, 1]
            total = total + grad(chunk * embeddings).sum(axis=0)
            mx.eval(total)
        attributions = total / steps * embeddings[0]
    norms = mx.linalg.norm(attributions, axis=-1)
    mx.eval(attributions, norms)
    total = float(norms.sum())
    return Saliency(target=target, position=position % L, method=method, attributions=np.array(attributions),
                    scores=np.array(attributions.sum(axis=-1)),
                    shares=np.array(norms) / total if total > 0 else np.zeros(L, dtype=np.float32))
