"""LoRA training side by side: mlx-gpt2's trainer and mlx-lm's `mlx_lm.lora`, same model, data and settings.

    python benchmarks/lora/bench_lora.py --work /tmp/lora-bench                      # LoRA, float32 base
    python benchmarks/lora/bench_lora.py --work /tmp/lora-bench --qlora              # both on the same 4-bit base
    python benchmarks/lora/bench_lora.py --work /tmp/lora-bench --only ours --defaults  # our default run's memory

The model has gpt2's exact shape (124M parameters, 12 layers, 768 wide, 50257 tokens), initialised by
transformers with a fixed seed (the Hub cannot be reached here; speed and memory depend on the shape only),
converted once by `mlx-gpt2 convert` into a directory both tools read. The data is Python's own
documentation cut into rows of exactly `--seq` tokens (text + <|endoftext|>), written as {"text"} jsonl, so
both tools see the same rows with no padding and no truncation. Each run is a fresh process, so its peak
memory is its own; runs alternate between the tools to spread machine noise over both.

Settings shared by both: batch size, sequence length, LoRA rank 8 and scale 2.0 on attn.c_attn,
attn.c_proj, mlp.c_fc, mlp.c_proj of all 12 blocks, AdamW, learning rate 2e-4, dropout 0, optional gradient
checkpointing. Tokens/s is what each tool reports (trained target tokens over training time, validation
and saving excluded), averaged over the report windows after the first (which includes compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def prepare(work: Path, seq: int, qlora: bool) -> tuple[Path, Path]:
    """(model directory, data directory), built once under `work`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import REAL_GPT2_CONFIG, make_checkpoint

    from mlx_gpt2.convert import convert

    model = work / ("gpt2-shape-q4" if qlora else "gpt2-shape")
    if not (model / "config.json").is_file():
        hub = work / "gpt2-shape-hub"
        if not (hub / "config.json").is_file():
            shape = {k: REAL_GPT2_CONFIG[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
            make_checkpoint(hub, config_kwargs=shape, seed=0)
        convert(hub, model, quantize=True if qlora else None)
    data = work / f"data-{seq}"
    if not (data / "train.jsonl").is_file():
        write_rows(data, model, seq)
    return model, data


def write_rows(data: Path, model: Path, seq: int) -> None:
    """Python's docs as rows of seq - 1 tokens of text that re-encode to exactly that (+ <|endoftext|>)."""
    from pydoc_data.topics import topics

    from mlx_gpt2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))
    rows = []
    for start in range(0, len(ids) - seq, seq - 1):
        text = tokenizer.decode(ids[start : start + seq - 1])
        if len(tokenizer.encode(text)) == seq - 1:  # a few pieces split a word and re-encode differently
            rows.append(json.dumps({"text": text}))
    data.mkdir(parents=True, exist_ok=True)
    held = max(len(rows) // 10, 4)
    (data / "train.jsonl").write_text("\n".join(rows[:-held]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[-held:]) + "\n")


def worker_ours(s: dict) -> dict:
    import mlx.core as mx

    from mlx_gpt2.lora import TrainConfig, read_metrics, train

    options = {} if s["defaults"] else dict(
        batch_size=s["batch_size"], max_seq_length=s["seq"], rank=8, scale=2.0, learning_rate=2e-4,
        grad_checkpoint=s["grad_checkpoint"], warmup=0, micro_batch_size=s.get("micro_batch_size"),
    )
    train(TrainConfig(model=s["model"], data=s["data"], adapter_path=s["out"], iters=s["iters"], val_batches=1,
                      steps_per_report=s["report"], steps_per_eval=10**6, save_every=10**6, **options))  # fmt: skip
    reports = [r for r in read_metrics(s["out"]) if "train_loss" in r]
    return summary(reports, "tokens_per_second", "train_loss", mx.get_peak_memory() / 1e9)


def worker_mlx_lm(s: dict) -> dict:
    import types

    import mlx.core as mx
    import numpy as np
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    args = dict(lora.CONFIG_DEFAULTS)
    args.update(model=s["model"], train=True, data=s["data"], fine_tune_type="lora", optimizer="adamw",
                num_layers=12, batch_size=s["batch_size"], iters=s["iters"], val_batches=1, learning_rate=2e-4,
                steps_per_report=s["report"], steps_per_eval=10**6, save_every=10**6, adapter_path=s["out"],
                max_seq_length=s["seq"], grad_checkpoint=s["grad_checkpoint"],
                lora_parameters={"rank": 8, "dropout": 0.0, "scale": 2.0})  # fmt: skip
    args = types.SimpleNamespace(**args)
    reports: list[dict] = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            reports.append(info)

    np.random.seed(0)
    model, tokenizer = load(s["model"])
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, training_callback=Record())
    return summary(reports, "tokens_per_second", "train_loss", mx.get_peak_memory() / 1e9)


def summary(reports: list[dict], tps: str, loss: str, peak: float) -> dict:
    steady = [r[tps] for r in reports[1:]] or [r[tps] for r in reports]
    return {"tokens_per_second": statistics.mean(steady), "windows": [round(r[tps], 1) for r in reports],
            "losses": [round(r[loss], 4) for r in reports], "peak_memory_gb": peak}  # fmt: skip


def run(tool: str, settings: dict, openblas: bool) -> dict:
    """One training run in a fresh process; its last stdout line is the result."""
    shutil.rmtree(settings["out"], ignore_errors=True)
    env = dict(os.environ)
    if openblas and Path(OPENBLAS).is_file():
        env["LD_PRELOAD"] = OPENBLAS
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, json.dumps(settings)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - tic
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/mlx-gpt2-lora-bench"))
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--report", type=int, default=2, help="steps per report window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--micro-batch-size", type=int, help="ours: rows per forward/backward pass (default: its own, 2)")
    p.add_argument("--qlora", action="store_true", help="both tools train on the same 4-bit directory")
    p.add_argument("--defaults", action="store_true", help="ours with its own defaults (for the memory target)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", choices=("ours", "mlx_lm"))
    p.add_argument("--no-openblas", action="store_true", help="keep the CPU wheel's reference BLAS (very slow)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        tool, settings = a.worker[0], json.loads(a.worker[1])
        print(json.dumps((worker_ours if tool == "ours" else worker_mlx_lm)(settings)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(a.work, a.seq, a.qlora)
    tools = [a.only] if a.only else ["ours", "mlx_lm"]
    for repeat in range(a.repeats):
        for tool in tools:
            settings = dict(model=str(model), data=str(data), out=str(a.work / f"run-{tool}"), iters=a.iters,
                            report=a.report, batch_size=a.batch_size, seq=a.seq, grad_checkpoint=a.grad_checkpoint,
                            defaults=a.defaults, micro_batch_size=a.micro_batch_size)  # fmt: skip
            result = run(tool, settings, not a.no_openblas)
            print(json.dumps({"tool": tool, "repeat": repeat, "qlora": a.qlora, **{k: v for k, v in settings.items()
                              if k in ("batch_size", "seq", "grad_checkpoint", "iters", "defaults", "micro_batch_size")}, **result}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
