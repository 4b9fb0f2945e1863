"""Interventions: ablate heads and MLP neurons, patch a clean run into a corrupted one, attribute a logit.

All of it is `run_with_hooks` with small replacement functions, so each result is a forward pass anyone
can redo with TransformerLens hooks (tests/test_interventions.py does exactly that):

- `ablate`: a head's output `h.i.attn.z[:, :, head]`, or a neuron `h.i.mlp.act[:, :, n]`, replaced by
  zero, by its mean over a reference text ("mean"), or by its value in a reference text of the same length
  at the same position ("resample").
- `patch`: the clean run's activation at one point (`resid_pre` by default) copied into the corrupted run,
  one layer x position at a time; `patch_heads`: one head's `z` at every position. Each reports the logit
  difference answer - wrong at the last position, and the share of the clean-corrupted gap it recovers.
  The patches of one layer run as one batch, from that layer on (the blocks before it are the corrupted
  run's own, computed once).
- `direct_logit_attribution`: the final residual stream at a position split into its parts (embeddings,
  each head, each layer's attention bias, each MLP), each through ln_f's scale and the unembedding of one
  token. The parts sum to that token's logit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model import GPT2
from .hooks import as_batch, hooked_blocks, run_with_cache, run_with_hooks

METHODS = ("zero", "mean", "resample")
PATCH_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn.c_proj", "mlp.c_proj")
_TOKENS_PER_BATCH = 4096  # patched copies run in batches of about this many tokens


def _check_pairs(pairs: Sequence[tuple[int, int]], layers: int, count: int, what: str) -> list[tuple[int, int]]:
    out = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(p, int) for p in pair):
            raise UserError(f"each {what} is (layer, index), got {pair!r}")
        layer, index = pair
        if not (0 <= layer < layers and 0 <= index < count):
            raise UserError(f"{what} {layer}.{index} is not in this model: layers 0-{layers - 1}, {what}s 0-{count - 1}")
        out.append((layer, index))
    return out


@dataclasses.dataclass(frozen=True)
class Ablation:
    """What to knock out, and with what: validated once, here."""

    heads: tuple[tuple[int, int], ...] = ()  # (layer, head)
    neurons: tuple[tuple[int, int], ...] = ()  # (layer, neuron of the MLP)
    method: str = "zero"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"ablation method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.heads and not self.neurons:
            raise UserError("nothing to ablate: name at least one head (layer.head) or neuron (layer.neuron)")

    def checked(self, model: GPT2) -> Ablation:
        c = model.config
        return dataclasses.replace(self, heads=tuple(_check_pairs(self.heads, c.n_layer, c.n_head, "head")),
                                   neurons=tuple(_check_pairs(self.neurons, c.n_layer, c.ffn_dim, "neuron")))


def _replacements(model: GPT2, ablation: Ablation, tokens: mx.array, reference: mx.array | None) -> dict:
    """name -> (mask over the last axis or heads, replacement values) for every ablated point."""
    points: dict[str, list[int]] = {}
    for layer, head in ablation.heads:
        points.setdefault(f"h.{layer}.attn.z", []).append(head)
    for layer, neuron in ablation.neurons:
        points.setdefault(f"h.{layer}.mlp.act", []).append(neuron)
    source = None
    if ablation.method != "zero":
        ref = tokens if reference is None else reference
        if ablation.method == "resample" and (reference is None or ref.shape[1] != tokens.shape[1]):
            raise UserError(f"resample ablation takes a reference text of the same length ({tokens.shape[1]} tokens)")
        _, source = run_with_cache(model, ref, names=list(points))
    out = {}
    for name, indices in points.items():
        is_head = name.endswith("attn.z")
        width = model.config.n_head if is_head else model.config.ffn_dim
        mask = np.zeros(width, dtype=bool)
        mask[indices] = True
        mask = mx.array(mask).reshape((width, 1) if is_head else (width,))  # heads: [H, 1] against [B, L, H, d]
        if source is None:
            value = mx.array(0.0)
        elif ablation.method == "mean":
            value = source[name].mean(axis=(0, 1))  # over texts and positions: [H, d] or [F]
        else:
            value = source[name]  # the reference's own value at each position
        out[name] = (mask, value)
    return out


def ablate(model: GPT2, tokens, ablation: Ablation, *, reference=None) -> mx.array:
    """Logits with `ablation` applied (shape as `run_with_hooks`). `reference`: the tokens the mean or the
    resampled values come from (mean: the input itself unless given; resample: required, same length)."""
    ablation = ablation.checked(model)
    batch = as_batch(model, tokens)
    ref = None if reference is None else as_batch(model, reference)
    hooks = {name: (lambda v, m=mask, r=value: mx.where(m, r, v).astype(v.dtype))
             for name, (mask, value) in _replacements(model, ablation, batch, ref).items()}
    return run_with_hooks(model, tokens, hooks)


@dataclasses.dataclass(frozen=True, eq=False)
class Patching:
    """Activation patching results: `patched` is the logit difference with each patch applied."""

    point: str  # which activation was patched ("resid_pre", ..., or "attn.z" per head)
    clean: float  # logit difference answer - wrong on the clean text
    corrupted: float  # ... and on the corrupted text
    patched: np.ndarray  # [n_layer, L] per layer x position, or [n_layer, n_head] per head

    @property
    def recovered(self) -> np.ndarray:
        """(patched - corrupted) / (clean - corrupted): 1 where a patch restores the clean behaviour."""
        gap = self.clean - self.corrupted
        return (self.patched - self.corrupted) / gap if gap != 0 else np.full_like(self.patched, np.nan)


def _logit_diff(logits: mx.array, answer: int, wrong: int) -> mx.array:
    return logits[..., -1, answer] - logits[..., -1, wrong]  # at the last position


def _patched_runs(model: GPT2, entering: mx.array, layer: int, name: str, clean_value: mx.array, masks: mx.array,
                  answer: int, wrong: int) -> list[float]:
    """The corrupted run once per mask ([n, ...] broadcasting against the activation), the clean value where
    the mask is set; -> each run's logit difference. Every patch is in block `layer` or after, so each run
    starts there from the corrupted residual stream `entering` it ([1, L, D]): the blocks before are the
    corrupted run's own and are not recomputed. Runs in batches of bounded size."""
    L = entering.shape[1]
    per_batch = max(1, _TOKENS_PER_BATCH // L)
    out: list[float] = []
    for start in range(0, masks.shape[0], per_batch):
        m = masks[start:start + per_batch]
        x = mx.broadcast_to(entering, (m.shape[0], *entering.shape[1:]))

        def replace(v: mx.array, m: mx.array = m) -> mx.array:
            return mx.where(m, clean_value, v).astype(v.dtype)

        final = hooked_blocks(model, x, lambda n, v: replace(v) if n == name else v, start=layer)[:, -1:]
        out.extend(_logit_diff(model.head(final), answer, wrong).reshape(-1).tolist())
    return out


def _patch_setup(model: GPT2, clean, corrupted, answer: int, wrong: int, names: list[str]):
    """-> (the corrupted run's residual stream entering each block, the clean activations at `names`,
    the clean and the corrupted logit differences)."""
    clean_b, corrupted_b = as_batch(model, clean), as_batch(model, corrupted)
    if clean_b.shape != corrupted_b.shape or clean_b.shape[0] != 1:
        raise UserError(f"patching takes one clean and one corrupted text of the same length; got "
                        f"{clean_b.shape[1]} and {corrupted_b.shape[1]} tokens")
    for what, token in (("answer", answer), ("wrong", wrong)):
        if not isinstance(token, int) or not 0 <= token < model.config.vocab_size:
            raise UserError(f"the {what} token must be an id in 0-{model.config.vocab_size - 1}, got {token!r}")
    if answer == wrong:
        raise UserError("the answer and the wrong token are the same token: their logit difference is always 0")
    clean_logits, cache = run_with_cache(model, clean_b, names=names)
    entering = [f"h.{i}.resid_pre" for i in range(model.config.n_layer)]
    corrupted_logits, corrupted_cache = run_with_cache(model, corrupted_b, names=entering)
    return ([corrupted_cache[n] for n in entering], cache, _logit_diff(clean_logits, answer, wrong).item(),
            _logit_diff(corrupted_logits, answer, wrong).item())


def patch(model: GPT2, clean, corrupted, *, answer: int, wrong: int, point: str = "resid_pre") -> Patching:
    """Patch `point` of every layer from the clean run into the corrupted one, one position at a time."""
    if point not in PATCH_POINTS:
        raise UserError(f"patch point must be one of {', '.join(PATCH_POINTS)}, got {point!r}")
    names = [f"h.{i}.{point}" for i in range(model.config.n_layer)]
    entering, cache, clean_diff, corrupted_diff = _patch_setup(model, clean, corrupted, answer, wrong, names)
    L = entering[0].shape[1]
    masks = mx.eye(L, dtype=mx.bool_)[:, :, None]  # [L runs, L positions, 1]: run p patches position p
    table = [_patched_runs(model, entering[i], i, n, cache[n], masks, answer, wrong) for i, n in enumerate(names)]
    return Patching(point=point, clean=clean_diff, corrupted=corrupted_diff, patched=np.array(table))


def patch_heads(model: GPT2, clean, corrupted, *, answer: int, wrong: int) -> Patching:
    """Patch each head's output `z` (all positions) from the clean run into the corrupted one."""
    names = [f"h.{i}.attn.z" for i in range(model.config.n_layer)]
    entering, cache, clean_diff, corrupted_diff = _patch_setup(model, clean, corrupted, answer, wrong, names)
    H = model.config.n_head
    masks = mx.eye(H, dtype=mx.bool_)[:, None, :, None]  # [H runs, 1, H heads, 1] against [B, L, H, d]
    table = [_patched_runs(model, entering[i], i, n, cache[n], masks, answer, wrong) for i, n in enumerate(names)]
    return Patching(point="attn.z", clean=clean_diff, corrupted=corrupted_diff, patched=np.array(table))


@dataclasses.dataclass(frozen=True, eq=False)
class Attribution:
    """Direct logit attribution of one token at one position; the parts sum to `logit`."""

    token: int
    position: int
    logit: float  # the model's logit for `token` there
    embeddings: float  # wte + wpe
    heads: np.ndarray  # [n_layer, n_head]
    attn_bias: np.ndarray  # [n_layer]: c_proj's bias, which belongs to no head
    mlps: np.ndarray  # [n_layer]
    ln_f_bias: float  # ln_f's bias through the unembedding (no layer's doing)


def _unembedding(model: GPT2, token: int) -> mx.array:
    """The head's column for `token`, [D]: the gradient of a linear map is its row, quantized or not."""
    zero = mx.zeros((model.config.n_embd,), dtype=model.ln_f.weight.dtype)
    return mx.grad(lambda x: model.head(x)[token].astype(mx.float32))(zero).astype(mx.float32)


def direct_logit_attribution(model: GPT2, tokens, token: int, *, position: int = -1) -> Attribution:
    """How much each head and MLP writes, directly, into `token`'s logit at `position` (one text)."""
    batch = as_batch(model, tokens)
    if batch.shape[0] != 1:
        raise UserError("direct logit attribution takes one text")
    if not isinstance(token, int) or not 0 <= token < model.config.vocab_size:
        raise UserError(f"the token must be an id in 0-{model.config.vocab_size - 1}, got {token!r}")
    L = batch.shape[1]
    if not -L <= position < L:
        raise UserError(f"position must be in 0-{L - 1} (or negative from the end), got {position}")
    position %= L
    n, H = model.config.n_layer, model.config.n_head
    names = ["wte", "wpe", "h.%d.resid_post" % (n - 1)] + [f"h.{i}.{p}" for i in range(n) for p in ("attn.z", "mlp.c_proj")]
    logits, cache = run_with_cache(model, batch, names=names)
    final = cache[f"h.{n - 1}.resid_post"][0, position].astype(mx.float32)
    scale = mx.sqrt(mx.var(final) + model.config.layer_norm_epsilon)
    unembedding = _unembedding(model, token)  # [D]
    direction = model.ln_f.weight.astype(mx.float32) * unembedding

    def through_ln(parts: mx.array) -> mx.array:  # [..., D] -> [...]: centred, scaled, unembedded
        parts = parts.astype(mx.float32)
        return ((parts - parts.mean(axis=-1, keepdims=True)) / scale) @ direction

    heads, biases, mlps = [], [], []
    for i, block in enumerate(model.h):
        z = cache[f"h.{i}.attn.z"][0, position]  # [H, d]
        alone = (mx.eye(H, dtype=z.dtype)[:, :, None] * z).reshape(H, -1)  # [H runs, D]: one head each
        bias = block.attn.c_proj(mx.zeros((1, z.size), dtype=z.dtype))[0]
        heads.append(through_ln(block.attn.c_proj(alone) - bias))
        biases.append(through_ln(bias))
        mlps.append(through_ln(cache[f"h.{i}.mlp.c_proj"][0, position]))
    embeddings = through_ln(cache["wte"][0, position] + cache["wpe"][0, position])
    ln_bias = model.ln_f.bias.astype(mx.float32) @ unembedding
    heads, biases, mlps = mx.stack(heads), mx.stack(biases), mx.stack(mlps)
    mx.eval(heads, biases, mlps, embeddings, ln_bias)
    return Attribution(token=token, position=position, logit=logits[0, position, token].item(),
                       embeddings=embeddings.item(), heads=np.array(heads), attn_bias=np.array(biases),
                       mlps=np.array(mlps), ln_f_bias=ln_bias.item())
