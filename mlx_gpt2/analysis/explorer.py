"""The explorer: one self-contained HTML page that walks through GPT-2 on a text, figure by figure.

`explorer_data(model, tokenizer, text)` runs the text once through the hooked forward pass and keeps what
the page shows; `render_page(data)` puts it, the script and the style into one file (`explorer.html` in
this folder is the template). Nothing is fetched: no CDN, no font, and a Content-Security-Policy that
forbids any request, so the page works offline and leaks nothing.

"Load what is shown": the page parses a summary up front, and each token's attention rows (every layer
and head, for that query) and its block details only when that token is selected. Attention is stored as
thousandths (uint16), vectors as float16, both base64; past `ATTENTION_BUDGET` stored numbers (gpt2 past
about 200 tokens; gpt2-xl's 1200 heads at 1024 tokens would be 630M) each query keeps only its strongest
keys per head, and the page says so. Block details (q, k, v, scores, ...) are kept for the last
`DETAIL_TOKENS` tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from importlib import resources

import mlx.core as mx
import numpy as np

from ..model import GPT2
from ..tokenizer import Tokenizer
from .hooks import as_batch, hooked_hidden
from .neurons import top_neurons
from .saliency import saliency
from .trace import check_index, encode, lens_top, token_label

ATTENTION_BUDGET = 3_000_000  # numbers of attention stored (2 bytes each): in full below this, else top keys
MIN_TOP_KEYS = 4
DETAIL_TOKENS = 128
EMBED_DIMS = 48  # dimensions of each vector drawn as a strip of cells in the embedding figure
TOP = 10


def _b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def _f16(values) -> str:
    return _b64(np.clip(np.asarray(values, dtype=np.float32), -65504, 65504), "<f2")


def _thousandths(probs: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(probs, dtype=np.float32) * 1000).astype("<u2")


class _Collector:
    """The hook point of one pass: keeps each layer's attention rows compactly as the pass reaches them,
    so peak memory is one layer's [H, L, L], not all of them; and the few full activations the page needs."""

    def __init__(self, n_layer: int, L: int, detail_layer: int, top_keys: int | None) -> None:
        self.L, self.detail_layer, self.top_keys = L, detail_layer, top_keys
        self.rows: list[list] = [[None] * n_layer for _ in range(L)]  # [query][layer] -> encoded [H, keys]
        self.kept: dict[str, np.ndarray] = {}
        self.neurons: list = [None] * n_layer  # [layer][query] -> top 5 (neuron, activation)
        self.layer_top: list = [None] * n_layer  # [layer] -> the TOP neurons most active anywhere

    def __call__(self, name: str, value: mx.array) -> mx.array:
        parts = name.split(".")
        if name.endswith("attn.pattern"):
            self._pattern(int(parts[1]), np.array(value[0].astype(mx.float32)))  # [H, L, L]
        elif name.endswith("mlp.act"):
            self._neurons(int(parts[1]), np.array(value[0].astype(mx.float32)))  # [L, F]
        if name.endswith(("resid_pre", "resid_post")) or (
                len(parts) > 2 and int(parts[1]) == self.detail_layer) or name in ("wte", "wpe"):
            self.kept[name] = np.array(value[0].astype(mx.float32))
        return value

    def _neurons(self, layer: int, acts: np.ndarray) -> None:
        best = np.argsort(-acts, axis=-1, kind="stable")[:, :5]
        self.neurons[layer] = [[[int(n), round(float(a[n]), 4)] for n in row] for row, a in zip(best, acts)]
        self.layer_top[layer] = [[n.neuron, round(n.activation, 4), n.position]
                                 for n in top_neurons(acts[None], top=min(TOP, acts.shape[-1]))[0]]

    def _pattern(self, layer: int, pattern: np.ndarray) -> None:
        for q in range(self.L):
            rows = pattern[:, q, : q + 1]  # [H, q + 1]: the future is masked, so never stored
            if self.top_keys is None or q + 1 <= self.top_keys:
                self.rows[q][layer] = {"full": _b64(_thousandths(rows), "<u2")}
            else:
                keys = np.sort(np.argpartition(-rows, self.top_keys - 1, axis=-1)[:, : self.top_keys], axis=-1)
                values = np.take_along_axis(rows, keys, axis=-1)
                self.rows[q][layer] = {"keys": _b64(keys, "<u2"), "values": _b64(_thousandths(values), "<u2")}


