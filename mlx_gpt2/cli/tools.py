"""`bench`, `doctor` and `with-openblas`: how fast this machine runs MLX, and how to make it faster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL, OUTPUT, command, force_option

WHAT, HOW = "What to measure", "How to measure"


def register(app: typer.Typer) -> None:
    command(app, "bench")(bench)
    command(app, "doctor")(doctor)
    command(app, "with-openblas", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            add_help_option=False)(with_openblas)  # fmt: skip


def _split(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def bench(
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Comma-separated: gpt2, gpt2-medium, gpt2-large, tiny (default: gpt2).", rich_help_panel=WHAT),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Comma-separated: float32, bfloat16, float16, 8bit, 4bit, 4bit-fe (float head), 4bit-f16 (default: float32,bfloat16,4bit).", rich_help_panel=WHAT),
    batch: Optional[str] = typer.Option(None, "--batch", help="Comma-separated batch sizes, e.g. 1,8 (default: 1).", rich_help_panel=WHAT),
    engines: Optional[str] = typer.Option(None, "--engines", help="Comma-separated: mlx-gpt2, mlx-gpt2-plain, mlx-lm, transformers (default: all but plain).", rich_help_panel=WHAT),
    model: Optional[Path] = typer.Option(None, "--model", help="A Hub-format checkpoint directory instead of random weights.", rich_help_panel=MODEL),
    runs: Optional[int] = typer.Option(None, "--runs", help="Runs per engine; medians, minima and maxima are reported (default 3).", rich_help_panel=HOW),
    reference_runs: Optional[int] = typer.Option(None, "--reference-runs", help="Runs of transformers, the slow reference (default 1).", rich_help_panel=HOW),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="Prompt length for prefill at batch 1 (default 512).", rich_help_panel=HOW),
    gen_tokens: Optional[int] = typer.Option(None, "--gen-tokens", help="New tokens per run, EOS ignored (default 256).", rich_help_panel=HOW),
    batch_prompt_tokens: Optional[int] = typer.Option(None, "--batch-prompt-tokens", help="Prompt length per row when batch > 1 (default 64).", rich_help_panel=HOW),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="Each measurement in a fresh process (clean memory and load time).", rich_help_panel=HOW),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run (tiny model, one run): its ratios mean nothing about speed.", rich_help_panel=HOW),
    work_dir: Path = typer.Option(Path("~/.cache/mlx-gpt2/bench"), "--work-dir", help="Where checkpoints and conversions go.", rich_help_panel=OUTPUT),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full record (every run) as JSON here.", rich_help_panel=OUTPUT),
    force: bool = force_option("Replace an existing --json file."),
) -> None:
    """Compare speed with mlx-lm and transformers.

    The same checkpoints, in turns, each run in a fresh process; markdown tables on stdout.
    """
    from ..bench import BenchOptions, benchmark, markdown
    from ..fileio import check_output, write_text_atomic

    given = dict(shapes=_split(shapes), dtypes=_split(dtypes), batches=_split(batch) and tuple(int(b) for b in _split(batch)),
                 engines=_split(engines), runs=runs, reference_runs=reference_runs, prompt_tokens=prompt_tokens,
                 gen_tokens=gen_tokens, batch_prompt_tokens=batch_prompt_tokens, source=model)  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if quick:
        options = BenchOptions.smoke(work_dir, **given)
    else:
        if model is not None:
            given["shapes"] = (model.name,)
        options = BenchOptions(work_dir=work_dir, isolate=isolate, **given)
    if json_out is not None:
        check_output(json_out, force=force, kind="file")  # before minutes of measuring
    record = benchmark(options, log=lambda line: typer.echo(line, err=True))
    typer.echo(markdown(record))
    if json_out is not None:
        write_text_atomic(check_output(json_out, force=force, kind="file"), json.dumps(record, indent=1) + "\n")
        typer.echo(f"wrote {json_out}", err=True)


def doctor(
    openblas: bool = typer.Option(False, "--openblas", help="Also measure with and without OpenBLAS preloaded (a subprocess)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller, single measurements (a second or two)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show the backend, BLAS and matmul speed.

    Also the dtype and layout defaults, and a numerics check of MLX's matmul.
    """
    from ..doctor import report

    info = report(openblas=openblas, quick=quick)
    typer.echo(json.dumps(info, indent=1) if as_json else "\n".join(_doctor_lines(info)))


