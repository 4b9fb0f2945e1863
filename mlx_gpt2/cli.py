"""The `mlx-gpt2` command line: each command parses its options, calls the public API, and prints."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

from .errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="GPT-2 in MLX: convert, generate, quantize, fine-tune and inspect.",
)
F = TypeVar("F", bound=Callable)


def fail(message: str) -> None:
    """Print one line on stderr and exit non-zero: user errors never show a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def user_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def parse_logit_bias(items: list[str]) -> dict[int, float] | None:
    bias = {}
    for item in items:
        token, sep, value = item.partition(":")
        try:
            bias[int(token)] = float(value) if sep else float("nan")
        except ValueError:
            raise UserError(f"--logit-bias takes TOKEN_ID:BIAS (e.g. 50256:-100), got {item!r}") from None
        if bias[int(token)] != bias[int(token)]:
            raise UserError(f"--logit-bias takes TOKEN_ID:BIAS (e.g. 50256:-100), got {item!r}")
    return bias or None


ModelOpt = typer.Option("gpt2", "--model", "-m", help="Hub repo id, Hub-format directory, or converted directory.")


@app.command()
@user_errors
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; '-' reads it from stdin."),
    model: str = ModelOpt,
    max_tokens: int = typer.Option(100, "--max-tokens", "-n", help="How many tokens to generate at most."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0: off)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="CTRL penalty, > 1 discourages repeats."),
    logit_bias: List[str] = typer.Option([], "--logit-bias", help="TOKEN_ID:BIAS, repeatable."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text."),
    stop: List[str] = typer.Option([], "--stop", help="Stop before this string (repeatable); it is not printed."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past <|endoftext|>."),
    on_overflow: str = typer.Option("slide", "--on-overflow", help="Past the 1024-token window: slide, stop or error."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, float16 or bfloat16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed and peak memory to stderr."),
) -> None:
    """Generate text from a prompt, streamed to stdout."""
    from . import load, stream_generate

    text = sys.stdin.read() if prompt == "-" else prompt
    bias = parse_logit_bias(logit_bias)
    lm, tokenizer = load(model, revision=revision, dtype=dtype)
    last = None
    for last in stream_generate(
        lm, tokenizer, text, max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, logit_bias=bias, seed=seed, stop=stop or None,
        ignore_eos=ignore_eos, on_overflow=on_overflow,
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose and last is not None:
        typer.echo(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.2f} tokens/s\n"
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.2f} tokens/s\n"
            f"peak memory: {last.peak_memory:.3f} GB\nfinish reason: {last.finish_reason}",
            err=True,
        )


@app.command()
@user_errors
def convert(
    source: str = typer.Argument(..., help="Hub repo id (gpt2, openai-community/gpt2-medium, ...) or local directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
) -> None:
    """Convert a GPT-2 checkpoint from the Hugging Face Hub (or a local directory) to MLX."""
    from .convert import convert as run_convert

    path = run_convert(source, out, dtype=dtype, revision=revision, force=force)
    typer.echo(f"wrote {path}")


def _register_command_groups() -> None:
    """Commands of the other areas live in their own modules; each adds itself to `app`."""
    from . import cli_bench, cli_inspect, cli_lora, cli_quant

    for module in (cli_quant, cli_lora, cli_bench, cli_inspect):
        module.register(app)


_register_command_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
