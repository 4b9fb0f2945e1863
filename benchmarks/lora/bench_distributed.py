"""Data-parallel LoRA under `mlx.launch`: mlx-gpt2 on 1 and 2 processes, and `mlx_lm lora` on 2 (and 1),
same model, data and settings, in the same run.

    python benchmarks/lora/bench_distributed.py --work /tmp/lora-bench [--iters 4] [--batch-size 8] [--seq 64]

The model has gpt2's exact shape (124M parameters), the data is Python's documentation in rows of exactly
`--seq` tokens (both from `bench_lora.prepare`). On this 2-core machine each process gets one core: every
run preloads the system OpenBLAS (`LD_PRELOAD`, both tools, so the BLAS is the same) with
`OPENBLAS_NUM_THREADS=1`. Settings: LoRA rank 8, scale 2.0 on the four matrices of all 12 blocks, AdamW,
learning rate 2e-4, no warmup, no dropout; `--batch-size` is the global batch (each of 2 processes trains
half of it). Tokens/s is each tool's own report (global trained tokens over training time), averaged over
the report windows after the first (which includes compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import OPENBLAS, prepare  # noqa: E402  (a sibling script, not a package)

BIN = Path(sys.executable).parent


def command(tool: str, processes: int, model: Path, data: Path, out: Path, a: argparse.Namespace) -> list[str]:
    shared = ["--iters", str(a.iters), "--batch-size", str(a.batch_size), "--max-seq-length", str(a.seq),
              "--steps-per-report", "1", "--steps-per-eval", "1000000", "--save-every", "1000000", "--val-batches", "1"]  # fmt: skip
    if tool == "mlx-gpt2":
        run = [str(BIN / "mlx-gpt2"), "lora", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
               "--rank", "8", "--scale", "2", "--learning-rate", "2e-4", "--warmup", "0", "--quiet", *shared]  # fmt: skip
    else:
        config = out.parent / "mlx_lm_lora.json"  # mlx-lm reads YAML; JSON is YAML
        config.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}))
        run = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
               "--adapter-path", str(out), "--num-layers", "12", "--learning-rate", "2e-4", "-c", str(config), *shared]  # fmt: skip
    return run if processes == 1 else [str(BIN / "mlx.launch"), "-n", str(processes), "--", *run]


def tokens_per_second(tool: str, out: Path, stdout: str) -> list[float]:
    if tool == "mlx-gpt2":
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)  # mlx-lm 0.32 prints a coloured table: iter, loss, tok/s, tokens
    rows = [line.split() for line in plain.splitlines()]
    table = [float(r[-2]) for r in rows if len(r) >= 4 and r[0].isdigit() and r[1] != "val" and r[-1].endswith("k")]
    return table or [float(v) for v in re.findall(r"Tokens/sec ([\d.]+)", plain)]  # older mlx-lm's lines


def measure(tool: str, processes: int, model: Path, data: Path, a: argparse.Namespace) -> dict:
    out = a.work / f"run-{tool}-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "LD_PRELOAD": OPENBLAS}
    tic = time.perf_counter()
    done = subprocess.run(command(tool, processes, model, data, out, a), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - tic
    windows = tokens_per_second(tool, out, done.stdout + done.stderr)
    if done.returncode != 0 or not windows or "[WARN]" in done.stdout + done.stderr:
        raise SystemExit(f"{tool} on {processes} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    steady = windows[1:] or windows
    result = {"tool": tool, "processes": processes, "tokens_per_second": statistics.mean(steady),
              "windows": [round(w, 1) for w in windows], "wall_s": wall}  # fmt: skip
    print(f"  {tool:9s} x{processes}: {result['tokens_per_second']:6.1f} tokens/s  windows {result['windows']}  "
          f"({wall:.0f} s)", flush=True)  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/mlx-gpt2-lora-bench"))
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "lora-distributed.json")
    a = p.parse_args()
    if not Path(OPENBLAS).is_file():
        raise SystemExit(f"this benchmark preloads {OPENBLAS} into both tools: apt-get install libopenblas0-pthread")
    model, data = prepare(a.work, a.seq, qlora=False)
    runs = [measure(tool, n, model, data, a) for tool, n in
            [("mlx-gpt2", 1), ("mlx-lm", 2), ("mlx-gpt2", 2), ("mlx-lm", 1)]]  # fmt: skip
    by = {(r["tool"], r["processes"]): r["tokens_per_second"] for r in runs}
    lines = ["| tool | processes | tokens/s | vs its own 1 process | vs mlx-lm on as many |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        own = by[(r["tool"], r["processes"])] / by[(r["tool"], 1)]
        peer = by[(r["tool"], r["processes"])] / by[("mlx-lm", r["processes"])]
        lines.append(f"| {r['tool']} | {r['processes']} | {r['tokens_per_second']:.1f} | {own:.2f}x | {peer:.2f}x |")
    print("\n".join(lines))
    a.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": vars(a) | {
        "work": str(a.work), "out": str(a.out)}, "runs": runs}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
