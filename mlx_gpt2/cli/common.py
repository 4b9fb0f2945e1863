"""What every command shares: one line per error (`Group`), help grouped in panels (`PanelCommand`), reading
prompts and text files, and the options several commands declare alike."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import typer
import typer.core

from ..errors import UserError

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

    NAME_COLUMN = 28  # longer option names put their help on the next line

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        # One name column for every panel, so the help text lines up down the whole page.
        width = min(max((len(name) for records in sections.values() for name, _ in records), default=0), self.NAME_COLUMN)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl([(name.ljust(width), text) for name, text in records], col_max=self.NAME_COLUMN)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)  # one line, without warnings' file:line prefix


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
    if (value is None) == (file is None):  # a usage mistake, like a missing option: exit 2
        raise typer.BadParameter(f"give {what} TEXT or {what}-file FILE, one of them", param_hint=f"'{what}'")
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


# Help panels: each command's options are listed in these groups, in this order of first use.
INPUT, MODEL, SAMPLING, STOPPING, DECODING, OUTPUT = "Input", "Model", "Sampling", "Stopping", "Decoding", "Output"


def model_option(help: str = "Hub repo id, Hub-format directory, or converted directory.", default: str | None = "gpt2"):
    return typer.Option(default, "--model", "-m", help=help, rich_help_panel=MODEL)


def dtype_option(help: str = "Compute dtype: float32, float16 or bfloat16."):
    return typer.Option(None, "--dtype", help=help, rich_help_panel=MODEL)


def revision_option():
    return typer.Option(None, "--revision", help="Hub revision (branch, tag or commit).", rich_help_panel=MODEL)


def force_option(help: str = "Replace an existing output."):
    return typer.Option(False, "--force", help=help, rich_help_panel=OUTPUT)


def command(app: typer.Typer, name: str | None = None, **settings):
    """`app.command` with this CLI's help (PanelCommand): every command registers through here."""
    return app.command(name, cls=PanelCommand, **settings)


def quiet_option():
    return typer.Option(False, "--quiet", help="No progress bar (it is shown only when stderr is a terminal).", rich_help_panel=OUTPUT)


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr, fed by a `progress(done, total)` callback (the API's progress protocol).

    Off with `quiet`, and off by itself when stderr is not a terminal (tqdm's `disable=None`), so logs and
    pipes get no bar.
    """
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet else None,
                       leave=False, dynamic_ncols=True)  # fmt: skip
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
