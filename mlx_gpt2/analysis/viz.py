"""Pictures of a trace, drawn with matplotlib (the optional `viz` extra: `pip install 'mlx-gpt2[viz]'`).

Each function returns a matplotlib `Figure` drawn on the Agg canvas: headless, and without pyplot, so the
caller's backend and global state are never touched. `save_png(figure, path)` writes it atomically.
Figure sizes grow with the number of tokens, within bounds, so labels stay readable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import UserError
from ..fileio import atomic_file
from .trace import Candidate, LogitLens, Trace, check_index, token_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
MAX_LABELS = 64  # past this many tokens an axis labels every n-th one


def require_matplotlib() -> None:
    """Raise a one-line UserError naming the install command when matplotlib is missing."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UserError("drawing a PNG needs matplotlib: pip install 'mlx-gpt2[viz]'") from None


def _figure(width: float, height: float) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: PNGs without a display
    return figure


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _text(token: str) -> str:
    # A bare "$" would start matplotlib's mathtext.
    return token_label(token).replace("$", r"\$")


def _label_axis(ax: Axes, tokens: Sequence[str], axis: str) -> None:
    """Tokens as tick labels on one axis; every n-th one when there are too many to read."""
    step = math.ceil(len(tokens) / MAX_LABELS)
    ticks = list(range(0, len(tokens), step))
    labels = [_text(tokens[i]) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    else:
        ax.set_yticks(ticks, labels, fontsize=8)


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG through a temporary sibling file; return the path."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; name a .png file")
    with atomic_file(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _heatmap(ax: Axes, probs: np.ndarray, tokens: Sequence[str], *, left: bool, bottom: bool):
    """One [query, key] attention map; keys along x, queries down y."""
    from matplotlib import colormaps

    # The masked future is left blank, so it reads as "cannot see", not as "chose not to look".
    future = np.triu(np.ones(probs.shape, dtype=bool), k=1)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_where(future, probs), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    # In a grid only the outer panels carry the tokens; the inner ones share them.
    if bottom:
        _label_axis(ax, tokens, "x")
    else:
        ax.set_xticks([])
    if left:
        _label_axis(ax, tokens, "y")
    else:
        ax.set_yticks([])
    return image


def attention_figure(t: Trace, *, layer: int, head: int | None = None) -> Figure:
    """One head's attention as a heatmap with the tokens on both axes, or (head=None) all heads as a grid."""
    check_index("layer", layer, t.n_layer, "layers")
    L = len(t.tokens)
    if head is not None:
        check_index("head", head, t.n_head, "heads per layer")
        side = _clamp(2.5 + 0.3 * L, 5.0, 24.0)
        figure = _figure(side + 1.0, side)
        ax = figure.add_subplot()
        image = _heatmap(ax, t.attentions[layer, head], t.tokens, left=True, bottom=True)
        ax.set(title=f"layer {layer}, head {head}", xlabel="key (attended to)", ylabel="query")
        figure.colorbar(image, ax=ax, shrink=0.8, label="probability")
        return figure
    cols = math.ceil(math.sqrt(t.n_head))
    rows = math.ceil(t.n_head / cols)
    panel = _clamp(1.2 + 0.15 * L, 2.0, 6.0)
    figure = _figure(cols * panel + 1.5, rows * panel + 0.5)
    axes = figure.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= t.n_head:
            ax.set_axis_off()
            continue
        image = _heatmap(ax, t.attentions[layer, h], t.tokens, left=h % cols == 0, bottom=h // cols == rows - 1)
        ax.set_title(f"head {h}", fontsize=9)
    figure.suptitle(f"layer {layer}: attention of every head (rows: queries, columns: keys)")
    figure.colorbar(image, ax=axes, shrink=0.6, label="probability")
    return figure


def logit_lens_figure(lens: LogitLens) -> Figure:
    """The top-1 token after 0..n_layer blocks (rows) at every position (columns), shaded by probability."""
    depths, L = lens.top_probs.shape[:2]
    figure = _figure(_clamp(2.5 + 0.9 * L, 6.0, 32.0), _clamp(1.5 + 0.35 * depths, 3.0, 24.0))
    ax = figure.add_subplot()
    image = ax.imshow(lens.top_probs[:, :, 0], cmap="Blues", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    if L <= 32 and depths <= 50:  # past that the cells are too small for words
        for d in range(depths):
            for p in range(L):
                color = "white" if lens.top_probs[d, p, 0] > 0.6 else "black"
                ax.text(p, d, _text(lens.top_tokens[d][p][0]), ha="center", va="center", fontsize=6, color=color)
    _label_axis(ax, lens.tokens, "x")
    step = math.ceil(depths / MAX_LABELS)
    ax.set_yticks(range(0, depths, step), ["embeddings" if d == 0 else str(d) for d in range(0, depths, step)])
    ax.set(xlabel="input token (the prediction is for the token after it)", ylabel="blocks applied",
           title="logit lens: ln_f + head on the residual stream")
    figure.colorbar(image, ax=ax, shrink=0.8, label="top-1 probability")
    return figure


def embeddings_figure(t: Trace) -> Figure:
    """Token embeddings, position embeddings and their sum (the first residual stream) as [L, n_embd] maps."""
    L, D = t.token_embeddings.shape
    panels = [("token embeddings (wte rows)", t.token_embeddings),
              ("position embeddings (wpe rows)", t.position_embeddings),
              ("their sum: the input of block 0", t.residual_stream[0])]
    height = _clamp(0.6 + 0.22 * L, 1.6, 10.0)
    figure = _figure(11.0, 3 * height + 0.8)
    axes = figure.subplots(3, 1, squeeze=False)[:, 0]
    # One symmetric colour scale for all three, set by the 99th percentile so a few outliers don't wash it out.
    limit = float(np.percentile(np.abs(np.stack([p[1] for p in panels])), 99)) or 1.0
    for ax, (title, values) in zip(axes, panels):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        _label_axis(ax, t.tokens, "y")
        ax.set_title(f"{title}: {L} x {D}", fontsize=10)
    axes[-1].set_xlabel("embedding dimension")
    figure.colorbar(image, ax=list(axes), shrink=0.6, label="value")
    return figure


def next_tokens_figure(candidates: Sequence[Candidate], tokens: Sequence[str]) -> Figure:
    """The most likely next tokens as horizontal bars, the most likely on top."""
    figure = _figure(7.0, _clamp(1.5 + 0.35 * len(candidates), 2.5, 20.0))
    ax = figure.add_subplot()
    labels = [_text(c.token) for c in candidates][::-1]
    ax.barh(range(len(candidates)), [c.prob for c in candidates][::-1], color="tab:blue")
    ax.set_yticks(range(len(candidates)), labels, fontsize=9)
    prompt = token_label("".join(tokens))
    prompt = prompt if len(prompt) <= 60 else "..." + prompt[-57:]  # the end is what the model continues
    ax.set(xlabel="probability", title=f'next token after "{prompt}"'.replace("$", r"\$"))
    return figure


def ablation_figure(tokens: Sequence[str], clean: Sequence[tuple[str, float]], ablated: Sequence[float], title: str) -> Figure:
    """The clean run's top next tokens as bars, each beside its probability with the ablation applied."""
    figure = _figure(7.5, _clamp(1.5 + 0.4 * len(clean), 2.5, 20.0))
    ax = figure.add_subplot()
    y = np.arange(len(clean))[::-1]
    ax.barh(y + 0.2, [p for _, p in clean], height=0.4, color="tab:blue", label="clean")
    ax.barh(y - 0.2, list(ablated), height=0.4, color="tab:orange", label="ablated")
    ax.set_yticks(y, [_text(t) for t, _ in clean], fontsize=9)
    ax.set(xlabel="probability of the next token", title=title.replace("$", r"\$"))
    ax.legend(loc="lower right")
    return figure


def patching_figure(recovered: np.ndarray, columns: Sequence[str], *, xlabel: str, title: str) -> Figure:
    """A layer x (position or head) map of the share of the clean-corrupted logit difference a patch recovers."""
    layers, width = recovered.shape
    figure = _figure(_clamp(2.5 + 0.45 * width, 5.0, 32.0), _clamp(1.5 + 0.35 * layers, 3.0, 24.0))
    ax = figure.add_subplot()
    limit = max(1.0, float(np.nanmax(np.abs(recovered))) if np.isfinite(recovered).any() else 1.0)
    image = ax.imshow(recovered, cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto", interpolation="nearest")
    _label_axis(ax, columns, "x")
    step = math.ceil(layers / MAX_LABELS)
    ax.set_yticks(range(0, layers, step), [str(i) for i in range(0, layers, step)])
    ax.set(xlabel=xlabel, ylabel="layer", title=title.replace("$", r"\$"))
    figure.colorbar(image, ax=ax, shrink=0.8, label="logit difference recovered")
    return figure


def saliency_figure(tokens: Sequence[str], shares: np.ndarray, title: str) -> Figure:
    """Each input token's share of the attribution, as bars in text order."""
    figure = _figure(_clamp(2.5 + 0.45 * len(tokens), 5.0, 32.0), 4.0)
    ax = figure.add_subplot()
    ax.bar(range(len(tokens)), shares, color="tab:purple")
    _label_axis(ax, tokens, "x")
    ax.set(ylabel="share of the attribution", title=title.replace("$", r"\$"))
    return figure


def neurons_figure(tokens: Sequence[str], activations: np.ndarray, neurons: Sequence[int], layer: int) -> Figure:
    """Chosen neurons of one layer (rows) at every token (columns)."""
    figure = _figure(_clamp(2.5 + 0.45 * len(tokens), 5.0, 32.0), _clamp(1.5 + 0.3 * len(neurons), 3.0, 20.0))
    ax = figure.add_subplot()
    values = activations[:, list(neurons)].T  # [neurons, L]
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    _label_axis(ax, tokens, "x")
    ax.set_yticks(range(len(neurons)), [str(n) for n in neurons], fontsize=8)
    ax.set(ylabel="neuron", title=f"layer {layer}: the most active MLP neurons at each token")
    figure.colorbar(image, ax=ax, shrink=0.8, label="activation (GELU output)")
    return figure
