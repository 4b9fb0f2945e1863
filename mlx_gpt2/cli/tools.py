"""`bench`, `doctor` and `with-openblas`: how fast this machine runs MLX, and how to make it faster."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import command



def register(app: typer.Typer) -> None:
    command(app, "bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            add_help_option=False)(bench)  # fmt: skip
    command(app, "doctor")(doctor)
    command(app, "with-openblas", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            add_help_option=False)(with_openblas)  # fmt: skip


def bench(ctx: typer.Context) -> None:
    """Compare speed with mlx-lm and transformers.

    The benchmarks live in the source repository (benchmarks/), not in the installed package: this runs
    `python -m benchmarks` from the clone mlx-gpt2 was installed from, with the same options (--help lists them).
    """
    import os
    import subprocess
    import sys

    from ..errors import UserError

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise UserError("the benchmarks ship with the source repository: clone it, `pip install -e '.[bench]'` there, then run `mlx-gpt2 bench`")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    raise typer.Exit(subprocess.run([sys.executable, "-m", "benchmarks", *ctx.args], env=env).returncode)


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
