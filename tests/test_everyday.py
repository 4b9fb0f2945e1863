"""Everyday use without surprises (issue 12): recorded bases, kept dtypes, progress on a terminal, honest
numbers, help that reads at 80 columns, stdin as people type it, the BLAS chosen by itself, offline examples."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from checkpoints import make_hf_model, write_checkpoint
from mlx_gpt2 import generate
from mlx_gpt2.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def run(*args, env=None, timeout=300):
    """The real console script in a fresh process (stdin, stdout and stderr are pipes)."""
    script = Path(sys.executable).parent / "mlx-gpt2"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


# ---- The base model an adapter was trained on ------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("everyday-data")
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"Line {i} of a small text about GPT-2."}) + "\n" for i in range(8)))
    return data


def train_adapters(model: Path, data: Path, out: Path) -> Path:
    from mlx_gpt2.lora import TrainConfig, train

    train(TrainConfig(model=str(model), data=str(data), adapter_path=str(out), iters=2, batch_size=2,
                      max_seq_length=16, val_batches=0, learning_rate=1e-2), quiet=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def adapters(small_converted, data_dir, tmp_path_factory) -> Path:
    return train_adapters(small_converted, data_dir, tmp_path_factory.mktemp("everyday-run") / "adapters")


def test_generate_and_fuse_use_the_recorded_base(small_converted, adapters, tmp_path, monkeypatch):
    recorded = json.loads((adapters / "adapter_config.json").read_text())
    assert recorded["base_model"] == str(Path(small_converted).resolve()) and len(recorded["base_fingerprint"]) == 32
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # reaching for `gpt2` on the Hub would fail here
    with_model = cli("generate", "-m", small_converted, "--adapter-path", adapters, "-p", "The", "-n", 6)
    without = cli("generate", "--adapter-path", adapters, "-p", "The", "-n", 6)
    assert without.exit_code == 0 and without.stdout == with_model.stdout, without.output
    assert cli("fuse", "--adapter-path", adapters, "--out", tmp_path / "fused").exit_code == 0
    fused = cli("generate", "-m", tmp_path / "fused", "-p", "The", "-n", 6)
    assert fused.stdout == with_model.stdout


def test_another_base_of_the_same_shape_is_warned_about(adapters, tmp_path):
    other = write_checkpoint(make_hf_model({"initializer_range": 0.2}, seed=7), tmp_path / "other", "hub")
    result = cli("generate", "-m", other, "--adapter-path", adapters, "-p", "The", "-n", 3)
    assert result.exit_code == 0
    assert re.search(r"warning: the adapters in .* were trained on .*, and .*other is another model", result.stderr), result.stderr


def test_fuse_keeps_the_base_dtype_unless_told(small_converted, data_dir, tmp_path):
    half = tmp_path / "half"
    assert cli("convert", small_converted, "--out", half, "--dtype", "float16").exit_code == 0
    run_dir = train_adapters(half, data_dir, tmp_path / "half-adapters")
    assert cli("fuse", "--adapter-path", run_dir, "--out", tmp_path / "f16").exit_code == 0
    assert cli("fuse", "--adapter-path", run_dir, "--out", tmp_path / "f32", "--dtype", "float32").exit_code == 0
    dtypes = {name: {str(v.dtype) for v in mx.load(str(tmp_path / name / "model.safetensors")).values()} for name in ("f16", "f32")}
    assert dtypes == {"f16": {"mlx.core.float16"}, "f32": {"mlx.core.float32"}}
    size = lambda name: (tmp_path / name / "model.safetensors").stat().st_size
    print(f"fused float16 base: {size('f16') / 1e6:.1f} MB (with --dtype float32: {size('f32') / 1e6:.1f} MB)")
    assert size("f16") < 0.55 * size("f32")


# ---- Long work shows progress --------------------------------------------------------------------------

def _in_a_terminal(args: list[str]) -> str:
    """Run the console script with stderr on a pseudo-terminal; return what the terminal showed."""
    import fcntl
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    script = Path(sys.executable).parent / "mlx-gpt2"
    proc = subprocess.Popen([str(script), *args], stdout=subprocess.DEVNULL, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    shown = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the process closed its side
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=120)
    os.close(controller)
    assert proc.returncode == 0, shown.decode(errors="replace")
    return shown.decode(errors="replace")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text(topics["assert"], encoding="utf-8")  # ~200 tokens: a few windows of 64
    return path


def test_perplexity_shows_a_progress_bar_on_a_terminal_only(small_converted, text_file):
    shown = _in_a_terminal(["perplexity", "-m", str(small_converted), "--file", str(text_file), "--context", "64"])
    assert re.search(r"scoring: +\d+%\|", shown), shown
    piped = run("perplexity", "-m", small_converted, "--file", text_file, "--context", 64)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr  # a pipe or a log file gets no bar
    quiet = _in_a_terminal(["perplexity", "-m", str(small_converted), "--file", str(text_file), "--context", "64", "--quiet"])
    assert "scoring" not in quiet


def test_fitted_quantization_and_training_show_progress(small_dir, small_converted, tmp_path):
    shown = _in_a_terminal(["convert", str(small_dir), "--out", str(tmp_path / "q"), "--fit-scales"])
    assert re.search(r"quantizing: +\d+%\|", shown), shown
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"Some words, line {i}."}) + "\n" for i in range(12)))
    shown = _in_a_terminal(["lora", "-m", str(small_converted), "--data", str(data), "--adapter-path", str(tmp_path / "a"),
                            "--iters", "3", "--batch-size", "2", "--max-seq-length", "16", "--steps-per-eval", "3"])  # fmt: skip
    assert re.search(r"training: +\d+%\|", shown) and re.search(r"validation: ", shown), shown


# ---- Honest numbers -----------------------------------------------------------------------------------

def test_verbose_counts_cached_prompt_tokens_apart(small_converted, small_loaded, tmp_path):
    from mlx_gpt2.generation.prompt_cache import cache_prompt

    model, tokenizer = small_loaded
    prefix = " ".join(["The animal didn't cross the street because it was too tired."] * 3)
    n = cache_prompt(model, tokenizer, prefix, tmp_path / "c.safetensors")
    result = cli("generate", "-m", small_converted, "--prompt-cache", tmp_path / "c.safetensors", "-p", " It", "-n", 3, "--verbose")
    total = len(tokenizer.encode(prefix + " It"))
    match = re.search(r"prompt: (\d+) tokens \((\d+) from the prompt cache, (\d+) computed\)", result.stderr)
    assert match, result.stderr
    assert (int(match[1]), int(match[2]), int(match[3])) == (total, n, total - n)


def test_beam_search_verbose_reports_its_numbers(small_converted):
    result = cli("generate", "-m", small_converted, "-p", "Hello, my dog", "-n", 5, "--num-beams", 3, "--verbose")
    assert result.exit_code == 0
    assert re.search(r"generation: \d+ tokens of the best of 3 beams in [\d.]+ s", result.stderr), result.stderr
    assert "peak memory" in result.stderr and "score:" in result.stderr


def test_bench_quick_refuses_what_it_would_ignore(tmp_path):
    from benchmarks.__main__ import app as benchmarks  # what `mlx-gpt2 bench` runs (its real run: test_speed_paths)

    for extra in (["--model", tmp_path], ["--shapes", "gpt2"], ["--runs", "5"]):
        result = runner.invoke(benchmarks, ["bench", "--quick", *map(str, extra), "--work-dir", str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: --quick is a fixed smoke run and would ignore " + extra[0]), result.stderr


def test_bench_says_which_layouts_mlx_lm_cannot_read(tmp_path):
    from benchmarks.bench import mlx_lm_cannot_read

    model = make_hf_model()
    saved = write_checkpoint(model, tmp_path / "saved", "save_pretrained")
    assert "no n_ctx" in mlx_lm_cannot_read(saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "n_ctx": 128}))
    assert "transformer.*" in mlx_lm_cannot_read(saved)
    assert mlx_lm_cannot_read(write_checkpoint(model, tmp_path / "hub", "hub")) is None
    result = run("bench", "--model", saved, "--engines", "mlx-gpt2,mlx-lm", "--dtypes", "float32", "--runs", 1,
                 "--prompt-tokens", 8, "--gen-tokens", 4, "--no-isolate", "--work-dir", tmp_path / "work")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Note: mlx-lm cannot read" in result.stdout and "[INFO]" not in result.stdout
    assert "| mlx-lm |" not in result.stdout and "| mlx-gpt2 |" in result.stdout


# ---- Input as people type it ---------------------------------------------------------------------------

def test_stdin_drops_one_trailing_newline_and_prompt_file_keeps_it(small_converted, small_loaded, tmp_path):
    model, tokenizer = small_loaded
    as_argument = cli("generate", "-m", small_converted, "-p", "Hello, my dog", "-n", 8).stdout
    assert cli("generate", "-m", small_converted, "-p", "-", "-n", 8, input="Hello, my dog\n").stdout == as_argument
    exact = cli("generate", "-m", small_converted, "--prompt-file", "-", "-n", 8, input="Hello, my dog\n").stdout
    assert exact == generate(model, tokenizer, "Hello, my dog\n", max_tokens=8) + "\n"
    (tmp_path / "p.txt").write_text("Hello, my dog\n")
    assert cli("generate", "-m", small_converted, "--prompt-file", tmp_path / "p.txt", "-n", 8).stdout == exact
    inspect_arg = cli("inspect", "next", "Hello, my dog", "-m", small_converted, "--json").stdout
    assert cli("inspect", "next", "-", "-m", small_converted, "--json", input="Hello, my dog\n").stdout == inspect_arg


def test_flags_are_shown_and_used_as_flags(small_converted):
    help_text = cli("generate", "--help").stdout
    assert re.search(r"^  --ignore-eos +Keep going", help_text, re.M), help_text
    assert "<bool>" not in help_text
    assert cli("generate", "-m", small_converted, "-p", "x", "-n", 2, "--ignore-eos").exit_code == 0


# ---- Help that reads at 80 columns ---------------------------------------------------------------------

def _commands(group, path=()):
    import typer.main

    command = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, sub in command.commands.items():
        if hasattr(sub, "commands"):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def _help(path: tuple[str, ...]) -> str:
    if path == ("bench",):  # it runs the repository's `python -m benchmarks`, in a process of its own
        proc = run("bench", "--help", env={"COLUMNS": "80"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    result = runner.invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("path", [p for p, _ in _commands(app)], ids=" ".join)
def test_every_help_reads_at_80_columns(path):
    text = _help(path)
    long_lines = [line for line in text.splitlines() if len(line) > 80]
    assert not long_lines, long_lines
    assert "…" not in text  # rich cut option names with an ellipsis
    command = dict(_commands(app))[path]
    if path == ("bench",):
        import typer.main

        from benchmarks.__main__ import app as benchmarks

        command = typer.main.get_command(benchmarks).commands["bench"]
    for param in command.params:
        for name in param.opts + param.secondary_opts:
            if name.startswith("--"):
                assert name in text, f"{' '.join(path)}: {name} is not shown in full"
    if "--png" in text:
        assert "mlx-gpt2[viz]" in re.sub(r"-\n\s+", "-", text)  # no markup swallows the extra's name


def test_the_group_help_lists_every_command_without_cutting_it():
    text = runner.invoke(app, ["--help"], terminal_width=80).stdout
    for name in ("generate", "convert", "perplexity", "lora", "fuse", "cache-prompt", "bench", "doctor", "with-openblas", "inspect"):
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert not line.rstrip().endswith("..."), line


def test_with_openblas_help_is_its_own(small_converted):
    result = cli("with-openblas", "--help")
    assert result.exit_code == 0 and re.search(r"Usage: \S+ with-openblas COMMAND", result.stdout), result.output
    assert "Run a command with OpenBLAS preloaded" in result.stdout


def test_doctor_openblas_with_a_broken_library_is_one_line(tmp_path):
    broken = tmp_path / "libopenblas.so.0"
    broken.write_bytes(b"not a library")
    result = cli("doctor", "--openblas", "--quick", env={"MLX_GPT2_OPENBLAS": str(broken)})
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: MLX did not run"), result.output


# ---- Fast on Linux by default ------------------------------------------------------------------------------

def _mlx_reference_blas() -> str:
    """MLX's own bundled BLAS: a real library that is always there, standing in for an OpenBLAS."""
    import mlx.core

    found = sorted(Path(mlx.core.__file__).resolve().parents[1].glob("mlx_cpu.libs/libblas*"))
    assert found, "the mlx-cpu wheel bundles libblas"
    return str(found[0])


