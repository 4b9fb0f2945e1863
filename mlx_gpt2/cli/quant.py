"""`perplexity`: parse, call the API, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import INPUT, command, dtype_option, model_option, progress_bar, quiet_option, read_stdin, read_text_file, revision_option

SCORING = "Scoring"


def register(app: typer.Typer) -> None:
    command(app, "perplexity")(perplexity)


def perplexity(
    file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text to score ('-' reads stdin).", rich_help_panel=INPUT),
    model: str = model_option(),
    dtype: Optional[str] = dtype_option(),
    revision: Optional[str] = revision_option(),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per window (default: the model's 1024).", rich_help_panel=SCORING),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between windows (default: half the context).", rich_help_panel=SCORING),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Windows evaluated together.", rich_help_panel=SCORING),
    quiet: bool = quiet_option(),
) -> None:
    """Score a text file: strided perplexity.

    Each token is scored once, with up to context - stride tokens of left context.
    """
    from ..distributed import World
    from ..loading import load
    from ..perplexity import perplexity as score

    world = World.current()  # under mlx.launch: each process scores its share; rank 0 prints
    text = read_stdin("--file") if str(file) == "-" else read_text_file(file, what="--file")
    lm, tokenizer = load(model, revision=revision, dtype=dtype)
    with world.stopped_by_the_launcher(), progress_bar("scoring", unit="tok", quiet=quiet or not world.main) as progress:
        result = score(lm, tokenizer, text, context=context, stride=stride, batch_size=batch_size, progress=progress,
                       world=world)  # fmt: skip
    if not world.main:
        return
    typer.echo(
        f"perplexity: {result.perplexity:.4f}\n"
        f"tokens scored: {result.tokens} (context {result.context}, stride {result.stride})\n"
        f"speed: {result.tokens_per_second:.1f} tokens/s ({result.seconds:.1f} s)"
    )