def _doctor_lines(info: dict) -> list[str]:
    here = info["here"]
    lines = [
        f"backend:        {info['backend']} ({info['device']})",
        f"mlx:            {info['mlx']} (backend package {info['mlx_backend_package']})",
        f"machine:        {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}",
        f"dtype default:  float16 -> {info['dtype_default']['float16']}, bfloat16 -> {info['dtype_default']['bfloat16']} (load(dtype=None))",
        f"weight layout:  {info['layout_default']} (load(layout='auto'); see mlx_gpt2/backend.py)",
        f"prefill chunk:  {info['prefill_step_default']} tokens (prefill_step_size=None)",
        f"BLAS:           {here['blas']}" + (f"  [{', '.join(here['blas_paths'])}]" if here['blas_paths'] else ""),
        f"chosen by:      {info['blas_choice']}",
        f"sgemm:          {here['gemm_gflops']:.1f} GFLOP/s; numerics vs numpy float64: max rel error {here['matmul_rel_error']:.1e}",
        f"decode head:    {here['head_ms']['checkpoint']:.1f} ms as stored, {here['head_ms']['input-major']:.1f} ms input-major (1x768 @ 768x50257)",
        f"decode MLP:     {here['block_gemv_ms']['checkpoint']:.2f} ms as stored, {here['block_gemv_ms']['input-major']:.2f} ms input-major (1x768 @ 768x3072)",
    ]
    other = info.get("with_openblas") or info.get("without_openblas")
    if other is not None:
        fast, slow = (other, here) if "with_openblas" in info else (here, other)
        decode = lambda m: min(m["head_ms"].values()) + 48 * min(m["block_gemv_ms"].values())  # ~ gpt2's products
        lines.append(
            f"OpenBLAS:       {fast['gemm_gflops']:.1f} GFLOP/s against {slow['gemm_gflops']:.1f} without "
            f"({fast['gemm_gflops'] / slow['gemm_gflops']:.1f}x: prompts, perplexity, training; {decode(slow) / decode(fast):.2f}x "
            f"for decoding); max rel error {fast['matmul_rel_error']:.1e} "
            f"({'same numerics' if fast['matmul_rel_error'] < 1e-5 else 'CHECK NUMERICS'})"
        )
    elif info.get("openblas_path") and "OpenBLAS" not in here["blas"]:
        lines.append(f"OpenBLAS:       {info['openblas_path']} is installed; `mlx-gpt2 doctor --openblas` measures the gain")
    return lines


def with_openblas(ctx: typer.Context) -> None:
    """Run a command with OpenBLAS preloaded.

    The `mlx-gpt2` command already preloads a checked OpenBLAS by itself where it finds one; this runs
    COMMAND with it whatever the check says. MLX_GPT2_OPENBLAS=PATH picks the library.
    """
    import os
    import sys

    from ..blas import CHOSEN, HOW_TO_GET_ONE, find_openblas
    from ..errors import UserError

    if not ctx.args or ctx.args[0] in ("--help", "-h"):
        typer.echo(ctx.get_help().replace("[OPTIONS]", "COMMAND [ARGS]..."))
        return
    lib = find_openblas()
    if lib is None or not Path(lib).is_file():
        raise UserError(f"no OpenBLAS found{f' at {lib}' if lib else ''}; {HOW_TO_GET_ONE.split(' makes')[0]}, or set MLX_GPT2_OPENBLAS=/path/libopenblas.so.0")
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")])), CHOSEN: lib}
    os.execve(sys.executable, [sys.executable, "-m", "mlx_gpt2", *ctx.args], env)
