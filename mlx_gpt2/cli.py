"""The `mlx-gpt2` command line: each command parses its options, calls the public API, and prints."""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer
import typer.core

from .errors import UserError

def describe(error: BaseException) -> str:
    """One line for an error a command ended with: what was wrong and, where it helps, what to do."""
    if isinstance(error, OSError) and error.errno in _OS_HINTS:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or type(error).__name__}{where}: {_OS_HINTS[error.errno]}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    if isinstance(error, MemoryError):
        return "out of memory; use a smaller model, a quantized one (--quantize), or shorter inputs"
    if isinstance(error, RecursionError):
        return "an input is nested too deeply to be a real file"
    if isinstance(error, (UserError, ValueError)):
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
    return f"internal error ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); " \
           "please report it with the command you ran (MLX_GPT2_TRACEBACK=1 shows the traceback)"


_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; choose an output on a writable one",
    errno.EACCES: "permission denied; choose a location you can read or write",
    errno.EPERM: "operation not permitted; choose a location you can write",
    errno.EBUSY: "it is busy or a mount point, which cannot be replaced; write into a directory inside it",
    errno.EXDEV: "a mount point cannot be replaced; write into a directory inside it",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ENOENT: "no such file or directory; check the path",
}


def _is_click_error(error: BaseException) -> bool:
    """A usage or parsing error of click (or of the click that typer >= 0.29 vendors): it formats itself."""
    return callable(getattr(error, "format_message", None)) and isinstance(getattr(error, "exit_code", None), int)


class Group(typer.core.TyperGroup):
    """The app's top-level group: every way a command can end becomes one line and an exit code.

    `error: ...` and exit 1 for bad input (and anything else a command raises), exit 2 for usage mistakes
    (an unknown option or command, a value of the wrong type), `interrupted` and exit 130 for Ctrl-C.
    """

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:  # typer would exit 130 without a word
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as error:
            if _is_click_error(error):
                raise
            if os.environ.get("MLX_GPT2_TRACEBACK"):
                raise
            typer.echo(f"error: {describe(error)}", err=True)
            raise typer.Exit(1) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        try:
            result = super().main(args, prog_name or "mlx-gpt2", complete_var, standalone_mode=False, **extra)
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("interrupted", err=True)
            return 130
        except Exception as e:
            if not _is_click_error(e):
                raise
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `mlx-gpt2`: its help
                typer.echo(ctx.get_help())
                return 0
            if e.exit_code == 2:  # click's usage errors
                command = ctx.command_path if ctx is not None else "mlx-gpt2"
                typer.echo(f"error: {e.format_message()} (see '{command} --help')", err=True)
            else:
                typer.echo(f"error: {e.format_message()}", err=True)
            return e.exit_code
        return result if isinstance(result, int) else 0


class PanelCommand(typer.core.TyperCommand):
    """Plain help that reads at 80 columns: options grouped under their panel (`rich_help_panel=`), each
    name in full, help wrapped beside it, and no markup to swallow text such as `mlx-gpt2[viz]`."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records, col_max=28)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)  # one line, without warnings' file:line prefix


app = typer.Typer(
    cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="GPT-2 in MLX: convert, generate, quantize, fine-tune and inspect.",
)
F = TypeVar("F", bound=Callable)


def fail(message: str) -> None:
    """Print one line on stderr and exit non-zero: user errors never show a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def user_errors(command: F) -> F:
    """Kept for the command modules: every error is now turned into one line by `Group`."""
    return command


def read_stdin(what: str) -> str:
    """All of stdin as text: strict UTF-8, as --file reads files (never silently replaced by U+FFFD)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} -: stdin is not UTF-8 text (byte {e.start} is invalid); convert it first") from None


def read_prompt(value: str | None, *, what: str = "--prompt", file: Path | None = None) -> str:
    """The prompt a command was given: `value`; stdin for '-', with one trailing newline dropped (the one
    `echo` adds, which would otherwise be a token of the prompt); or the exact text of `file` ('-': stdin)."""
    if (value is None) == (file is None):
        raise UserError(f"give the prompt with {what} TEXT or with {what}-file FILE (one of them)")
    if file is not None:
        return read_stdin(f"{what}-file") if str(file) == "-" else read_text_file(file, what=f"{what}-file")
    if value != "-":
        return value
    text = read_stdin(what)
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def read_text_file(path: Path, *, what: str) -> str:
    """A UTF-8 text file, exactly; a missing or undecodable one is a one-line UserError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"{what} {path} is not a readable file; pass a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start} is invalid); convert it first") from None


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


