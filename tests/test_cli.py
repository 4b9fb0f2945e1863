"""The CLI end to end on local checkpoints: output, one-line errors, exit codes, a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_gpt2 import generate
from mlx_gpt2.cli import app

runner = CliRunner()
PROMPT = "Hello, my dog"


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_prints_what_the_api_generates(small_converted, small_loaded):
    model, tokenizer = small_loaded
    expected = generate(model, tokenizer, PROMPT, max_tokens=20)
    result = run("generate", "--model", small_converted, "--prompt", PROMPT, "--max-tokens", 20)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(small_converted, small_loaded):
    model, tokenizer = small_loaded
    result = run("generate", "-m", small_converted, "--prompt", "-", "-n", 10, input=PROMPT)
    assert result.stdout == generate(model, tokenizer, PROMPT, max_tokens=10) + "\n"


def test_generate_verbose_reports_speed_and_memory_on_stderr(small_dir):
    result = run("generate", "-m", small_dir, "-p", PROMPT, "-n", 5, "--verbose", "--ignore-eos")
    assert result.exit_code == 0
    assert "generation: 5 tokens" in result.stderr and "peak memory" in result.stderr
    assert "tokens/s" not in result.stdout


def test_convert_then_generate(small_dir, tmp_path):
    out = tmp_path / "m"
    result = run("convert", small_dir, "--out", out, "--dtype", "bfloat16")
    assert result.exit_code == 0 and (out / "model.safetensors").exists()
    assert run("convert", small_dir, "--out", out).exit_code == 1  # exists, no --force
    assert run("convert", small_dir, "--out", out, "--force").exit_code == 0
    assert run("generate", "-m", out, "-p", PROMPT, "-n", 3).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-m", "/nonexistent/model", "-p", "x"], "/nonexistent/model"),
        (["generate", "-p", "x", "--temp", "-1"], "temp must be >= 0"),
        (["generate", "-p", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "-p", "x", "--logit-bias", "abc"], "--logit-bias takes TOKEN_ID:BIAS"),
        (["generate", "-p", "x", "--on-overflow", "wrap"], "on_overflow must be one of"),
        (["generate", "-p", "x", "--dtype", "int4"], "dtype 'int4' is not supported"),
        (["convert", "/nonexistent/model", "--out", "OUT"], "/nonexistent/model"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, small_dir, tmp_path):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    if args[0] == "generate" and "-m" not in args:
        args += ["-m", str(small_dir)]
    result = run(*args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_model_file_is_one_line(small_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_dir, broken)
    (broken / "model.safetensors").unlink()
    result = run("generate", "-m", broken, "-p", PROMPT)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "error:" in result.stderr


def test_offline_unknown_repo_is_one_line(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_gpt2", "generate", "-m", "nobody/no-such-gpt2", "-p", "x"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "nobody/no-such-gpt2" in proc.stderr, proc.stderr


def test_real_subprocess_of_the_console_script(small_converted, small_loaded):
    model, tokenizer = small_loaded
    exe = os.path.join(os.path.dirname(sys.executable), "mlx-gpt2")
    proc = subprocess.run(
        [exe, "generate", "--model", str(small_converted), "--prompt", PROMPT, "--max-tokens", "12"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(model, tokenizer, PROMPT, max_tokens=12) + "\n"
