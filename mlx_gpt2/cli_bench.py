"""CLI commands for speed (`bench`, `doctor`, `cache-prompt`): parse, call the API, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main app."""
    from .cli import PanelCommand, user_errors

    app.command("cache-prompt", cls=PanelCommand)(user_errors(cache_prompt_command))
    app.command("bench", cls=PanelCommand)(user_errors(bench_command))
    app.command("doctor", cls=PanelCommand)(user_errors(doctor_command))
    app.command("with-openblas", cls=PanelCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                add_help_option=False)(with_openblas_command)


def cache_prompt_command(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prefix to cache; '-' reads stdin (one trailing newline dropped)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prefix exactly from FILE ('-': stdin)."),
    out: Path = typer.Option(..., "--out", "-o", help="The cache file to write (safetensors)."),
    model: str = typer.Option("gpt2", "--model", "-m", help="Hub repo id, Hub-format directory, or converted directory."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, float16 or bfloat16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file at --out."),
) -> None:
    """Save the KV cache of a long prompt prefix; `generate --prompt-cache FILE --prompt REST` reuses it."""
    from . import load
    from .cli import read_prompt
    from .convert import resolve_source
    from .fileio import check_output, claim_output
    from .prompt_cache import cache_prompt

    check_output(out, force=force, kind="file")  # before the load: fail fast
    text = read_prompt(prompt, file=prompt_file)
    with claim_output(out, force=force, inputs=[resolve_source(model, revision=revision)], kind="file") as path:
        lm, tokenizer = load(model, revision=revision, dtype=dtype)
        n = cache_prompt(lm, tokenizer, text, path)
    typer.echo(f"wrote {out} ({n} tokens)")


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def bench_command(
    shapes: str = typer.Option("gpt2", "--shapes", help="Comma-separated: gpt2, gpt2-medium, gpt2-large, tiny."),
    dtypes: str = typer.Option("float32,bfloat16,4bit", "--dtypes", help="Comma-separated: float32, bfloat16, float16, 8bit, 4bit, 4bit-fe (float head), 4bit-f16 (float16 scales)."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes, e.g. 1,8."),
    engines: str = typer.Option("mlx-gpt2,mlx-lm,transformers", "--engines", help="Comma-separated: mlx-gpt2, mlx-gpt2-plain, mlx-lm, transformers."),
    runs: int = typer.Option(3, "--runs", help="Runs per engine; medians, minima and maxima are reported."),
    reference_runs: int = typer.Option(1, "--reference-runs", help="Runs of transformers (the slow reference)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length for prefill (batch 1)."),
    gen_tokens: int = typer.Option(256, "--gen-tokens", help="New tokens per run (EOS ignored)."),
    batch_prompt_tokens: int = typer.Option(64, "--batch-prompt-tokens", help="Prompt length per row when batch > 1."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run: 2-layer model, 16+8 tokens, 1 run, in this process (its memory and load columns mean little)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A Hub-format checkpoint directory to use instead of random weights."),
    work_dir: Path = typer.Option(Path("~/.cache/mlx-gpt2/bench"), "--work-dir", help="Where checkpoints and conversions go."),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="Each measurement in a fresh process (clean memory and load time)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full record (every run) as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
) -> None:
    """Time mlx-gpt2 against mlx-lm and transformers on the same checkpoints; print a markdown table."""
    from .bench import BenchOptions, benchmark, markdown

    if quick:  # transformers would be most of a smoke run's time
        options = BenchOptions.quick(work_dir, engines=tuple(e for e in _split(engines) if e != "transformers"))
    else:
        options = BenchOptions(
            shapes=(model.name,) if model else _split(shapes), dtypes=_split(dtypes), batches=tuple(int(b) for b in _split(batch)),
            engines=_split(engines), runs=runs, reference_runs=reference_runs, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
            batch_prompt_tokens=batch_prompt_tokens, work_dir=work_dir, isolate=isolate, source=model,
        )
    from .fileio import check_output, write_text_atomic

    if json_out is not None:
        check_output(json_out, force=force, kind="file")  # before minutes of measuring
    record = benchmark(options, log=lambda line: typer.echo(line, err=True))
    typer.echo(markdown(record))
    if json_out is not None:
        write_text_atomic(check_output(json_out, force=force, kind="file"), json.dumps(record, indent=1) + "\n")
        typer.echo(f"wrote {json_out}", err=True)


def doctor_command(
    openblas: bool = typer.Option(False, "--openblas", help="Also measure with the system OpenBLAS preloaded (a subprocess)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller, single measurements (a second or two)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Backend, device, MLX version, dtype and layout defaults, which BLAS runs matmuls, and how fast."""
    from .doctor import report

    info = report(openblas=openblas, quick=quick)
    typer.echo(json.dumps(info, indent=1) if as_json else "\n".join(_doctor_lines(info)))


def _doctor_lines(info: dict) -> list[str]:
    here = info["here"]
    lines = [
        f"backend:        {info['backend']} ({info['device']})",
        f"mlx:            {info['mlx']} (backend package {info['mlx_backend_package']})",
        f"machine:        {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}",
        f"dtype default:  float16 -> {info['dtype_default']['float16']}, bfloat16 -> {info['dtype_default']['bfloat16']} (load(dtype=None))",
        f"weight layout:  {info['layout_default']} (load(layout='auto'): float weights, and 2/4/8-bit quantized levels on the CPU; see mlx_gpt2/backend.py)",
        f"prefill chunk:  {info['prefill_step_default']} tokens (prefill_step_size=None)",
        f"BLAS:           {here['blas']}" + (f"  [{', '.join(here['blas_paths'])}]" if here['blas_paths'] else ""),
        f"sgemm:          {here['gemm_gflops']:.1f} GFLOP/s; numerics vs numpy float64: max rel error {here['matmul_rel_error']:.1e}",
        f"decode head:    {here['head_ms']['checkpoint']:.1f} ms as stored, {here['head_ms']['input-major']:.1f} ms input-major (1x768 @ 768x50257)",
        f"decode MLP:     {here['block_gemv_ms']['checkpoint']:.2f} ms as stored, {here['block_gemv_ms']['input-major']:.2f} ms input-major (1x768 @ 768x3072)",
    ]
    lib = info.get("openblas_path")
    if "with_openblas" in info:
        other = info["with_openblas"]
        gain = other["gemm_gflops"] / here["gemm_gflops"]
        decode = lambda m: min(m["head_ms"].values()) + 48 * min(m["block_gemv_ms"].values())  # ~ gpt2's products
        lines += [
            f"with OpenBLAS:  {other['gemm_gflops']:.1f} GFLOP/s ({gain:.1f}x: prompts, perplexity, training); decode head "
            f"{min(other['head_ms'].values()):.1f} ms, decode MLP {min(other['block_gemv_ms'].values()):.2f} ms "
            f"({decode(here) / decode(other):.2f}x for decoding); max rel error {other['matmul_rel_error']:.1e} "
            f"({'same numerics' if other['matmul_rel_error'] < 1e-5 else 'CHECK NUMERICS'})",
            f"to use it:      mlx-gpt2 with-openblas generate ...   (or LD_PRELOAD={lib} mlx-gpt2 generate ...)",
        ]
    elif lib and "OpenBLAS" not in here["blas"]:
        lines.append(f"OpenBLAS:       {lib} is installed; `mlx-gpt2 doctor --openblas` measures the gain")
    elif not lib and info["backend"] == "cpu" and "reference" in here["blas"]:
        lines.append("OpenBLAS:       none found; on Debian/Ubuntu `apt-get install libopenblas0-pthread`, then `mlx-gpt2 doctor --openblas`")
    return lines


def with_openblas_command(ctx: typer.Context) -> None:
    """Run any mlx-gpt2 command with the system OpenBLAS preloaded: `mlx-gpt2 with-openblas generate -p hi`."""
    import os
    import sys

    from .doctor import find_openblas

    lib = find_openblas()
    if lib is None:
        typer.echo("error: no system OpenBLAS found; install libopenblas0-pthread or set MLX_GPT2_OPENBLAS=/path/libopenblas.so.0", err=True)
        raise typer.Exit(1)
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))}
    os.execve(sys.executable, [sys.executable, "-m", "mlx_gpt2", *ctx.args], env)
