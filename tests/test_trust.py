"""Attacks on the runtime (issue 11): no input crashes it, bombs memory or loses data, and every failure is one line.

Each test feeds one kind of bad input through the public API or the real command line and checks what a
user sees: the exit code, one `error:` line, nothing allocated past what the files justify, nothing lost.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
import torch
from typer.testing import CliRunner

from checkpoints import make_hf_model, write_checkpoint
from mlx_gpt2 import CheckpointError, UserError, batch_generate, generate, load
from mlx_gpt2.cli import app
from mlx_gpt2.convert import convert
from mlx_gpt2.fileio import claim_output
from mlx_gpt2.generation.speculative import Draft

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(result, code: int = 1) -> str:
    """The single `error:` line of a failed command (and nothing else on stderr)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


PEAK_RSS = """
def _peak_mb():
    try:  # Linux: this process's own high-water mark (ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except OSError:  # macOS: ru_maxrss is in bytes there
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
"""


def peak_rss_mb(code: str) -> tuple[float, str]:
    """Run `code` in a fresh Python; return (its peak resident memory in MB, its stderr)."""
    script = f"import sys\n{PEAK_RSS}\n{code}\nprint(_peak_mb(), file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    return float(proc.stderr.strip().splitlines()[-1]), proc.stderr


# ---- 1. A fresh clone needs nothing beside it -------------------------------------------------------------

def test_nothing_reads_a_sibling_shared_folder():
    import re

    sibling = re.compile("shared" + r"/gpt2-tokenizer|\"shared\"\s*/")  # written in pieces, so this file does not match
    offenders = [str(p.relative_to(REPO)) for folder in ("mlx_gpt2", "convert", "tests", "benchmarks", "examples")
                 for p in (REPO / folder).rglob("*.py") if sibling.search(p.read_text())]  # fmt: skip
    assert offenders == []
    assert "git clone" in (REPO / ".ci" / "run").read_text()  # CI runs from a clone with no sibling folders


