"""Hooks: read or replace any activation of the forward pass, by the checkpoint's own names.

`run_with_cache(model, tokens)` returns the logits and an `ActivationCache` of every named point;
`run_with_hooks(model, tokens, hooks={name: fn})` runs the pass with `fn(activation) -> activation` at each
named point (return None to leave it as it was). The pass walks the model's own submodules, with each
block's attention on its explicit path (`Attention.explicit`), so the numbers are the model's; the model's
normal forward (fused attention, KV cache) is untouched and pays nothing for any of this.

The points, for block i (`B` batch, `L` tokens, `D` n_embd, `H` heads, `d` head_dim, `F` the MLP width),
and TransformerLens's name for the same numbers (`HookedTransformer` loaded without weight processing):

| ours | shape | TransformerLens |
|---|---|---|
| `wte` | [B, L, D] | `hook_embed` |
| `wpe` | [B, L, D] | `hook_pos_embed` |
| `h.i.resid_pre` | [B, L, D] | `blocks.i.hook_resid_pre` |
| `h.i.ln_1` | [B, L, D] | `blocks.i.ln1.hook_normalized` x `ln_1.weight` + `ln_1.bias` (TL hooks before the affine) |
| `h.i.attn.q` / `.k` / `.v` | [B, H, L, d] | `blocks.i.attn.hook_q` / `hook_k` / `hook_v`, which are [B, L, H, d] |
| `h.i.attn.scores` | [B, H, L, L] | `blocks.i.attn.hook_attn_scores` (scaled, the future at -inf) |
| `h.i.attn.pattern` | [B, H, L, L] | `blocks.i.attn.hook_pattern` |
| `h.i.attn.z` | [B, L, H, d] | `blocks.i.attn.hook_z` |
| `h.i.attn.c_proj` | [B, L, D] | `blocks.i.hook_attn_out` |
| `h.i.resid_mid` | [B, L, D] | `blocks.i.hook_resid_mid` |
| `h.i.ln_2` | [B, L, D] | `blocks.i.ln2.hook_normalized` x `ln_2.weight` + `ln_2.bias` |
| `h.i.mlp.c_fc` | [B, L, F] | `blocks.i.mlp.hook_pre` |
| `h.i.mlp.act` | [B, L, F] | `blocks.i.mlp.hook_post` |
| `h.i.mlp.c_proj` | [B, L, D] | `blocks.i.hook_mlp_out` |
| `h.i.resid_post` | [B, L, D] | `blocks.i.hook_resid_post` |
| `ln_f` | [B, L, D] | `ln_final.hook_normalized` x `ln_f.weight` + `ln_f.bias` |

Caching everything keeps two [B, H, L, L] arrays per layer: for gpt2 at its full 1024-token window that is
1.2 GB in float32, so pass `names=` to keep only what you need.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..activations import ACTIVATIONS
from ..errors import UserError
from ..model import GPT2, check_ids

HookFn = Callable[[mx.array], "mx.array | None"]

_ATTENTION = ("q", "k", "v", "scores", "pattern", "z")
_BLOCK = ("resid_pre", "ln_1", *(f"attn.{n}" for n in _ATTENTION), "attn.c_proj", "resid_mid", "ln_2",
          "mlp.c_fc", "mlp.act", "mlp.c_proj", "resid_post")


def hook_names(model: GPT2) -> list[str]:
    """Every named point of `model`'s forward pass, in the order the pass reaches them."""
    blocks = [f"h.{i}.{name}" for i in range(model.config.n_layer) for name in _BLOCK]
    return ["wte", "wpe", *blocks, "ln_f"]


def transformer_lens_name(name: str) -> str:
    """TransformerLens's name for one of ours (see the table above; some differ in layout or affine)."""
    plain = {"wte": "hook_embed", "wpe": "hook_pos_embed", "ln_f": "ln_final.hook_normalized"}
    if name in plain:
        return plain[name]
    _, layer, rest = name.split(".", 2)
    inside = {"ln_1": "ln1.hook_normalized", "ln_2": "ln2.hook_normalized", "attn.c_proj": "hook_attn_out",
              "attn.scores": "attn.hook_attn_scores", "mlp.c_fc": "mlp.hook_pre", "mlp.act": "mlp.hook_post",
              "mlp.c_proj": "hook_mlp_out"}
    if rest in inside:
        return f"blocks.{layer}.{inside[rest]}"
    if rest.startswith("attn."):
        return f"blocks.{layer}.attn.hook_{rest[5:]}"
    return f"blocks.{layer}.hook_{rest}"


def check_names(model: GPT2, names: Sequence[str]) -> list[str]:
    """`names` as a list, each a point of `model`; an unknown one is a UserError naming the closest."""
    known = set(hook_names(model))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see analysis.hooks.hook_names(model)"
            raise UserError(f"{name!r} is not a hook point of this model{hint}")
    return list(names)


