"""`inspect ...`: look inside the model; parse, call the API, print.

Each command prints a table by default, JSON with `--json` (shapes in the README), and also draws a PNG
with `--png FILE` (matplotlib, the `viz` extra).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import typer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..analysis.trace import LogitLens, Trace
    from ..model import GPT2
    from ..tokenizer import Tokenizer

from .common import OUTPUT, command, model_option, read_prompt

inspect_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None,
    help="Look inside the model.\n\nAttention, the logit lens, the next tokens and the embeddings of a text.",
)


def register(app: typer.Typer) -> None:
    app.add_typer(inspect_app, name="inspect")


TextArg = typer.Argument(..., metavar="TEXT", help="The text to look at; '-' reads stdin (one trailing newline dropped).")
ModelOpt = model_option()
JsonOpt = typer.Option(False, "--json", help="Print JSON (shape documented in the README) instead of a table.", rich_help_panel=OUTPUT)
PngOpt = typer.Option(None, "--png", help="Also draw a picture into this PNG file (needs mlx-gpt2[viz]).", rich_help_panel=OUTPUT)
ForceOpt = typer.Option(False, "--force", help="Replace an existing --png file.", rich_help_panel=OUTPUT)


def prepare(model: str, text: str, png: Optional[Path], force: bool) -> tuple[GPT2, Tokenizer, str]:
    """Check the picture can be drawn and written before the (slow) load, then load; -> (model, tokenizer, text)."""
    if png is not None:
        from ..convert import resolve_source
        from ..fileio import check_output
        from ..analysis.viz import require_matplotlib

        require_matplotlib()
        check_output(png, force=force, inputs=[resolve_source(model)], kind="file")
    from .. import load

    text = read_prompt(text, what="TEXT")
    lm, tokenizer = load(model)
    return lm, tokenizer, text


def save_figure(figure: Figure, png: Path, force: bool) -> None:
    from ..fileio import claim_output
    from ..analysis.viz import save_png

    with claim_output(png, force=force, kind="file") as path:
        typer.echo(f"wrote {save_png(figure, path)}", err=True)  # stderr, so --json output stays pure


def print_json(model: str, tokens: list[str], token_ids: list[int], **fields: Any) -> None:
    """One JSON object on stdout: the model and input tokens, then the command's own fields."""
    data = {"model": model, "tokens": tokens, "token_ids": token_ids, **fields}
    typer.echo(json.dumps(data, ensure_ascii=False))


def rounded(values: np.ndarray) -> list:
    # Six decimals are far below anything a plot or a reader can see, and keep the JSON compact.
    return np.round(values.astype(np.float64), 6).tolist()


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first two (index, token) left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def show(token: str, limit: int = 14) -> str:
    """A token quoted, so leading spaces show, and cut to `limit` characters."""
    shown = repr(token)
    return shown if len(shown) <= limit else shown[: limit - 2] + "…" + shown[-1]


def _attention_table(t: Trace, layer: int, head: int) -> str:
    """One head as a lower-triangular matrix: rows are queries, columns key positions."""
    L = len(t.tokens)
    probs = t.attentions[layer, head]
    rows = []
    for q in range(L):  # the future (k > q) is masked: blank, not 0.00
        rows.append([str(q), show(t.tokens[q]), *(f"{probs[q, k]:.2f}" if k <= q else "" for k in range(L))])
    title = f"layer {layer}, head {head}: attention probabilities (rows: query, columns: key position)"
    return title + "\n" + table(["#", "token", *map(str, range(L))], rows)


def _heads_table(t: Trace, layer: int) -> str:
    """Every head at once: for each query, the key that head attends to most, and how much."""
    rows = []
    for q, token in enumerate(t.tokens):
        keys = t.attentions[layer, :, q].argmax(axis=-1)  # [n_head]
        cells = [f"{show(t.tokens[k], 10)}@{k} {t.attentions[layer, h, q, k]:.2f}" for h, k in enumerate(keys)]
        rows.append([str(q), show(token), *cells])
    title = f"layer {layer}: the key each head attends to most, per query (token@position probability)"
    return title + "\n" + table(["#", "token", *(f"head {h}" for h in range(t.n_head))], rows)


