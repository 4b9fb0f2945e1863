"""Reading JSON safely, and writing outputs so that nothing is ever lost.

Every output goes through the same steps: `check_output` refuses to replace what it was not told to
(an existing output without `force`, or an output that is, contains or lies inside one of the command's
own inputs); `claim_output` holds the output for this process, so a second writer fails at once instead
of racing the first; `atomic_directory` / `atomic_file` write a temporary sibling and rename it into
place, so a failure at any point leaves the previous output whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs are still written atomically
    fcntl = None  # type: ignore[assignment]


def parse_json(text: str | bytes, *, source: str, hint: str = "") -> Any:
    """`json.loads(text)`; bad or absurdly nested JSON is a one-line UserError naming `source`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{source} is nested too deeply to be a real file{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{source} is not valid JSON ({e}){hint}") from None


def read_json(path: Path, *, missing: str, invalid: str = "") -> Any:
    """The JSON in `path`; a missing file or bad JSON is a one-line UserError (`missing`/`invalid` say what to do)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} not found: {missing}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a JSON file: {missing}") from None
    return parse_json(text, source=str(path), hint=invalid)


def _overlap(out: Path, source: Path) -> str | None:
    """How `out` overlaps an input: "is", "contains", "lies inside", or None."""
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def check_output(out: str | Path, *, force: bool, inputs: Iterable[str | Path] = (), kind: str = "directory") -> Path:
    """Refuse an output that would lose data; return it as an absolute path.

    An existing output is replaced only with `force`, and never when it is, contains or lies inside one of
    `inputs` (replacing it would delete what the command reads). `kind` is "directory" or "file".
    """
    out = Path(os.path.realpath(Path(out).expanduser()))
    if force:
        for source in inputs:
            relation = _overlap(out, Path(os.path.realpath(Path(source).expanduser())))
            if relation is not None:
                raise UserError(
                    f"--out {out} {relation} this command's input {source}; --force would delete it: "
                    f"choose an --out outside the input"
                )
    if kind == "directory" and out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if kind == "file" and out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory; give a file name to write")
    if kind == "file" and not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.exists() and not force and (kind == "file" or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass --force to replace it" if kind == "directory"
                        else f"{out} already exists; pass --force to replace it")
    return out


@contextlib.contextmanager
def output_lock(out: str | Path, *, make_parents: bool = True) -> Iterator[None]:
    """Hold `out` for this process: a second process claiming it meanwhile fails with a clear line.

    The lock is a hidden sibling file (`.NAME.lock`) with an advisory lock on it, removed afterwards; a
    process that dies drops its lock with it. Holding it, stale temporary siblings of `out` left by a
    killed run are removed.
    """
    out = Path(os.path.realpath(Path(out).expanduser()))
    if make_parents:
        out.parent.mkdir(parents=True, exist_ok=True)
    elif not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing {out} right now; wait for it to finish or choose another --out") from None
        if os.path.exists(path) and os.stat(path).st_ino != os.fstat(fd).st_ino:  # unlinked by its last holder
            raise UserError(f"another process was writing {out} a moment ago; run the command again")
        _remove_stale(out)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim_output(out: str | Path, *, force: bool, inputs: Iterable[str | Path] = (), kind: str = "directory") -> Iterator[Path]:
    """`check_output`, then hold `out` (`output_lock`) for the whole block, then check again (another
    writer may have finished in between). Yields the absolute output path."""
    inputs = list(inputs)
    path = check_output(out, force=force, inputs=inputs, kind=kind)
    with output_lock(path, make_parents=kind == "directory"):  # a file's folder must exist, as for open()
        yield check_output(path, force=force, inputs=inputs, kind=kind)


def _remove_stale(out: Path) -> None:
    """Temporary siblings of `out` that a killed writer left (only ever called holding `out`'s lock)."""
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for stale in out.parent.glob(f"{_glob_escape(prefix)}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it replaces `out` in one rename.

    The old `out` is kept until the new one is in place, so an exception (or Ctrl-C) at any point
    leaves either the previous output or nothing, never a mix. The directory gets the permissions a
    plain `mkdir` would (the umask's), not mkdtemp's 0700.
    """
    out = check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "previous", out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path of `path` to write; on success it replaces `path` in one rename.

    `suffix` keeps an extension that a writer needs (mx.save_safetensors appends ".safetensors" otherwise).
    The file gets the permissions of a plain `open(path, "w")` (the umask's), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling file, so readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to `path` through a temporary sibling file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
