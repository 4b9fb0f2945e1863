"""`python -m benchmarks` (also `mlx-gpt2 bench` from a clone): time mlx-gpt2 against mlx-lm and transformers.

The benchmarks import the runtime and the references; the runtime imports none of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mlx_gpt2.cli.common import MODEL, OUTPUT, Group, command, force_option

WHAT, HOW = "What to measure", "How to measure"
app = typer.Typer(cls=Group, add_completion=False, rich_markup_mode=None, help="mlx-gpt2's benchmarks.")


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
    from mlx_gpt2.fileio import check_output, write_text_atomic

    from .bench import BenchOptions, benchmark, markdown

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


command(app, "bench")(bench)


@app.callback()
def _group() -> None:
    """A group of one, so that `Group` turns every error into one line as it does for `mlx-gpt2`."""


def main() -> None:
    app(["bench", *sys.argv[1:]], prog_name="mlx-gpt2")


if __name__ == "__main__":
    main()
