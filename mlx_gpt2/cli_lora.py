"""CLI commands for LoRA fine-tuning (`lora`, `fuse`): parse, call the API, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main app."""
    from .cli import PanelCommand, user_errors

    app.command("lora", cls=PanelCommand)(user_errors(lora_command))
    app.command("fuse", cls=PanelCommand)(user_errors(fuse_command))


def lora_command(
    data: Path = typer.Option(..., "--data", "-d", help="Directory with train.jsonl / valid.jsonl (or .txt), or one such file."),
    adapter_path: Path = typer.Option(..., "--adapter-path", help="Directory for adapters, checkpoints and metrics.jsonl."),
    model: str = typer.Option("gpt2", "--model", "-m", help="Hub repo id, Hub-format directory, or converted directory."),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps in all (a resumed run trains on to this)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Rows per batch."),
    learning_rate: float = typer.Option(2e-4, "--learning-rate", "--lr", help="Peak learning rate (AdamW)."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Tokens per row (default: min(512, the model's window))."),
    seed: int = typer.Option(0, "--seed", help="Seed for the adapters' init, the data order and dropout."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --adapter-path (same options)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Adapt the last N blocks (default: all)."),
    lora_keys: Optional[str] = typer.Option(None, "--lora-keys", help="Comma-separated: attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj (default: all four)."),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha: scale = alpha / rank (default 16)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="LoRA scale, instead of --alpha."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the LoRA input, in [0, 1)."),
    full: bool = typer.Option(False, "--full", help="Fine-tune every weight instead of LoRA adapters."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Batches per optimizer step (token losses averaged over all)."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Rows per forward/backward pass (default 2): less memory, same result."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max global gradient norm; 0 turns clipping off."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps (default: min(100, iters / 10)); then cosine."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    grad_checkpoint: bool = typer.Option(True, "--grad-checkpoint/--no-grad-checkpoint", help="Recompute each block's activations in the backward pass: less than half the memory, about 15% slower."),
    steps_per_report: int = typer.Option(10, "--steps-per-report", help="Steps between progress lines."),
    steps_per_eval: int = typer.Option(100, "--steps-per-eval", help="Steps between validation losses."),
    val_batches: int = typer.Option(25, "--val-batches", help="Validation batches per evaluation (-1: all)."),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints."),
    pack: bool = typer.Option(False, "--pack", help="Pack short examples into full windows."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="QLoRA: quantize the base on load (4 bits, group 64 unless told)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="QLoRA base bits: 2, 3, 4, 6 or 8 (implies --quantize)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="QLoRA base group size: 32, 64 or 128 (implies --quantize)."),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="QLoRA: leave the token embedding / head in float."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Base compute dtype: float32, float16 or bfloat16 (default: the checkpoint's)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print warnings only."),
) -> None:
    """Fine-tune with LoRA (or QLoRA, or fully); Ctrl-C saves a checkpoint that --resume continues."""
    from .lora import TrainConfig, train

    qlora = quantize or bits is not None or group_size is not None or keep_embeddings
    config = TrainConfig(
        model=model, data=str(data), adapter_path=str(adapter_path), iters=iters, batch_size=batch_size,
        learning_rate=learning_rate, max_seq_length=max_seq_length, seed=seed, resume=resume, num_layers=num_layers,
        lora_keys=_keys(lora_keys), rank=rank, alpha=alpha, scale=scale, dropout=dropout, full=full,
        grad_accum=grad_accum, micro_batch_size=micro_batch_size, grad_clip=grad_clip or None, warmup=warmup, weight_decay=weight_decay,
        grad_checkpoint=grad_checkpoint, steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
        val_batches=val_batches, save_every=save_every, pack=pack,
        quantize=dict(bits=bits or 4, group_size=group_size or 64, keep_embeddings=keep_embeddings) if qlora else None,
        dtype=dtype,
    )
    train(config, quiet=quiet)


def _keys(text: Optional[str]) -> tuple[str, ...]:
    from .lora import LORA_KEYS

    return LORA_KEYS if text is None else tuple(k.strip() for k in text.split(",") if k.strip())


def fuse_command(
    adapter_path: Path = typer.Option(..., "--adapter-path", help="Adapters saved by `mlx-gpt2 lora`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The base model (default: the one the adapters were trained on)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the base's own)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights even if the base is quantized."),
    export_hf: bool = typer.Option(False, "--export-hf", help="Write a transformers GPT2LMHeadModel checkpoint (float)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
) -> None:
    """Merge LoRA adapters into the base weights: an MLX model, or with --export-hf a transformers one."""
    from .lora import fuse

    path = fuse(model, adapter_path, out, dequantize=dequantize, export_hf=export_hf, force=force, dtype=dtype)
    typer.echo(f"wrote {path}")
