"""CLI commands for quantization and perplexity (`perplexity`): parse, call the API, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main app."""
    from .cli import PanelCommand, user_errors

    app.command("perplexity", cls=PanelCommand)(user_errors(perplexity_command))


def perplexity_command(
    model: str = typer.Option("gpt2", "--model", "-m", help="Hub repo id, Hub-format directory, or converted directory."),
    file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text to score ('-' reads stdin)."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per window (default: the model's 1024)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between windows (default: half the context)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Windows evaluated together."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, float16 or bfloat16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
) -> None:
    """Strided perplexity of a model on a text file: each token scored once, with up to context - stride tokens of left context."""
    from .cli import read_stdin, read_text_file
    from .loading import load
    from .perplexity import perplexity

    text = read_stdin("--file") if str(file) == "-" else read_text_file(file, what="--file")
    lm, tokenizer = load(model, revision=revision, dtype=dtype)
    result = perplexity(lm, tokenizer, text, context=context, stride=stride, batch_size=batch_size)
    typer.echo(
        f"perplexity: {result.perplexity:.4f}\n"
        f"tokens scored: {result.tokens} (context {result.context}, stride {result.stride})\n"
        f"speed: {result.tokens_per_second:.1f} tokens/s ({result.seconds:.1f} s)"
    )
