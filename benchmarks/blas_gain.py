"""What choosing OpenBLAS by default buys on Linux: perplexity, prefill and LoRA tokens/s with MLX's bundled
reference BLAS (MLX_GPT2_OPENBLAS=0) and with the OpenBLAS `mlx-gpt2` preloads, against transformers on torch.

Every mlx-gpt2 number comes from the real command line, so it includes what the command does by itself.

    python benchmarks/blas_gain.py --model DIR [--tokens 4096] [--json OUT]

DIR is a Hub-format GPT-2 checkpoint (`mlx-gpt2 bench` leaves one in ~/.cache/mlx-gpt2/bench/gpt2/hub).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydoc_data.topics import topics

TEXT = "\n\n".join(topics[k] for k in sorted(topics))


def cli(args: list[str], blas: str) -> str:
    env = dict(os.environ)
    if blas == "reference":
        env["MLX_GPT2_OPENBLAS"] = "0"
    else:
        env.pop("MLX_GPT2_OPENBLAS", None)  # the default: mlx-gpt2 chooses
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt2", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"mlx-gpt2 {' '.join(args[:1])} failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout + proc.stderr


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if not match:
        raise SystemExit(f"no {pattern!r} in: {text[-400:]}")
    return float(match.group(1))


def ours(model: Path, text_file: Path, prompt: str, data: Path, blas: str, work: Path) -> dict:
    out = cli(["perplexity", "-m", str(model), "--file", str(text_file), "--quiet"], blas)
    result = {"perplexity_tps": number(r"speed: ([\d.]+) tokens/s", out), "perplexity": number(r"perplexity: ([\d.]+)", out)}
    out = cli(["generate", "-m", str(model), "-p", prompt, "-n", "1", "--verbose"], blas)
    result["prefill_tps"] = number(r"prompt: \d+ tokens.*?, ([\d.]+) tokens/s", out)
    result["blas"] = re.search(r"blas: (.*)", out).group(1)
    run = work / f"lora-{blas}"
    cli(["lora", "-m", str(model), "--data", str(data), "--adapter-path", str(run), "--iters", "2", "--batch-size", "2",
         "--max-seq-length", "256", "--steps-per-report", "1", "--val-batches", "0", "--quiet"], blas)  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result["lora_tps"] = [m["tokens_per_second"] for m in metrics if "tokens_per_second" in m][-1]  # step 2: compiled
    return result


def transformers_numbers(model: Path, ids: list[int], prompt_ids: list[int]) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel.from_pretrained(model).eval()
    with torch.no_grad():
        tic, scored = time.perf_counter(), 0
        for begin in range(0, len(ids) - 1, 512):  # the windows `mlx-gpt2 perplexity` uses: context 1024, stride 512
            window = torch.tensor([ids[max(0, begin - 512) : begin + 512]])
            lm(window)
            scored += min(512, len(ids) - 1 - begin)
        perplexity_tps = scored / (time.perf_counter() - tic)
        tic = time.perf_counter()
        lm(torch.tensor([prompt_ids]))
        prefill_tps = len(prompt_ids) / (time.perf_counter() - tic)
    lm.train()
    batch = torch.tensor([ids[:256], ids[256:512]])
    optimizer = torch.optim.AdamW([p for n, p in lm.named_parameters() if "c_attn" in n], lr=1e-4)
    for step in range(2):
        tic = time.perf_counter()
        lm(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    train_tps = batch.numel() / (time.perf_counter() - tic)
    return {"perplexity_tps": perplexity_tps, "prefill_tps": prefill_tps, "train_tps_c_attn_only": train_tps,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hub-format GPT-2 checkpoint directory")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of Python's docs to score")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    from mlx_gpt2 import Tokenizer

    tokenizer = Tokenizer.gpt2()
    ids = tokenizer.encode(TEXT)[: args.tokens]
    prompt_ids = ids[:512]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "text.txt").write_text(tokenizer.decode(ids), encoding="utf-8")
        (work / "data").mkdir()
        rows = [tokenizer.decode(ids[i : i + 256]) for i in range(0, len(ids) - 256, 256)]
        (work / "data" / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        prompt = tokenizer.decode(prompt_ids)
        record = {blas: ours(args.model, work / "text.txt", prompt, work / "data", blas, work) for blas in ("reference", "openblas")}
    record["transformers"] = transformers_numbers(args.model, ids, prompt_ids)
    ref, fast, torch_ = record["reference"], record["openblas"], record["transformers"]
    print(f"blas chosen by default: {fast['blas']}")
    print("| tokens/s | reference BLAS | OpenBLAS (default) | gain | transformers (torch CPU) | default vs transformers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, name, peer in (("perplexity_tps", "perplexity", "perplexity_tps"), ("prefill_tps", "prefill (512 tokens)", "prefill_tps"),
                            ("lora_tps", "LoRA step (2 x 256)", "train_tps_c_attn_only")):  # fmt: skip
        print(f"| {name} | {ref[key]:.0f} | {fast[key]:.0f} | {fast[key] / ref[key]:.1f}x | {torch_[peer]:.0f} | {fast[key] / torch_[peer]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
