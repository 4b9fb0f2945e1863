"""`inspect ablate | patch | saliency | neurons | html`: interventions, attributions and the explorer page.

They sit on the `inspect` group beside attention and the logit lens, with the same table / `--json` /
`--png` outputs; `html` writes the self-contained explorer page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
import typer

from ..errors import UserError
from .common import OUTPUT, command
from .inspect import ForceOpt, JsonOpt, ModelOpt, PngOpt, TextArg, inspect_app, prepare, print_json, rounded, save_figure, show, table

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


def register(app: typer.Typer) -> None:
    """Nothing of its own: the commands below join the `inspect` group that inspect.py registers."""


def one_token(tokenizer: Tokenizer, value: str, what: str) -> int:
    """A token given as its text (exactly one token, e.g. ' Mary') or as id:N."""
    if value.startswith("id:"):
        try:
            return int(value[3:])
        except ValueError:
            raise UserError(f"{what} id:N takes an integer token id, got {value!r}") from None
    ids = tokenizer.encode(value)
    if len(ids) != 1:
        shown = [tokenizer.decode([i]) for i in ids]
        raise UserError(f"{what} {value!r} is {len(ids)} tokens {shown}, not one; give one token (mind the leading "
                        "space: ' Mary') or its id as id:N")
    return ids[0]


def _pairs(values: List[str], what: str) -> tuple[tuple[int, int], ...]:
    """LAYER.INDEX values, each option given once or several times, or comma-separated (--head 9.6,9.9)."""
    out = []
    for value in (v.strip() for item in values for v in item.split(",")):
        layer, dot, index = value.partition(".")
        if not (dot and layer.isdigit() and index.isdigit()):
            raise UserError(f"--{what} takes LAYER.INDEX (e.g. 5.1 for layer 5's {what} 1), got {value!r}")
        out.append((int(layer), int(index)))
    return tuple(out)


def _finite_or_null(rows: list) -> list:
    """JSON has no NaN: a share of a zero gap (clean and corrupted alike) is null."""
    return [[v if v == v else None for v in row] for row in rows]


def _top(probs: np.ndarray, k: int) -> list[int]:
    return np.argsort(-probs, kind="stable")[:k].tolist()


def _probs(logits) -> np.ndarray:
    import mlx.core as mx

    return np.array(mx.softmax(logits[-1].astype(mx.float32), axis=-1, precise=True))


@command(inspect_app)
def ablate(
    text: str = TextArg,
    model: str = ModelOpt,
    heads: List[str] = typer.Option([], "--head", help="LAYER.HEAD to knock out; repeat for more."),
    neurons: List[str] = typer.Option([], "--neuron", help="LAYER.NEURON (an MLP neuron) to knock out; repeat for more."),
    method: str = typer.Option("zero", "--method", help="zero, mean (over --reference, else TEXT) or resample (--reference's values)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The text mean and resample ablation take values from."),
    top: int = typer.Option(10, "--top", "-k", help="Next tokens to compare."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """The next-token distribution with heads or neurons ablated, beside the clean one."""
    import mlx.core as mx

    from ..analysis.interventions import Ablation, ablate as run_ablation
    from ..analysis.trace import encode

    spec = Ablation(heads=_pairs(heads, "head"), neurons=_pairs(neurons, "neuron"), method=method)
    lm, tokenizer, text = prepare(model, text, png, force)
    if not 1 <= top <= lm.config.vocab_size:
        raise UserError(f"--top must be in 1-{lm.config.vocab_size}, got {top}")
    ids = encode(lm, tokenizer, text)
    ref = None if reference is None else encode(lm, tokenizer, reference)
    ablated = _probs(run_ablation(lm, ids, spec, reference=ref))
    clean = _probs(lm(mx.array([ids]))[0])  # the clean run needs no hooks: the model's fused pass
    rows = [{"token_id": i, "token": tokenizer.decode([i]), "clean": round(float(clean[i]), 6),
             "ablated": round(float(ablated[i]), 6)} for i in _top(clean, top)]
    tokens = [tokenizer.decode([i]) for i in ids]
    what = ", ".join([f"head {layer}.{h}" for layer, h in spec.heads] + [f"neuron {layer}.{n}" for layer, n in spec.neurons])
    if as_json:
        changed = [{"token_id": i, "token": tokenizer.decode([i]), "prob": round(float(ablated[i]), 6)} for i in _top(ablated, top)]
        print_json(model, tokens, ids, method=method, heads=[list(p) for p in spec.heads],
                   neurons=[list(p) for p in spec.neurons], next=rows, ablated_next=changed)
    else:
        cells = [[str(r), show(row["token"], 24), f"{row['clean']:.4f}", f"{row['ablated']:.4f}",
                  f"{row['ablated'] - row['clean']:+.4f}"] for r, row in enumerate(rows, start=1)]
        typer.echo(f"next token with {what} {method}-ablated\n" + table(["rank", "token", "clean", "ablated", "change"], cells))
    if png is not None:
        from ..analysis.viz import ablation_figure

        figure = ablation_figure(tokens, [(row["token"], row["clean"]) for row in rows], [row["ablated"] for row in rows],
                                 f"{what}, {method}-ablated")
        save_figure(figure, png, force)


@command(inspect_app)
def patch(
    text: str = typer.Argument(..., metavar="CLEAN", help="The clean text; '-' reads stdin."),
    corrupted: str = typer.Option(..., "--corrupted", help="The corrupted text, as many tokens as CLEAN."),
    answer: str = typer.Option(..., "--answer", help="The token the clean text predicts (one token, e.g. ' Mary', or id:N)."),
    wrong: str = typer.Option(..., "--wrong", help="The token the corrupted text predicts instead."),
    point: str = typer.Option("resid_pre", "--point", help="resid_pre, resid_mid, resid_post, attn.c_proj, mlp.c_proj, or heads (each head's z)."),
    model: str = ModelOpt,
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """Activation patching: how much of the clean logit difference each layer x position (or head) restores."""
    from ..analysis.interventions import PATCH_POINTS, patch as run_patch, patch_heads
    from ..analysis.trace import encode

    if point != "heads" and point not in PATCH_POINTS:
        raise UserError(f"--point must be one of {', '.join(PATCH_POINTS)}, heads; got {point!r}")
    lm, tokenizer, text = prepare(model, text, png, force)
    clean_ids, corrupted_ids = encode(lm, tokenizer, text), encode(lm, tokenizer, corrupted)
    a, w = one_token(tokenizer, answer, "--answer"), one_token(tokenizer, wrong, "--wrong")
    result = (patch_heads(lm, clean_ids, corrupted_ids, answer=a, wrong=w) if point == "heads"
              else run_patch(lm, clean_ids, corrupted_ids, answer=a, wrong=w, point=point))
    tokens = [tokenizer.decode([i]) for i in clean_ids]
    columns = [f"head {h}" for h in range(lm.config.n_head)] if point == "heads" else [show(t, 12) for t in tokens]
    if as_json:
        print_json(model, tokens, clean_ids, point=result.point, answer=a, wrong=w, clean_logit_diff=round(result.clean, 6),
                   corrupted_logit_diff=round(result.corrupted, 6), patched_logit_diff=rounded(result.patched),
                   recovered=_finite_or_null(rounded(result.recovered)))
    else:
        cells = [[str(layer), "", *(f"{v:+.2f}" for v in row)] for layer, row in enumerate(result.recovered)]
        title = (f"share of the logit difference {show(tokenizer.decode([a]))} - {show(tokenizer.decode([w]))} "
                 f"recovered by patching {result.point} (clean {result.clean:.3f}, corrupted {result.corrupted:.3f})")
        typer.echo(title + "\n" + table(["layer", "", *columns], cells))
    if png is not None:
        from ..analysis.viz import patching_figure

        xlabel = "head" if point == "heads" else "position patched"
        save_figure(patching_figure(result.recovered, columns, xlabel=xlabel, title=f"activation patching: {result.point}"), png, force)


@command(inspect_app)
def saliency(
    text: str = TextArg,
    model: str = ModelOpt,
    target: Optional[str] = typer.Option(None, "--target", help="The output token to explain (one token or id:N; default: the top next token)."),
    method: str = typer.Option("integrated_gradients", "--method", help="integrated_gradients or gradient_x_input."),
    steps: int = typer.Option(32, "--steps", help="Points on the integrated-gradients path."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """How much each input token drives the next-token logit (gradients through the embeddings)."""
    from ..analysis.saliency import saliency as run_saliency
    from ..analysis.trace import encode, next_tokens

    lm, tokenizer, text = prepare(model, text, png, force)
    ids = encode(lm, tokenizer, text)
    token = one_token(tokenizer, target, "--target") if target is not None else next_tokens(lm, tokenizer, ids, top=1)[0].token_id
    result = run_saliency(lm, ids, token, method=method, steps=steps)
    tokens = [tokenizer.decode([i]) for i in ids]
    if as_json:
        print_json(model, tokens, ids, target=token, target_token=tokenizer.decode([token]), method=method,
                   shares=rounded(result.shares), scores=rounded(result.scores))
    else:
        cells = [[str(p), show(t, 24), f"{s:.4f}", f"{v:+.4f}"] for p, (t, s, v) in enumerate(zip(tokens, result.shares, result.scores))]
        title = f"{method} for the next token {show(tokenizer.decode([token]))} (share of the attribution norm; signed sum)"
        typer.echo(title + "\n" + table(["#", "token", "share", "score"], cells))
    if png is not None:
        from ..analysis.viz import saliency_figure

        save_figure(saliency_figure(tokens, result.shares, f"{method} for {tokenizer.decode([token])!r}"), png, force)


@command(inspect_app)
def neurons(
    text: str = TextArg,
    model: str = ModelOpt,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="One block (default: every block)."),
    top: int = typer.Option(10, "--top", "-k", help="Neurons per layer."),
    factors: int = typer.Option(0, "--factors", help="Also factor the activations into this many NMF factors (needs mlx-gpt2[analysis])."),
    as_json: bool = JsonOpt,
    png: Optional[Path] = PngOpt,
    force: bool = ForceOpt,
) -> None:
    """The most active MLP neurons per layer (where they peak), and optionally ECCO-style neuron factors."""
    from ..analysis.neurons import neuron_activations, neuron_factors, top_neurons
    from ..analysis.trace import check_index, encode

    lm, tokenizer, text = prepare(model, text, png, force)
    if layer is not None:
        check_index("--layer", layer, lm.config.n_layer, "layers")
    layers = list(range(lm.config.n_layer)) if layer is None else [layer]
    ids = encode(lm, tokenizer, text)
    acts = neuron_activations(lm, ids, layers)
    best = top_neurons(acts, top, layers)
    found = neuron_factors(acts, factors) if factors else None
    tokens = [tokenizer.decode([i]) for i in ids]
    if as_json:
        fields = {"layers": [[{"neuron": n.neuron, "activation": round(n.activation, 6), "position": n.position,
                               "activations": rounded(acts[k][:, n.neuron])} for n in row] for k, row in enumerate(best)]}
        if found is not None:
            fields["factors"] = {"token_weights": rounded(found.token_weights.T), "reconstruction_error": round(found.reconstruction_error, 6)}
        print_json(model, tokens, ids, layer_indices=layers, **fields)
    else:
        cells = [[str(row[0].layer), "", *(f"{n.neuron}: {n.activation:.2f} @{show(tokens[n.position], 10)}" for n in row)] for row in best]
        out = "the most active neurons per layer (neuron: peak activation @token)\n" + table(["layer", "", *map(str, range(1, top + 1))], cells)
        if found is not None:
            weights = [[str(p), show(t, 16), *(f"{w:.2f}" for w in found.token_weights[p])] for p, t in enumerate(tokens)]
            out += f"\n\nneuron factors (NMF of the activations, {factors} factors): each token's weight\n"
            out += table(["#", "token", *(f"factor {f}" for f in range(factors))], weights)
        typer.echo(out)
    if png is not None:
        from ..analysis.viz import neurons_figure

        save_figure(neurons_figure(tokens, acts[0], [n.neuron for n in best[0]], layers[0]), png, force)


@command(inspect_app)
def html(
    text: str = TextArg,
    out: Path = typer.Option(..., "--out", "-o", help="The page to write (one self-contained .html file).", rich_help_panel=OUTPUT),
    model: str = ModelOpt,
    layer: int = typer.Option(0, "--layer", "-l", help="The block drawn step by step (figures 2 and 4)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file.", rich_help_panel=OUTPUT),
) -> None:
    """Write the explorer: one offline HTML page that walks through the model on TEXT, figure by figure."""
    from ..analysis.explorer import explorer_data, render_page
    from ..convert import resolve_source
    from ..fileio import atomic_file, check_output, claim_output

    check_output(out, force=force, inputs=[resolve_source(model)], kind="file")
    lm, tokenizer, text = prepare(model, text, None, force)
    if not 0 <= layer < lm.config.n_layer:
        raise UserError(f"--layer must be in 0-{lm.config.n_layer - 1} (this model has {lm.config.n_layer} layers), got {layer}")
    page = render_page(explorer_data(lm, tokenizer, text, layer=layer, name=model))
    with claim_output(out, force=force, kind="file") as path, atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    typer.echo(f"wrote {path} ({len(page.encode()) / 1e6:.2f} MB)", err=True)
