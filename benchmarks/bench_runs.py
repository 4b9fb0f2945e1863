"""One benchmark measurement: make a checkpoint, convert it, or time one engine on it.

`benchmarks.bench` drives these, each in a fresh process (`python -m benchmarks.bench_runs JSON`), so the
load time and peak memory are those of a process that did nothing else. Every engine is timed the same
way: load the model (weights materialised), then one greedy generation over the same random prompt with
EOS ignored. Prefill is the time to the first new token (the prompt through the model, plus one step);
decode is the time from the first new token to the last, over the tokens after the first.

mlx-lm, transformers and torch are imported only here, only when asked for; the package never needs them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import mlx.core as mx


# Real GPT-2 shapes; the weights are random (speed does not depend on their values).
SHAPES = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4},  # smoke tests
}
# name -> (float dtype of the conversion, quantization bits or None, token embedding left in float)
DTYPES = {
    "float32": ("float32", None, False),
    "bfloat16": ("bfloat16", None, False),
    "float16": ("float16", None, False),
    "8bit": ("float32", 8, False),
    "4bit": ("float32", 4, False),
    "4bit-fe": ("float32", 4, True),  # 4-bit blocks; the token embedding (= output head) stays float32
    "4bit-f16": ("float16", 4, False),  # quantized from a float16 checkpoint: float16 scales, as most hubs ship
}
ENGINES = ("mlx-gpt2", "mlx-gpt2-plain", "mlx-lm", "transformers")
GROUP_SIZE = 64
SEED = 0


def tokenizer_dir() -> Path:
    """GPT-2's vocab.json + merges.txt, as shipped in the package."""
    from mlx_gpt2.tokenizer import BUNDLED_DIR

    return BUNDLED_DIR


def make_source(shape: str, directory: Path) -> Path:
    """A Hub-format GPT-2 of `shape` with random weights (transformers, fixed seed); reused if present."""
    if (directory / "config.json").is_file():
        return directory
    import safetensors.torch
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(n_positions=1024, vocab_size=50257, **SHAPES[shape])).eval()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The real openai-community/gpt2 layout: bare keys, no lm_head (tied), n_ctx in config.json.
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = {**model.config.to_dict(), "n_ctx": 1024, "architectures": ["GPT2LMHeadModel"]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir() / name, tmp / name)
    tmp.rename(directory)
    return directory


def convert(engine: str, source: Path, out: Path, dtype: str) -> float:
    """Convert `source` with "mlx-gpt2" or "mlx-lm" into `out` as `dtype`; return the seconds it took."""
    float_dtype, bits, keep_embeddings = DTYPES[dtype]
    shutil.rmtree(out, ignore_errors=True)
    tic = time.perf_counter()
    if engine == "mlx-gpt2":
        from mlx_gpt2.convert import convert as ours

        spec = dict(bits=bits, group_size=GROUP_SIZE, keep_embeddings=keep_embeddings) if bits else None
        ours(source, out, dtype=float_dtype, quantize=spec)
    else:
        from mlx_lm.convert import convert as theirs

        skip = {"model.wte", "model.wpe"}  # 4bit-fe: both embeddings in float, as ours keeps them
        predicate = (lambda path, *_: path not in skip) if keep_embeddings else None
        with quietly():  # mlx-lm prints [INFO] lines; the bench's own output is its tables
            theirs(str(source), str(out), dtype=float_dtype, quantize=bool(bits), q_bits=bits,
                   q_group_size=GROUP_SIZE if bits else None, quant_predicate=predicate)
    return time.perf_counter() - tic


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Swallow what a peer library prints or logs (mlx-lm's [INFO] lines) while it loads or converts."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def prompt_ids(length: int, batch: int = 1) -> list[list[int]]:
    """`batch` prompts of `length` random token ids (never <|endoftext|>), the same for every engine."""
    return mx.random.randint(0, 50000, (batch, length), key=mx.random.key(SEED)).tolist()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def _timed_stream(tokens) -> dict:
    """Drain an iterator of generated token ids; time the first one and the rest."""
    tic, cpu, out, first = time.perf_counter(), _cpu_seconds(), [], None
    for token in tokens:
        out.append(int(token))
        if first is None:
            first, cpu_first = time.perf_counter(), _cpu_seconds()
    end, cpu_end = time.perf_counter(), _cpu_seconds()
    rest = max(len(out) - 1, 1)
    return {
        "prefill_s": first - tic, "decode_s": end - first, "decode_tokens": len(out) - 1,
        "decode_cpu_ms": 1e3 * (cpu_end - cpu_first) / rest, "prefill_cpu_s": cpu_first - cpu, "tokens": out[:24],
    }


def run_mlx_gpt2(directory: Path, prompt: list[int], gen_tokens: int, *, plain: bool) -> tuple[float, dict]:
    from mlx_gpt2 import generate_step, load

    tic = time.perf_counter()
    model, _ = load(directory, lazy=False, layout="checkpoint" if plain else "auto",
                    dtype=_checkpoint_dtype(directory) if plain else None)
    load_s = time.perf_counter() - tic
    return load_s, _timed_stream(t for t, _ in generate_step(prompt, model, max_tokens=gen_tokens))


def _checkpoint_dtype(directory: Path) -> str | None:
    """The float dtype the directory stores (the plain engine computes in it, as mlx-lm does)."""
    for name, dtype in mx.load(str(directory / "model.safetensors")).items():
        if name.endswith("ln_f.weight"):
            return {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype.dtype, "float32")
    return None


def run_mlx_lm(directory: Path, prompt: list[int], gen_tokens: int) -> tuple[float, dict]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    with quietly():
        model, _ = load(str(directory))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - tic
    steps = generate_step(mx.array(prompt), model, max_tokens=gen_tokens)
    return load_s, _timed_stream(t for t, _ in steps)


def run_transformers(directory: Path, prompt: list[int], gen_tokens: int, dtype: str) -> tuple[float, dict]:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_grad_enabled(False)
    tic = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - tic

    def tokens():
        out = model(torch.tensor([prompt]), use_cache=True)
        for n in range(gen_tokens):
            token = out.logits[0, -1].argmax()
            yield token.item()
            if n + 1 < gen_tokens:
                out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)

    return load_s, _timed_stream(tokens())