def _top_keys(model: GPT2, L: int) -> int | None:
    c = model.config
    stored = c.n_layer * c.n_head * L * (L + 1) // 2
    if stored <= ATTENTION_BUDGET:
        return None
    return max(MIN_TOP_KEYS, ATTENTION_BUDGET // (2 * c.n_layer * c.n_head * L))  # a key and a value each


def _detail(kept: dict, layer: int, q: int, scores: np.ndarray) -> dict:
    """One token's numbers inside block `layer`, as float16 base64 strings (shapes in the template)."""
    p = f"h.{layer}."
    H = scores.shape[0]
    return {
        "ln_1": _f16(kept[p + "ln_1"][q]),
        "q": _f16(kept[p + "attn.q"][:, q]), "k": _f16(kept[p + "attn.k"][:, q]), "v": _f16(kept[p + "attn.v"][:, q]),
        "scores": _f16(scores[:, q, : q + 1].reshape(H, -1)),  # [H, q + 1]: scaled q.k, before the softmax
        "z": _f16(kept[p + "attn.z"][q]), "attn_out": _f16(kept[p + "attn.c_proj"][q]),
        "ln_2": _f16(kept[p + "ln_2"][q]), "act": _f16(kept[p + "mlp.act"][q]),
        "mlp_out": _f16(kept[p + "mlp.c_proj"][q]),
    }


def explorer_data(model: GPT2, tokenizer: Tokenizer, text: str | Sequence[int], *, layer: int = 0,
                  name: str = "") -> dict:
    """Everything the page shows for `text`; `layer` is the block drawn step by step (figures 2 and 4)."""
    c = model.config
    check_index("layer", layer, c.n_layer, "layers")
    ids = encode(model, tokenizer, text)
    L = len(ids)
    collect = _Collector(c.n_layer, L, layer, _top_keys(model, L))
    hooked_hidden(model, as_batch(model, ids), collect)
    kept = collect.kept
    residual = [kept["h.0.resid_pre"]] + [kept[f"h.{i}.resid_post"] for i in range(c.n_layer)]  # [n_layer + 1] x [L, D]
    # The lens after the last block is the model's own prediction: its top TOP are the next-token figure,
    # so the output head runs once over the text for both.
    next_ids, next_probs = lens_top(model, residual[-1], min(TOP, c.vocab_size))  # [L, TOP] each
    lens = [lens_top(model, r, 1) for r in residual[:-1]] + [(next_ids[:, :1], next_probs[:, :1])]
    scores = kept[f"h.{layer}.attn.scores"]
    target = int(next_ids[-1, 0])
    sal = saliency(model, ids, target)
    decode = [token_label(tokenizer.decode([i])) for i in ids]
    first_detail = max(0, L - DETAIL_TOKENS)
    return {
        "model": name, "config": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "head_dim": c.head_dim,
                                  "n_inner": c.ffn_dim, "n_positions": c.n_positions, "vocab_size": c.vocab_size},
        "tokens": decode, "token_ids": ids, "layer": layer, "top_keys": collect.top_keys, "detail_from": first_detail,
        "embeddings": {name: {"norms": np.linalg.norm(v, axis=-1).round(4).tolist(), "dims": _f16(v[:, :EMBED_DIMS])}
                       for name, v in (("wte", kept["wte"]), ("wpe", kept["wpe"]), ("sum", kept["h.0.resid_pre"]))},
        "residual_norms": np.round([np.linalg.norm(r, axis=-1) for r in residual], 3).tolist(),  # [n_layer + 1, L]
        "lens": {"tokens": [[token_label(tokenizer.decode([int(i)])) for i in ids_[:, 0]] for ids_, _ in lens],
                 "probs": [np.round(p[:, 0], 4).tolist() for _, p in lens]},
        "next": [[[token_label(tokenizer.decode([int(i)])), int(i), round(float(p), 5)] for i, p in zip(row_i, row_p)]
                 for row_i, row_p in zip(next_ids, next_probs)],
        "saliency": {"target": token_label(tokenizer.decode([target])), "target_id": target, "method": sal.method,
                     "shares": np.round(sal.shares, 5).tolist(), "scores": np.round(sal.scores, 5).tolist()},
        "neurons": collect.neurons,  # [n_layer][L] -> top 5 (neuron, activation)
        "layer_top_neurons": collect.layer_top,  # [n_layer] -> (neuron, activation, position), most active first
        "attention": collect.rows,  # [L][n_layer]: per query, per layer, its heads' rows (see the template)
        "detail": {q: _detail(kept, layer, q, scores) for q in range(first_detail, L)},
    }


def _script_json(value) -> str:
    # Inside <script>, "</script>" or "<!--" in a token would end the element: escape every "<".
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_page(data: dict) -> str:
    """The page, as one string: the template with the summary, and one lazily parsed block per token."""
    template = resources.files(__package__).joinpath("explorer.html").read_text(encoding="utf-8")
    rows, details = data["attention"], data["detail"]
    summary = {k: v for k, v in data.items() if k not in ("attention", "detail")}
    blocks = [f'<script type="application/json" id="summary">{_script_json(summary)}</script>']
    for q, row in enumerate(rows):  # parsed only when token q is selected
        blocks.append(f'<script type="application/json" id="attn-{q}">{_script_json(row)}</script>')
    for q, detail in details.items():
        blocks.append(f'<script type="application/json" id="detail-{q}">{_script_json(detail)}</script>')
    title = f"Inside {data['model'] or 'GPT-2'}".replace("&", "&amp;").replace("<", "&lt;")
    return template.replace("<!--TITLE-->", title).replace("<!--DATA-->", "\n".join(blocks))