def test_the_bundled_bpe_files_are_gpt2s(tmp_path):
    import hashlib

    from mlx_gpt2 import Tokenizer
    from mlx_gpt2.tokenizer import BUNDLED_DIR

    # The hashes tiktoken pins for its `gpt2` encoding (tiktoken_ext/openai_public.py).
    pins = {"merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}  # fmt: skip
    for name, digest in pins.items():
        assert hashlib.sha256((BUNDLED_DIR / name).read_bytes()).hexdigest() == digest
    assert list(BUNDLED_DIR.glob("LICENSE*")), "the BPE files travel with their license"
    assert Tokenizer.gpt2().encode("Hello world") == [15496, 995]


def test_a_checkpoint_without_tokenizer_files_uses_gpt2s_with_a_warning(small_hf, tmp_path):
    directory = write_checkpoint(small_hf, tmp_path / "bare", "hub", tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer files.*using GPT-2's own BPE"):
        model, tokenizer = load(directory)
    assert tokenizer.encode("Hello world") == [15496, 995]
    result = cli("generate", "-m", directory, "-p", "Hello", "-n", 3)
    assert result.exit_code == 0 and result.stderr.startswith("warning: ") and result.stderr.count("\n") == 1


# ---- 2. No id reaches an embedding unchecked ----------------------------------------------------------------

def test_a_model_with_fewer_embeddings_than_its_tokenizer_is_refused_at_load(tmp_path):
    directory = write_checkpoint(make_hf_model({"vocab_size": 1000}), tmp_path / "small-vocab", "hub")
    with pytest.raises(CheckpointError, match="the tokenizer has 50257 tokens but the model only 1000 embeddings"):
        load(directory)
    with pytest.raises(CheckpointError, match="50257 tokens but the model only 1000"):
        convert(directory, tmp_path / "out")


@pytest.mark.parametrize("ids", [[50257], [-1], [3_000_000], [1, 2, 10**30], [True], [1.5]], ids=str)
def test_ids_outside_the_vocabulary_are_one_line_errors_everywhere(small_loaded, ids):
    model, tokenizer = small_loaded
    for run in (lambda: generate(model, tokenizer, ids, max_tokens=2),
                lambda: batch_generate(model, tokenizer, [[5, 6], ids], max_tokens=2),
                lambda: generate(model, tokenizer, ids, max_tokens=2, draft=Draft(model))):  # fmt: skip
        with pytest.raises(UserError, match=r"token id .* this model's token ids are integers 0\.\.50256"):
            run()


def test_logit_bias_ids_are_checked(small_converted):
    for item in ("-1:5", "50257:5", "3000000:-100"):
        line = one_error_line(cli("generate", "-m", small_converted, "-p", "Hi", "-n", 2, "--logit-bias", item))
        assert re.search(r"logit_bias token ids must be integers (>= 0|in \[0, 50257\)), got -?\d+", line), line
    line = one_error_line(cli("generate", "-m", small_converted, "-p", "Hi", "-n", 2, "--logit-bias", "5:inf"))
    assert "logit_bias values must be finite" in line


def test_a_prompt_cache_holding_huge_ids_is_refused_in_a_real_process(small_converted, small_loaded, tmp_path):
    from mlx_gpt2.generation.prompt_cache import cache_prompt

    model, tokenizer = small_loaded
    path = tmp_path / "c.safetensors"
    cache_prompt(model, tokenizer, "Hello there", path)
    arrays = mx.load(str(path))
    from mlx_gpt2.generation.prompt_cache import read_metadata

    metadata = {**read_metadata(path), "tokens": json.dumps([15496, 3_000_000])}
    mx.save_safetensors(str(path), arrays, metadata)
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt2", "generate", "-m", str(small_converted), "--prompt-cache",
                           str(path), "-p", " you", "-n", "3"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # not -11 (SIGSEGV)
    assert proc.stderr.count("\n") == 1 and "token id 3000000" in proc.stderr, proc.stderr


# ---- 3. Nothing allocates more than its files justify ---------------------------------------------------

def test_a_zero_stride_bin_is_refused_before_any_allocation(tmp_path):
    directory = tmp_path / "bomb"
    directory.mkdir()
    torch.save({"wte.weight": torch.zeros(1).expand(20000, 20000)}, directory / "pytorch_model.bin")
    size = (directory / "pytorch_model.bin").stat().st_size
    assert size < 2000  # a tiny file that asks for 1.6 GB
    peak, stderr = peak_rss_mb(
        "from pathlib import Path\nfrom mlx_gpt2.convert.read import read_torch_bin\nfrom mlx_gpt2 import CheckpointError\n"
        f"try:\n    read_torch_bin(Path({str(directory / 'pytorch_model.bin')!r}))\nexcept CheckpointError as e:\n"
        "    print('refused:', e, file=sys.stderr)\n"
    )
    assert "refused:" in stderr and "over a storage of 1 elements" in stderr, stderr
    print(f"a {size}-byte .bin asking for 20000 x 20000: refused at a peak of {peak:.0f} MB")
    assert peak < 400


def test_a_config_claiming_300000_layers_beside_2_is_refused_before_building(small_dir, tmp_path):
    directory = tmp_path / "liar"
    directory.mkdir()
    for f in small_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 300000}))
    peak, stderr = peak_rss_mb(
        "from mlx_gpt2 import load, UserError\n"
        f"try:\n    load({str(directory)!r})\nexcept UserError as e:\n    print('refused:', e, file=sys.stderr)\n"
    )
    assert "refused:" in stderr and "n_layer 300000 but the tensors hold 2" in stderr, stderr
    print(f"n_layer 300000 beside a 2-layer checkpoint: refused at a peak of {peak:.0f} MB")
    assert peak < 600


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_one_line_everywhere(small_dir, small_converted, tmp_path):
    directory = tmp_path / "nested"
    directory.mkdir()
    for f in small_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    (directory / "config.json").write_text('{"a": ' + _nested(100000) + "}")
    assert "nested too deeply" in one_error_line(cli("generate", "-m", directory, "-p", "x"))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(_nested(100000))
    assert "nested too deeply" in one_error_line(cli("generate", "-m", small_converted, "-p", "x", "--adapter-path", adapters))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hello world"}\n' + _nested(100000) + "\n")
    line = one_error_line(cli("lora", "-m", small_converted, "--data", data, "--adapter-path", tmp_path / "run", "--iters", 1))
    assert "nested too deeply" in line or "train.jsonl" in line


# ---- 4. No command loses data ---------------------------------------------------------------------------