def as_batch(model: GPT2, tokens: Sequence[int] | Sequence[Sequence[int]] | mx.array) -> mx.array:
    """Token ids as a checked [B, L] array: one sequence, equal-length sequences, or an array of either."""
    if isinstance(tokens, (mx.array, np.ndarray)):
        tokens = np.array(tokens).tolist()
    rows = [list(tokens)] if not tokens or not isinstance(tokens[0], (list, tuple)) else [list(r) for r in tokens]
    if not rows[0] or len({len(r) for r in rows}) != 1:
        raise UserError("the tokens must be one non-empty sequence, or sequences of one length")
    if len(rows[0]) > model.config.n_positions:
        raise UserError(f"the text is {len(rows[0])} tokens; this model sees at most {model.config.n_positions}")
    return mx.array([check_ids(r, model.config.vocab_size, what="the tokens") for r in rows])


class _Point:
    """Hands each activation to the hook for its name (if any), checking what comes back."""

    def __init__(self, hooks: Mapping[str, HookFn]) -> None:
        self.hooks = hooks

    def __call__(self, name: str, value: mx.array) -> mx.array:
        fn = self.hooks.get(name)
        if fn is None:
            return value
        out = fn(value)
        if out is None:
            return value
        if not isinstance(out, mx.array) or out.shape != value.shape:
            shape = getattr(out, "shape", type(out).__name__)
            raise UserError(f"the hook for {name} returned {shape}; it must return an mx.array of {value.shape}")
        return out


def hooked_hidden(model: GPT2, tokens: mx.array, point: Callable[[str, mx.array], mx.array]) -> mx.array:
    """[B, L] ids -> [B, L, D] final-normed residual stream, each named point through `point`."""
    B, L = tokens.shape
    x = point("wte", model.wte(tokens)) + point("wpe", mx.broadcast_to(model.wpe(mx.arange(L)), (B, L, model.config.n_embd)))
    return hooked_blocks(model, x, point)


def hooked_blocks(model: GPT2, x: mx.array, point: Callable[[str, mx.array], mx.array], start: int = 0) -> mx.array:
    """The residual stream entering block `start` ([B, L, D]) through the rest of the model, then ln_f."""
    for i in range(start, len(model.h)):
        block, p = model.h[i], f"h.{i}."
        x = point(p + "resid_pre", x)
        attn = block.attn.explicit(point(p + "ln_1", block.ln_1(x)), hook=lambda n, v, p=p: point(p + "attn." + n, v))
        x = point(p + "resid_mid", x + point(p + "attn.c_proj", attn))
        pre = point(p + "mlp.c_fc", block.mlp.c_fc(point(p + "ln_2", block.ln_2(x))))
        act = point(p + "mlp.act", ACTIVATIONS[block.mlp.activation](pre))
        x = point(p + "resid_post", x + point(p + "mlp.c_proj", block.mlp.c_proj(act)))
    return point("ln_f", model.ln_f(x))


def run_with_hooks(model: GPT2, tokens, hooks: Mapping[str, HookFn]) -> mx.array:
    """[B, L, vocab] logits (or [L, vocab] for one sequence) with `hooks` applied at their points."""
    check_names(model, list(hooks))
    batch = as_batch(model, tokens)
    logits = model.head(hooked_hidden(model, batch, _Point(hooks)))
    return logits if _is_batch(tokens) else logits[0]


def _is_batch(tokens) -> bool:
    if isinstance(tokens, (mx.array, np.ndarray)):
        return tokens.ndim == 2
    return bool(tokens) and isinstance(tokens[0], (list, tuple))


class ActivationCache(Mapping[str, mx.array]):
    """Name -> activation (an evaluated mx.array, batch first) for every point a run kept."""

    def __init__(self, activations: dict[str, mx.array]) -> None:
        self._activations = activations

    def __getitem__(self, name: str) -> mx.array:
        if name not in self._activations:
            close = difflib.get_close_matches(str(name), list(self._activations), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (pass it in names=)"
            raise KeyError(f"{name!r} was not cached{hint}")
        return self._activations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def numpy(self, name: str) -> np.ndarray:
        """One activation as a float32 numpy array (numpy has no bfloat16)."""
        return np.array(self[name].astype(mx.float32))


def run_with_cache(model: GPT2, tokens, names: Sequence[str] | Callable[[str], bool] | None = None,
                   ) -> tuple[mx.array, ActivationCache]:
    """Logits (as `run_with_hooks`) and the activations at `names` (default: every point; or a predicate)."""
    wanted = hook_names(model) if names is None else (
        [n for n in hook_names(model) if names(n)] if callable(names) else check_names(model, names))
    kept: dict[str, mx.array] = {}

    def keep(value: mx.array, *, name: str) -> None:
        kept[name] = value

    logits = run_with_hooks(model, tokens, {n: (lambda v, n=n: keep(v, name=n)) for n in wanted})
    mx.eval(logits, kept)
    return logits, ActivationCache(kept)