def test_the_command_preloads_a_checked_library_and_says_so_under_verbose(small_converted, tmp_path):
    env = {"MLX_GPT2_OPENBLAS": _mlx_reference_blas(), "MLX_GPT2_CACHE_DIR": str(tmp_path)}
    first = run("generate", "-m", small_converted, "-p", "Hello", "-n", 2, "--verbose", env=env)
    assert first.returncode == 0, first.stderr
    assert f"blas: OpenBLAS {env['MLX_GPT2_OPENBLAS']} (preloaded by mlx-gpt2" in first.stderr, first.stderr
    verdicts = json.loads((tmp_path / "blas.json").read_text())["verdicts"]
    assert [v["ok"] for v in verdicts.values()] == [True]  # checked once, remembered
    off = run("generate", "-m", small_converted, "-p", "Hello", "-n", 2, "--verbose", env={**env, "MLX_GPT2_OPENBLAS": "0"})
    assert "blas: MLX's bundled reference BLAS (MLX_GPT2_OPENBLAS=0)" in off.stderr
    assert off.stdout == first.stdout


def test_a_library_that_fails_its_check_is_never_used_and_never_a_traceback(small_converted, tmp_path):
    broken = tmp_path / "libopenblas.so.0"
    broken.write_bytes(b"\x7fELF but not really")
    env = {"MLX_GPT2_OPENBLAS": str(broken), "MLX_GPT2_CACHE_DIR": str(tmp_path)}
    result = run("generate", "-m", small_converted, "-p", "Hello", "-n", 2, "--verbose", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "blas: MLX's bundled reference BLAS" in result.stderr
    assert [v["ok"] for v in json.loads((tmp_path / "blas.json").read_text())["verdicts"].values()] == [False]


def test_no_openblas_anywhere_is_said_once(tmp_path, monkeypatch, capsys):
    from mlx_gpt2 import blas

    monkeypatch.delenv("MLX_GPT2_OPENBLAS", raising=False)
    monkeypatch.setenv("MLX_GPT2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(blas, "SYSTEM_OPENBLAS", ())
    monkeypatch.setattr(blas, "_site_dirs", lambda: [])
    assert blas.bundled_reference_blas()  # Linux's mlx-cpu wheel: the case this is about
    blas.prefer_openblas(["generate"])
    blas.prefer_openblas(["generate"])
    said = capsys.readouterr().err
    assert said.count("note: MLX's CPU wheel multiplies matrices with a slow reference BLAS") == 1, said
    assert "apt-get install libopenblas0-pthread" in said


# ---- Examples run offline as the README shows them -----------------------------------------------------------

@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_every_example_needs_its_models_as_arguments_and_fails_in_one_line(example, tmp_path):
    script = str(REPO / "examples" / example)
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, script, "/no/such/model"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_the_examples_run_on_a_local_model(small_converted, trained_small_dir, tmp_path):
    # inside_gpt2.py runs in tests/test_inspect.py, which also checks what it prints and writes.
    for example, args in (("generate.py", [small_converted]), ("batch_and_beam.py", [small_converted, small_converted]),
                          ("quantize.py", [trained_small_dir, tmp_path / "q", "--tokens", 512])):  # fmt: skip
        proc = subprocess.run([sys.executable, str(REPO / "examples" / example), *map(str, args)], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, (example, proc.stderr[-2000:])