def _digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cache_prompt_never_replaces_a_model_file(small_converted, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in small_converted.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    before = _digest(model)
    target = model / "model.safetensors"
    assert "already exists; pass --force" in one_error_line(cli("cache-prompt", "-m", model, "-p", "Hello", "--out", target))
    line = one_error_line(cli("cache-prompt", "-m", model, "-p", "Hello", "--out", target, "--force"))
    assert "lies inside this command's input" in line
    assert _digest(model) == before


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_force_never_deletes_the_input(small_dir, tmp_path, monkeypatch):
    source = _copy(small_dir, tmp_path / "parent" / "src")
    before = _digest(tmp_path / "parent")
    line = one_error_line(cli("convert", source, "--out", tmp_path / "parent", "--force"))
    assert "contains this command's input" in line
    monkeypatch.chdir(tmp_path / "parent")
    assert "contains this command's input" in one_error_line(cli("convert", "src", "--out", ".", "--force"))
    assert "is this command's input" in one_error_line(cli("convert", "src", "--out", "src", "--force"))
    assert _digest(tmp_path / "parent") == before


def test_fuse_never_replaces_its_adapters(small_converted, trained_adapters_dir, tmp_path):
    before = _digest(trained_adapters_dir)
    line = one_error_line(cli("fuse", "-m", small_converted, "--adapter-path", trained_adapters_dir, "--out", trained_adapters_dir, "--force"))
    assert "is this command's input" in line
    assert _digest(trained_adapters_dir) == before


@pytest.fixture(scope="module")
def trained_adapters_dir(small_converted, tmp_path_factory):
    from mlx_gpt2.lora import TrainConfig, train

    data = tmp_path_factory.mktemp("fuse-data")
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"Line {i} of a small text."}) + "\n" for i in range(8)))
    out = tmp_path_factory.mktemp("fuse-run") / "adapters"
    train(TrainConfig(model=str(small_converted), data=str(data), adapter_path=str(out), iters=1, batch_size=2,
                      max_seq_length=16, val_batches=0), quiet=True)  # fmt: skip
    return out


def test_a_second_writer_into_the_same_output_fails_at_once(small_dir, tmp_path):
    out = tmp_path / "out"
    with claim_output(out, force=True):  # the first writer, still at work
        line = one_error_line(cli("convert", small_dir, "--out", out, "--force"))
        assert "another process is writing" in line
    assert not out.exists()
    assert cli("convert", small_dir, "--out", out).exit_code == 0  # once it is done, the output is free


def test_two_concurrent_conversions_one_wins_one_fails_clearly(small_dir, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "mlx_gpt2", "convert", str(small_dir), "--out", str(out), "--force"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    wrote = [r for r in results if r[0] == 0]
    assert wrote, results
    for code, _, stderr in results:
        assert code == 0 or ("another process" in stderr and stderr.count("\n") == 1), results
    assert load(out)[0] is not None


def test_outputs_honour_the_umask_and_stale_temporaries_are_cleaned(small_dir, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".{out.name}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model")
    old = os.umask(0o022)
    try:
        assert cli("convert", small_dir, "--out", out).exit_code == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in out.iterdir())
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 5. Corrupt files are refused, not run ----------------------------------------------------------------

def _edited(small_dir: Path, tmp_path: Path, edit) -> Path:
    directory = _copy(small_dir, tmp_path / "edited")
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(small_dir, tmp_path, value):
    def poison(t):
        t["h.1.mlp.c_fc.weight"][3, 5] = value

    directory = _edited(small_dir, tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight.*hold NaN or infinite values"):
        load(directory)
    with pytest.raises(CheckpointError, match="hold NaN or infinite values"):
        convert(directory, tmp_path / "out")
    assert "hold NaN or infinite" in one_error_line(cli("generate", "-m", directory, "-p", "x"))


def test_integer_weights_are_refused_naming_the_tensor(small_dir, tmp_path):
    def as_int(t):
        t["h.0.ln_1.weight"] = t["h.0.ln_1.weight"].astype(np.int32)

    with pytest.raises(CheckpointError, match="h.0.ln_1.weight holds int32 values where weights are floating point"):
        load(_edited(small_dir, tmp_path, as_int))


def test_overlapping_safetensors_offsets_are_refused(small_dir, tmp_path):
    directory = _copy(small_dir, tmp_path / "overlap")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]  # b now reads a's bytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
    with pytest.raises(CheckpointError, match="overlap in the file"):
        load(directory)


@pytest.mark.parametrize("eps", [float("nan"), "1e-5", None, -1.0, 10**400], ids=["nan", "string", "null", "negative", "huge"])
def test_a_bad_layer_norm_epsilon_is_one_line(small_dir, tmp_path, eps):
    directory = _copy(small_dir, tmp_path / "eps")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": eps}))
    assert "layer_norm_epsilon must be a number in (0, 1)" in one_error_line(cli("generate", "-m", directory, "-p", "x"))