@app.command(cls=PanelCommand)
@user_errors
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt; '-' reads stdin (one trailing newline dropped)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt exactly from FILE ('-': stdin)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub repo id or directory (default: gpt2, or the base of --adapter-path)."),
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
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA adapters saved by `mlx-gpt2 lora`."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Speculative decoding: a small model with the same tokenizer."),
    num_draft: int = typer.Option(3, "--num-draft", help="Tokens the draft model proposes per step (>= 1)."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search with this many beams (1: off); greedy, not streamed."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Beam score = log-prob sum / length ** this (default 1)."),
    early_stopping: bool = typer.Option(False, "--early-stopping", help="Beam search ends once num_beams hypotheses are finished."),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache", help="A file from `mlx-gpt2 cache-prompt`; --prompt continues its text."),
) -> None:
    """Generate text from a prompt, streamed to stdout."""
    from . import load, stream_generate

    from .lora.layers import recorded_base

    text = read_prompt(prompt, file=prompt_file)
    bias = parse_logit_bias(logit_bias)
    lm, tokenizer = load(recorded_base(model, adapter_path), revision=revision, dtype=dtype, adapter_path=adapter_path)
    if num_beams != 1 or length_penalty is not None or early_stopping:
        return _generate_beams(
            lm, tokenizer, text, num_beams, max_tokens, length_penalty, early_stopping, ignore_eos,
            {"--temp": temp != 0, "--top-k": top_k != 0, "--top-p": top_p != 1, "--min-p": min_p != 0,
             "--repetition-penalty": repetition_penalty is not None, "--logit-bias": bias, "--stop": stop,
             "--draft-model": draft_model, "--prompt-cache": prompt_cache},
        )
    draft = load(draft_model, revision=None, dtype=dtype)[0] if draft_model else None
    cache, ids = None, text
    if prompt_cache is not None:
        from .prompt_cache import prepare_cached_prompt

        cache, ids = prepare_cached_prompt(prompt_cache, lm, tokenizer, text)
    last, drafted = None, 0
    for last in stream_generate(
        lm, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, logit_bias=bias, seed=seed, stop=stop or None,
        ignore_eos=ignore_eos, on_overflow=on_overflow, cache=cache, draft_model=draft, num_draft=num_draft,
    ):
        drafted += last.from_draft
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
        if draft is not None:
            typer.echo(f"draft: {drafted} of {last.generation_tokens} tokens proposed by the draft model", err=True)


def _generate_beams(
    lm, tokenizer, text: str, num_beams: int, max_tokens: int, length_penalty: Optional[float],
    early_stopping: bool, ignore_eos: bool, conflicts: dict,
) -> None:
    """`generate --num-beams`: beam search is greedy and whole-sequence, so it prints its text at the end."""
    from .beam import beam_generate

    if num_beams == 1:
        raise UserError("--length-penalty and --early-stopping apply to beam search: add --num-beams N (N >= 2)")
    given = [flag for flag, value in conflicts.items() if value]
    if given:
        raise UserError(f"--num-beams is greedy beam search and does not combine with {', '.join(given)}")
    typer.echo(beam_generate(
        lm, tokenizer, text, num_beams=num_beams, max_tokens=max_tokens,
        length_penalty=1.0 if length_penalty is None else length_penalty, early_stopping=early_stopping,
        ignore_eos=ignore_eos,
    ))


@app.command(cls=PanelCommand)
@user_errors
def convert(
    source: str = typer.Argument(..., help="Hub repo id (gpt2, openai-community/gpt2-medium, ...) or local directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights (4 bits, group 64 unless told)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight: 2, 3, 4, 6 or 8 (implies --quantize)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Weights per scale: 32, 64 or 128 (implies --quantize)."),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="Leave the token embedding / output head in float."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'mixed': the most sensitive layers at 8 bits, fitted scales."),
    fit_scales: bool = typer.Option(False, "--fit-scales", help="Fit each group's scale and bias by least squares (lower error, same size)."),
) -> None:
    """Convert a GPT-2 checkpoint from the Hugging Face Hub (or a local directory) to MLX."""
    from .convert import convert as run_convert
    from .quantize import QuantizeConfig

    spec = None
    if quantize or bits is not None or group_size is not None or keep_embeddings or recipe is not None or fit_scales:
        spec = QuantizeConfig(
            bits=4 if bits is None else bits, group_size=64 if group_size is None else group_size,
            keep_embeddings=keep_embeddings, recipe=recipe, fit_scales=fit_scales,
        )
    path = run_convert(source, out, dtype=dtype, revision=revision, force=force, quantize=spec)
    summary = json.loads((path / "config.json").read_text())["mlx_gpt2"].get("quantization")
    typer.echo(f"wrote {path}" + (f" ({summary['bits_per_weight']:.2f} bits per weight)" if summary else ""))


def _register_command_groups() -> None:
    """Commands of the other areas live in their own modules; each adds itself to `app`."""
    from . import cli_bench, cli_inspect, cli_lora, cli_quant

    for module in (cli_quant, cli_lora, cli_bench, cli_inspect):
        module.register(app)


_register_command_groups()


def main() -> None:
    app()

