"""Data-parallel training and scoring over mx.distributed (issue 15): real processes under `mlx.launch -n 2`
(the ring backend over loopback, on the CPU), compared with one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
SCRIPT = str(BIN / "mlx-gpt2")  # mlx.launch runs what follows `--` as it is: the console script's path
LAUNCH = str(BIN / "mlx.launch")


def text_rows() -> list[str]:
    """Real English: paragraphs of Python's own documentation (pydoc_data ships with the interpreter)."""
    from pydoc_data.topics import topics

    paragraphs = [" ".join(p.split()) for t in sorted(topics)[:40] for p in topics[t].split("\n\n") if len(p.strip()) > 200]
    return [p[: p.index(" ", 60)] for p in paragraphs[:48]]  # about 12-16 tokens each: rows of one piece


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("dist-data")
    rows = text_rows()
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:40]))
    (directory / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[40:45]))  # 5: 3 + 2
    return directory


def lora(model: Path, data: Path, out: Path, *extra: str, processes: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    args = [SCRIPT, "lora", "--model", str(model), "--data", str(data), "--adapter-path", str(out), "--iters", "3",
            "--batch-size", "4", "--max-seq-length", "16", "--learning-rate", "1e-3", "--steps-per-report", "1",
            "--steps-per-eval", "2", "--val-batches", "-1", "--save-every", "2", "--dtype", "float32", "--quiet", *extra]  # fmt: skip
    command = args if processes == 1 else [LAUNCH, "-n", str(processes), "--", *args]
    env = {**os.environ, "MLX_GPT2_OPENBLAS": "0"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(out: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


def weights(out: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def assert_same_run(one: Path, two: Path, atol: float = 1e-5) -> None:
    (train_1, val_1), (train_2, val_2) = metrics(one), metrics(two)
    assert len(train_1) == len(train_2) == 3 and len(val_1) == len(val_2) >= 2
    np.testing.assert_allclose(train_2, train_1, rtol=1e-5)
    np.testing.assert_allclose(val_2, val_1, rtol=1e-5)
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        a, b = w2[name], w1[name]
        if name.endswith("attn.c_attn.bias") and atol > 1e-5:  # [q | k | v] biases: k's gradient is zero
            d = a.shape[-1] // 3
            np.testing.assert_allclose(a[d : 2 * d], b[d : 2 * d], rtol=1e-5, atol=atol, err_msg=name)
            a, b = np.concatenate([a[:d], a[2 * d :]]), np.concatenate([b[:d], b[2 * d :]])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", [[], ["--quantize"], ["--full"]], ids=["lora", "qlora", "full"])
def test_two_processes_train_exactly_as_one(trained_small_dir, data, tmp_path, mode):
    one = lora(trained_small_dir, data, tmp_path / "one", *mode)
    assert one.returncode == 0, one.stderr
    two = lora(trained_small_dir, data, tmp_path / "two", *mode, processes=2)
    assert two.returncode == 0 and "[WARN]" not in two.stderr + two.stdout, two.stderr + two.stdout
    # Full fine-tuning trains the key biases, whose true gradient is zero (softmax ignores a constant added to
    # every key): their gradients are float rounding, which AdamW divides by its own size, so two summation
    # orders move them by up to ~2e-5 in a few steps. Every other weight agrees to 1e-5.
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=5e-5 if mode == ["--full"] else 1e-5)


def test_a_stopped_run_resumes_on_another_number_of_processes_to_the_same_run(trained_small_dir, data, tmp_path):
    whole = lora(trained_small_dir, data, tmp_path / "whole", processes=2)
    assert whole.returncode == 0, whole.stderr
    from mlx_gpt2.lora import TrainConfig, train

    def stop_after_2(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt  # as Ctrl-C stops a run: a checkpoint of step 2

    config = TrainConfig(model=str(trained_small_dir), data=str(data), adapter_path=str(tmp_path / "parts"), iters=3,
                         batch_size=4, max_seq_length=16, learning_rate=1e-3, steps_per_report=1, steps_per_eval=2,
                         val_batches=-1, save_every=2, dtype="float32")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):  # one process first, then two
        train(config, on_step=stop_after_2, quiet=True)
    rest = lora(trained_small_dir, data, tmp_path / "parts", "--resume", processes=2)
    assert rest.returncode == 0, rest.stderr + rest.stdout
    np.testing.assert_allclose(metrics(tmp_path / "parts")[0], metrics(tmp_path / "whole")[0], rtol=1e-5)
    for name, value in weights(tmp_path / "whole").items():
        np.testing.assert_allclose(weights(tmp_path / "parts")[name], value, rtol=1e-5, atol=1e-6)


def test_a_batch_the_processes_cannot_share_is_refused(trained_small_dir, data, tmp_path):
    done = lora(trained_small_dir, data, tmp_path / "odd", "--batch-size", "3", processes=2)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(lines) == 2 and all("--batch-size 3 does not divide among 2 processes" in line for line in lines), lines
    assert not (tmp_path / "odd").exists()


def test_perplexity_over_two_processes_is_one_processes(trained_small_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(text_rows()[:12]))
    args = [SCRIPT, "perplexity", "--model", str(trained_small_dir), "--file", str(text), "--context", "64",
            "--stride", "32", "--dtype", "float32", "--quiet"]  # fmt: skip
    env = {**os.environ, "MLX_GPT2_OPENBLAS": "0"}
    one = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([LAUNCH, "-n", "2", "--", *args], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    first = lambda out: [line for line in out.splitlines() if "perplexity:" in line or "tokens scored" in line]
    assert first(one.stdout) and first(two.stdout) == first(one.stdout)  # printed once, by rank 0


def test_a_killed_rank_ends_the_run_cleanly(trained_small_dir, data, tmp_path):
    """Rank 1 is killed mid-run: rank 0 stops with one line in bounded time, no half-written checkpoint."""
    out = tmp_path / "killed"
    args = [LAUNCH, "-n", "2", "--", SCRIPT, "lora", "--model", str(trained_small_dir), "--data", str(data),
            "--adapter-path", str(out), "--iters", "100000", "--batch-size", "4", "--max-seq-length", "16",
            "--save-every", "1", "--steps-per-report", "1", "--dtype", "float32", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLX_GPT2_OPENBLAS": "0"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "state.json").is_file():  # a checkpoint is saved: the run is well under way
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not get going"
            time.sleep(0.1)  # polling for the run to have made steps, not timing anything
        rank_1 = ranks(str(out))[1]
        os.kill(rank_1, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)  # bounded: the peer notices at its next all_sum
    finally:
        if proc.poll() is None:
            proc.kill()
    # mlx.launch stops the other process when one dies; it says so in one line and exits 1.
    lost = [line for line in output.splitlines() if line.startswith("error: rank")]
    assert lost == ["error: rank 0: this run was stopped (another of its processes ended, or the launcher was "
                    "stopped); its last checkpoint is kept: rerun with --resume"], output  # fmt: skip
    assert "exited with code 1" in output  # rank 0's own exit, as the launcher reports it
    state = json.loads((out / "state.json").read_text())  # the last whole checkpoint is kept
    assert state["step"] >= 1 and weights(out)


def ranks(marker: str) -> dict[int, int]:
    """{rank: pid} of the processes whose command line holds `marker` and whose environment has MLX_RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((v[len(b"MLX_RANK="):] for v in environ if v.startswith(b"MLX_RANK=")), None)
        if rank is not None and any(marker.encode() in part for part in cmdline) and b"lora" in cmdline:
            found[int(rank)] = int(entry.name)
    return found