def test_merges_cut_short_and_a_malformed_tokenizer_json_are_refused(small_dir, tmp_path):
    directory = _copy(small_dir, tmp_path / "short-merges")
    lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
    (directory / "merges.txt").write_text("\n".join(lines[:20001]) + "\n", encoding="utf-8")
    line = one_error_line(cli("generate", "-m", directory, "-p", "x"))
    assert f"{50257 - 256 - 20000} of the vocabulary's 50257 tokens are built by none of the 20000 merges" in line
    for broken in ('{"model": {"type": "BPE", "vocab": {"a": "x"}}}', '{"model": 5}',
                   '{"model": {"vocab": {}, "merges": "ab"}, "added_tokens": [{"id": 1}]}'):  # fmt: skip
        directory = _copy(small_dir, tmp_path / f"json-{len(broken)}")
        (directory / "vocab.json").unlink()
        (directory / "merges.txt").unlink()
        (directory / "tokenizer.json").write_text(broken)
        assert "tokenizer.json" in one_error_line(cli("generate", "-m", directory, "-p", "x"))


def test_a_float64_checkpoint_is_read_as_float32(small_hf, small_loaded, tmp_path, ids):
    directory = write_checkpoint(make_hf_model({"initializer_range": 0.2}, seed=0).double(), tmp_path / "f64", "hub")
    with pytest.warns(UserWarning, match="float64; they are read as float32"):
        model, _ = load(directory)
    expected = small_loaded[0](mx.array(ids))
    assert np.abs(np.array(model(mx.array(ids))) - np.array(expected)).max() < 1e-5


# ---- 7. Every failure is one line -----------------------------------------------------------------------

def _run_failing(monkeypatch, target: str, error: OSError, *args) -> str:
    """A command whose write fails the way a full disk / read-only file system / mount point fails."""
    import mlx_gpt2.fileio as fileio

    def fail(*_a, **_k):
        raise error

    monkeypatch.setattr(fileio.os, target, fail)
    return one_error_line(cli(*args))


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EBUSY, "mount point"), (errno.EXDEV, "mount point")])  # fmt: skip
def test_write_failures_are_one_line_and_keep_the_previous_output(small_dir, tmp_path, monkeypatch, code, hint):
    out = tmp_path / "out"
    assert cli("convert", small_dir, "--out", out).exit_code == 0
    before = _digest(out)
    line = _run_failing(monkeypatch, "replace", OSError(code, os.strerror(code), str(out)),
                        "convert", small_dir, "--out", out, "--force")
    assert hint in line
    assert _digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_damaged_prompt_caches_are_one_line(small_converted, small_loaded, tmp_path):
    from mlx_gpt2.generation.prompt_cache import cache_prompt, read_metadata

    model, tokenizer = small_loaded
    good = tmp_path / "good.safetensors"
    cache_prompt(model, tokenizer, "Hello there, how are you", good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    no_fingerprint = tmp_path / "nofp.safetensors"
    mx.save_safetensors(str(no_fingerprint), mx.load(str(good)), {k: v for k, v in read_metadata(good).items() if k != "fingerprint"})
    for path, message in ((truncated, "truncated"), (no_fingerprint, "has no fingerprint")):
        line = one_error_line(cli("generate", "-m", small_converted, "--prompt-cache", path, "-p", " x", "-n", 2))
        assert message in line


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed must be an integer in [0, 2**64 - 1]"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64 - 1]"),
    (["--num-beams", "100000"], "100000 beams of"),
])
def test_absurd_generation_options_are_one_line(small_converted, args, message):
    assert message in one_error_line(cli("generate", "-m", small_converted, "-p", "Hello", "-n", 4, *args))


def test_a_config_with_a_400_digit_layer_count_is_one_line(small_dir, tmp_path):
    directory = _copy(small_dir, tmp_path / "huge")
    text = (directory / "config.json").read_text()
    config = json.loads(text)
    config["n_layer"] = "PLACEHOLDER"
    (directory / "config.json").write_text(json.dumps(config).replace('"PLACEHOLDER"', "1" + "0" * 400))
    assert "far beyond any GPT-2" in one_error_line(cli("generate", "-m", directory, "-p", "x"))


