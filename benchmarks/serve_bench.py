"""`mlx-gpt2 serve` against `mlx_lm.server` on the same checkpoint, under 1, 4 and 16 concurrent clients.

    python -m benchmarks.serve_bench [--clients 1,4,16] [--prompt-tokens 64] [--max-tokens 64] [--runs 1]

A GPT-2 with random weights at the real shape (transformers, seed 0) is written in the Hub's layout and
converted by each library's own converter (float32). Each server then runs in its own process on a free
loopback port -- one at a time, the order flipping every run -- and is warmed up with one request. At each
concurrency level, every client sends one streaming /v1/completions request (greedy, its own prompt of
random words, the same prompts for both servers) and reads it to the end:

- throughput: completion tokens (the servers' own `usage` counts) / wall time from the first request
  to the last token of the last one;
- time to first token (TTFT): from sending a request to its first chunk that carries text; p50 and p95
  over the level's requests.

`mlx-gpt2 generate` on one prompt (its printed prompt and generation rates, load excluded) is the
single-client reference the server should come within 10% of. Results: benchmarks/results/serve-*.json
and a markdown table on stdout (benchmarks/RESULTS.md keeps the one that was run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .bench_runs import convert, make_source

REPO = Path(__file__).resolve().parents[1]
WORDS = ("time", "river", "house", "number", "light", "paper", "music", "garden", "window", "table", "stone",
         "market", "silver", "engine", "letter", "forest", "summer", "bridge", "voice", "circle")  # fmt: skip


def prompts(n: int, tokens: int, seed: int = 0) -> list[str]:
    """n different prompts of about `tokens` tokens (one word is one GPT-2 token with its leading space)."""
    import random

    rng = random.Random(seed)
    return ["The" + "".join(" " + rng.choice(WORDS) for _ in range(tokens - 1)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, directory: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if engine == "mlx-gpt2":
        command = [sys.executable, "-m", "mlx_gpt2", "serve", "--model", str(directory), "--port", str(port),
                   "--quiet", "--max-concurrency", "16"]  # fmt: skip
    elif engine == "mlx-gpt2-bundled-blas":
        env["MLX_GPT2_OPENBLAS"] = "0"  # the BLAS mlx-lm runs on: the like-for-like row
        command = [sys.executable, "-m", "mlx_gpt2", "serve", "--model", str(directory), "--port", str(port),
                   "--quiet", "--max-concurrency", "16"]  # fmt: skip
    else:
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(directory), "--port", str(port),
                   "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} exited at start with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)  # polling for the server to listen, not timing anything
    proc.kill()
    raise SystemExit(f"{engine} did not start in 180 s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent, first, tokens, chunks = time.perf_counter(), None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    first = first or time.perf_counter()
    return {"sent": sent, "ttft": (first or time.perf_counter()) - sent, "done": time.perf_counter(),
            "tokens": tokens if tokens is not None else chunks}


async def level(url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as client:
        results = await asyncio.gather(*(one_request(client, url, model, t, max_tokens) for t in texts))
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": len(texts), "tokens": tokens, "wall_s": wall, "throughput": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def serve_engine(engine: str, directory: Path, clients: list[int], prompt_tokens: int, max_tokens: int,
                 run: int) -> list[dict]:  # fmt: skip
    port = free_port()
    proc = start(engine, directory, port)
    url, model = f"http://127.0.0.1:{port}", str(directory)
    try:
        asyncio.run(level(url, model, prompts(1, prompt_tokens, seed=999), 8))  # warm-up: compile, allocate
        rows = []
        for c in clients:
            texts = prompts(c, prompt_tokens, seed=1000 * run + c)
            rows.append({"engine": engine, "run": run, **asyncio.run(level(url, model, texts, max_tokens))})
            print(f"  {engine:22s} {c:3d} clients: {rows[-1]['throughput']:7.1f} tok/s, TTFT p50 "
                  f"{rows[-1]['ttft_p50']:.2f} s p95 {rows[-1]['ttft_p95']:.2f} s", flush=True)  # fmt: skip
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def generate_reference(directory: Path, prompt_tokens: int, max_tokens: int) -> dict:
    """`mlx-gpt2 generate` on one prompt: its own prompt and generation rates (load excluded)."""
    command = [sys.executable, "-m", "mlx_gpt2", "generate", "--model", str(directory), "--prompt",
               prompts(1, prompt_tokens, seed=7)[0], "--max-tokens", str(max_tokens), "--temp", "0", "--ignore-eos", "--verbose"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    text = out.stdout + out.stderr
    prompt = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s", text)
    gen = re.search(r"generation: (\d+) tokens, ([\d.]+) tokens/s", text)
    if not (prompt and gen):
        raise SystemExit(f"mlx-gpt2 generate printed no rates:\n{text[-2000:]}")
    seconds = int(prompt[1]) / float(prompt[2]) + int(gen[1]) / float(gen[2])
    return {"tokens": int(gen[1]), "seconds": seconds, "throughput": int(gen[1]) / seconds,
            "ttft": int(prompt[1]) / float(prompt[2])}  # fmt: skip


def markdown(rows: list[dict], reference: dict) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["engine"], r["clients"]), []).append(r)
    med = lambda key, metric: statistics.median(r[metric] for r in by[key])
    engines = sorted({r["engine"] for r in rows}, key=lambda e: (e != "mlx-gpt2", e))
    lines = ["| clients | engine | tokens/s | TTFT p50 s | TTFT p95 s | x mlx_lm.server tokens/s | p95 TTFT vs mlx_lm.server |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for c in sorted({r["clients"] for r in rows}):
        for e in engines:
            if (e, c) not in by:
                continue
            peer = ("mlx-lm", c)
            ratio = f"{med((e, c), 'throughput') / med(peer, 'throughput'):.2f}x" if peer in by and e != "mlx-lm" else ""
            ttft = f"{med((e, c), 'ttft_p95') / med(peer, 'ttft_p95'):.2f}x" if peer in by and e != "mlx-lm" else ""
            lines.append(f"| {c} | {e} | {med((e, c), 'throughput'):.1f} | {med((e, c), 'ttft_p50'):.2f} | "
                         f"{med((e, c), 'ttft_p95'):.2f} | {ratio} | {ttft} |")  # fmt: skip
    if ("mlx-gpt2", 1) in by:
        share = med(("mlx-gpt2", 1), "throughput") / reference["throughput"]
        lines.append(f"\n1 client against `mlx-gpt2 generate` (prompt + generation, load excluded): "
                     f"{reference['throughput']:.1f} tokens/s; the server gives {share:.2f}x of it.")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--engines", default="mlx-gpt2,mlx-lm")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/mlx-gpt2/bench").expanduser())
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve-gpt2.json")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    engines = args.engines.split(",")
    root = args.work_dir / args.shape
    source = make_source(args.shape, root / "hub")
    dirs = {}
    for converter in ("mlx-gpt2", "mlx-lm"):
        out = root / f"{converter}-float32"
        if not (out / "config.json").is_file():
            print(f"converting with {converter}: {convert(converter, source, out, 'float32'):.1f} s", flush=True)
        dirs[converter] = out
    rows = []
    for run in range(args.runs):
        order = engines if run % 2 == 0 else engines[::-1]
        for engine in order:
            directory = dirs["mlx-lm" if engine == "mlx-lm" else "mlx-gpt2"]
            rows += serve_engine(engine, directory, clients, args.prompt_tokens, args.max_tokens, run)
    reference = generate_reference(dirs["mlx-gpt2"], args.prompt_tokens, args.max_tokens)
    import mlx.core as mx

    record = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shape": args.shape, "dtype": "float32",
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "machine": platform.platform(),
              "mlx_device": str(mx.default_device()), "load_average": os.getloadavg(), "rows": rows,
              "generate": reference}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(markdown(rows, reference))


if __name__ == "__main__":
    main()