@command(inspect_app)
def attention(
    text: str = TextArg,
    model: str = ModelOpt,
    layer: int = typer.Option(0, "--layer", "-l", help="Block index, 0 to n_layer - 1."),
    head: Optional[int] = typer.Option(None, "--head", help="Head index, 0 to n_head - 1 (default: all heads)."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """Attention probabilities of one head, or of every head of a layer."""
    from ..analysis.trace import check_index, trace

    lm, tokenizer, text = prepare(model, text, png, force)
    check_index("--layer", layer, lm.config.n_layer, "layers")
    if head is not None:
        check_index("--head", head, lm.config.n_head, "heads per layer")
    t = trace(lm, tokenizer, text)
    heads = list(range(t.n_head)) if head is None else [head]
    if as_json:
        attentions = rounded(t.attentions[layer, heads])  # [len(heads), L, L]
        print_json(model, t.tokens, t.token_ids, layer=layer, heads=heads, attentions=attentions)
    else:
        typer.echo(_heads_table(t, layer) if head is None else _attention_table(t, layer, head))
    if png is not None:
        from ..analysis.viz import attention_figure

        save_figure(attention_figure(t, layer=layer, head=head), png, force)


def _lens_json(lens: LogitLens) -> list:
    """[n_layer + 1][L][top] of {"token_id", "token", "prob"}."""
    depths, L, top = lens.top_ids.shape

    def entry(d: int, p: int, j: int) -> dict:
        prob = round(float(lens.top_probs[d, p, j]), 6)
        return {"token_id": int(lens.top_ids[d, p, j]), "token": lens.top_tokens[d][p][j], "prob": prob}

    return [[[entry(d, p, j) for j in range(top)] for p in range(L)] for d in range(depths)]


def _lens_table(lens: LogitLens) -> str:
    """Rows: blocks applied (0 is the embeddings); columns: input tokens; cells: the top-1 next token."""
    rows = []
    for d, (names, probs) in enumerate(zip(lens.top_tokens, lens.top_probs)):
        cells = [f"{show(n[0], 12)} {p[0]:.2f}" for n, p in zip(names, probs)]
        rows.append(["embeddings" if d == 0 else str(d), "", *cells])
    title = "logit lens: the top next token (probability) after each number of blocks, at each input token"
    return title + "\n" + table(["blocks", "", *(show(token, 12) for token in lens.tokens)], rows)


@command(inspect_app, "logit-lens")
def logit_lens(
    text: str = TextArg,
    model: str = ModelOpt,
    top: int = typer.Option(5, "--top", "-k", help="Tokens per layer and position in --json (tables show 1)."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """The model's guess for the next token after 0, 1, ..., n_layer blocks, at every position."""
    from ..analysis.trace import logit_lens as run_lens, trace

    lm, tokenizer, text = prepare(model, text, png, force)
    t = trace(lm, tokenizer, text)
    lens = run_lens(lm, tokenizer, t, top=top)
    if as_json:
        print_json(model, t.tokens, t.token_ids, top=_lens_json(lens))
    else:
        typer.echo(_lens_table(lens))
    if png is not None:
        from ..analysis.viz import logit_lens_figure

        save_figure(logit_lens_figure(lens), png, force)


@command(inspect_app, "next")
def next_token(
    text: str = TextArg,
    model: str = ModelOpt,
    top: int = typer.Option(10, "--top", "-k", help="How many candidates to show."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """The most likely next tokens after TEXT, with their probabilities."""
    from ..analysis.trace import encode, next_tokens

    lm, tokenizer, text = prepare(model, text, png, force)
    ids = encode(lm, tokenizer, text)
    tokens = [tokenizer.decode([i]) for i in ids]
    candidates = next_tokens(lm, tokenizer, ids, top=top)
    if as_json:
        rounded = [{**dataclasses.asdict(c), "prob": round(c.prob, 6), "logprob": round(c.logprob, 6)}
                   for c in candidates]
        print_json(model, tokens, ids, next=rounded)
    else:
        rows = [[str(r), show(c.token, 24), str(c.token_id), f"{c.prob:.4f}"]
                for r, c in enumerate(candidates, start=1)]
        prompt = show("".join(tokens)[-60:], 64)  # the end is what the model continues
        title = f"next token after {prompt} ({len(ids)} tokens)"
        typer.echo(title + "\n" + table(["rank", "token", "id", "prob"], rows))
    if png is not None:
        from ..analysis.viz import next_tokens_figure

        save_figure(next_tokens_figure(candidates, tokens), png, force)


def _embeddings_table(t: Trace, lm: GPT2) -> str:
    """Per token: its id, the norms of its token and position embeddings and of their sum, and a peek."""
    c = lm.config
    title = (f"token embeddings wte: {c.vocab_size} x {c.n_embd}; position embeddings wpe: {c.n_positions} x "
             f"{c.n_embd}; this input: {len(t.tokens)} tokens -> {len(t.tokens)} x {c.n_embd}")
    rows = []
    for p, (token, i) in enumerate(zip(t.tokens, t.token_ids)):
        vectors = (t.token_embeddings[p], t.position_embeddings[p], t.residual_stream[0, p])
        peek = " ".join(f"{x:+.3f}" for x in t.residual_stream[0, p, :4]) + " ..."
        rows.append([str(p), show(token), str(i), *(f"{np.linalg.norm(v):.3f}" for v in vectors), peek])
    return title + "\n" + table(["#", "token", "id", "|token|", "|position|", "|sum|", "sum[:4]"], rows)


@command(inspect_app)
def embeddings(
    text: str = TextArg,
    model: str = ModelOpt,
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """Token embeddings, position embeddings and their sum for each token of TEXT."""
    from ..analysis.trace import trace

    lm, tokenizer, text = prepare(model, text, png, force)
    t = trace(lm, tokenizer, text)
    if as_json:
        c = lm.config
        print_json(model, t.tokens, t.token_ids, vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
              token_embeddings=rounded(t.token_embeddings), position_embeddings=rounded(t.position_embeddings),
              embeddings=rounded(t.residual_stream[0]))
    else:
        typer.echo(_embeddings_table(t, lm))
    if png is not None:
        from ..analysis.viz import embeddings_figure

        save_figure(embeddings_figure(t), png, force)
