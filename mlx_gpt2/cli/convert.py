"""`convert`: parse, call the converter, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import MODEL, OUTPUT, command, force_option, progress_bar, quiet_option, revision_option

QUANTIZATION = "Quantization"


def register(app: typer.Typer) -> None:
    command(app, "convert")(convert)


def convert(
    source: str = typer.Argument(..., help="Hub repo id (gpt2, openai-community/gpt2-medium, ...) or local directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically).", rich_help_panel=OUTPUT),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's).", rich_help_panel=MODEL),
    revision: Optional[str] = revision_option(),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights (4 bits, group 64 unless told).", rich_help_panel=QUANTIZATION),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight: 2, 3, 4, 6 or 8 (implies --quantize).", rich_help_panel=QUANTIZATION),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Weights per scale: 32, 64 or 128 (implies --quantize).", rich_help_panel=QUANTIZATION),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="Leave the token embedding / output head in float.", rich_help_panel=QUANTIZATION),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'mixed': the most sensitive layers at 8 bits, fitted scales.", rich_help_panel=QUANTIZATION),
    fit_scales: bool = typer.Option(False, "--fit-scales", help="Fit each group's scale and bias by least squares (lower error, same size).", rich_help_panel=QUANTIZATION),
    force: bool = force_option("Replace a non-empty output directory."),
    quiet: bool = quiet_option(),
) -> None:
    """Convert a GPT-2 checkpoint to MLX.

    SOURCE is a Hugging Face Hub repo id or a local directory in any GPT-2 layout.
    """
    from ..config import read_config_json
    from ..convert import convert as run_convert
    from ..quant.quantize import QuantizeConfig

    spec = None
    if quantize or bits is not None or group_size is not None or keep_embeddings or recipe is not None or fit_scales:
        spec = QuantizeConfig(
            bits=4 if bits is None else bits, group_size=64 if group_size is None else group_size,
            keep_embeddings=keep_embeddings, recipe=recipe, fit_scales=fit_scales,
        )
    with progress_bar("quantizing", unit="layer", quiet=quiet) as progress:
        path = run_convert(source, out, dtype=dtype, revision=revision, force=force, quantize=spec, progress=progress)
    summary = read_config_json(path / "config.json")["mlx_gpt2"].get("quantization")
    typer.echo(f"wrote {path}" + (f" ({summary['bits_per_weight']:.2f} bits per weight)" if summary else ""))