def test_bad_adapter_config_and_state_are_one_line(small_converted, trained_adapters_dir, tmp_path):
    bad = _copy(trained_adapters_dir, tmp_path / "bad-config")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["lora"]["rank"] = "eight"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert "bad rank" in one_error_line(cli("generate", "-m", small_converted, "-p", "x", "--adapter-path", bad))
    damaged = _copy(trained_adapters_dir, tmp_path / "bad-state")
    (damaged / "state.json").write_text(json.dumps({"step": "one", "rng": [1]}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"text": "some text to train on"}) + "\n")
    line = one_error_line(cli("lora", "-m", small_converted, "--data", data, "--adapter-path", damaged, "--resume"))
    assert "incomplete or damaged" in line


def test_usage_mistakes_are_one_line_with_exit_2(small_converted):
    for args, message in ((["generate", "--max-tokens", "abc", "-p", "x"], "'--max-tokens'"),
                          (["generate"], "give --prompt TEXT or --prompt-file FILE"), (["genrate"], "No such command 'genrate'")):  # fmt: skip
        line = one_error_line(cli(*args), code=2)
        assert message in line and "--help" in line


def test_invalid_utf8_on_stdin_is_refused(small_converted):
    result = runner.invoke(app, ["generate", "-m", str(small_converted), "-p", "-"], input=b"caf\xe9 au lait")
    assert "stdin is not UTF-8 text" in one_error_line(result)


def _console_script() -> str:
    script = Path(sys.executable).parent / "mlx-gpt2"
    assert script.is_file(), f"the console script is not installed next to {sys.executable}"
    return str(script)


def _when_mlx_is_being_imported(proc: subprocess.Popen) -> None:
    """Wait until the process has mapped MLX's library: it is importing MLX, inside the command's start."""
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None:
        if not maps.exists():  # no /proc (macOS): a moment well inside the imports instead
            threading.Event().wait(0.3)
            return
        try:
            if "libmlx" in maps.read_text():
                return
        except OSError:
            return


def _when_it_prints(proc: subprocess.Popen) -> None:
    """Wait until generation has started: the first generated text reached stdout."""
    proc.stdout.read(1)


def _as_from_a_terminal() -> None:
    """Ctrl-C reaches a command started from a terminal. A shell's background job (`.ci/run &`) ignores
    SIGINT and its children inherit that, so Python would install no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.mark.parametrize("moment", ["importing MLX", "generating", "0.3 s", "0.8 s"])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(small_converted, moment):
    """SIGINT while MLX is imported, at fixed moments of the start, and while generating."""
    proc = subprocess.Popen([_console_script(), "generate", "-m", str(small_converted), "-p", "Hello", "-n", "100000",
                             "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)  # fmt: skip
    if moment == "importing MLX":
        _when_mlx_is_being_imported(proc)
    elif moment == "generating":
        _when_it_prints(proc)
    else:
        threading.Event().wait(float(moment.split()[0]))  # the moment the user presses Ctrl-C
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave it running: it would load the machine for the tests after
            proc.kill()
    assert proc.returncode == 130 and stderr == "interrupted\n", (moment, proc.returncode, stderr)


# ---- 8. The same answers as the references ------------------------------------------------------------------

def test_the_model_deep_copies_and_pickles(small_loaded, ids):
    import copy
    import pickle

    model = small_loaded[0]
    expected = np.array(model(mx.array(ids)))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert np.array_equal(np.array(clone(mx.array(ids))), expected)


def test_generate_step_refuses_a_cache_holding_more_than_its_prompt(small_loaded):
    from mlx_gpt2 import generate_step, make_prompt_cache

    model, tokenizer = small_loaded
    ids = tokenizer.encode("The animal didn't cross the street because it was too tired")
    cache = make_prompt_cache(model, ids)
    with pytest.raises(ValueError, match=f"the cache holds {len(ids)} positions but the prompt has 3 tokens"):
        next(generate_step(ids[-3:], model, cache=cache))


def test_a_million_trailing_spaces_or_newlines_encode(small_loaded):
    from pydoc_data.topics import topics

    tokenizer = small_loaded[1]
    for run in (" " * 1_000_000, "\n" * 1_000_000, " \n" * 500_000):
        ids = tokenizer.encode("The end." + run)
        assert tokenizer.decode(ids) == "The end." + run
    text = "\n\n".join(topics[k] for k in sorted(topics))
    assert tokenizer.decode(tokenizer.encode(text)) == text  # ids against tiktoken and transformers: test_tokenizer.py