def run_mlx_gpt2_batch(directory: Path, prompts: list[list[int]], gen_tokens: int) -> tuple[float, dict]:
    from mlx_gpt2 import load
    from mlx_gpt2.generation.batch import batch_generate_response

    tic = time.perf_counter()
    model, tokenizer = load(directory, lazy=False)
    load_s = time.perf_counter() - tic
    r = batch_generate_response(model, tokenizer, prompts, max_tokens=gen_tokens, ignore_eos=True)
    return load_s, {"prefill_tps": r.prompt_tps, "decode_tps": r.generation_tps, "tokens": r.tokens[0][:24]}


def run_mlx_lm_batch(directory: Path, prompts: list[list[int]], gen_tokens: int) -> tuple[float, dict]:
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    tic = time.perf_counter()
    model, _ = load(str(directory))
    load_s = time.perf_counter() - tic
    generator = BatchGenerator(model, stop_tokens=None)  # no stop tokens: EOS ignored
    generator.insert(prompts, [gen_tokens] * len(prompts))
    first: list[int] = []
    with generator.stats() as stats:
        while responses := generator.next_generated():
            first += [r.token for r in responses if r.uid == 0]
    generator.close()
    return load_s, {"prefill_tps": stats.prompt_tps, "decode_tps": stats.generation_tps, "tokens": first[:24]}


def measure(spec: dict) -> dict:
    """Time one engine on one converted directory; `spec` says which (see bench.py's _measure_spec)."""
    engine, directory, batch = spec["engine"], Path(spec["dir"]), spec["batch"]
    gc.collect()  # a fresh process has nothing to free or reset; an in-process run (--no-isolate) does
    mx.clear_cache()
    mx.reset_peak_memory()
    prompts = prompt_ids(spec["prompt_tokens"], batch)
    gen = spec["gen_tokens"]
    if batch > 1:
        runner = {"mlx-gpt2": run_mlx_gpt2_batch, "mlx-lm": run_mlx_lm_batch}[engine]
        load_s, result = runner(directory, prompts, gen)
    elif engine in ("mlx-gpt2", "mlx-gpt2-plain"):
        load_s, result = run_mlx_gpt2(directory, prompts[0], gen, plain=engine == "mlx-gpt2-plain")
    elif engine == "mlx-lm":
        load_s, result = run_mlx_lm(directory, prompts[0], gen)
    else:
        load_s, result = run_transformers(directory, prompts[0], gen, spec["torch_dtype"])
    if "prefill_s" in result:
        result["prefill_tps"] = spec["prompt_tokens"] / result["prefill_s"]
        result["decode_tps"] = result["decode_tokens"] / result["decode_s"]
    result.update(load_s=load_s, rss_peak_gb=_rss_gb())
    if engine != "transformers":
        result["peak_gb"] = mx.get_peak_memory() / 1e9
    else:
        import torch

        result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv: list[str]) -> None:
    """`python -m benchmarks.bench_runs '{"command": ...}'`: run one step, print its JSON as the last line."""
    spec = json.loads(argv[0])
    if spec["command"] == "source":
        result = {"dir": str(make_source(spec["shape"], Path(spec["dir"])))}
    elif spec["command"] == "convert":
        result = {"seconds": convert(spec["engine"], Path(spec["source"]), Path(spec["out"]), spec["dtype"])}
    else:
        result = measure(spec)
    print("\n" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
