"""`lora` and `fuse`: parse, call the fine-tuning API, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import INPUT, MODEL, OUTPUT, command, dtype_option, force_option, model_option

LORA, OPTIMIZER, MEMORY, RUN, QLORA = "LoRA", "Optimizer", "Memory", "Schedule and checkpoints", "QLoRA"


def register(app: typer.Typer) -> None:
    command(app, "lora")(lora)
    command(app, "fuse")(fuse)


def lora(
    data: Path = typer.Option(..., "--data", "-d", help="A directory with train.jsonl (and valid.jsonl) or .txt, or one such file.", rich_help_panel=INPUT),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Tokens per row (default: min(512, the model's window)).", rich_help_panel=INPUT),
    pack: bool = typer.Option(False, "--pack", help="Pack short examples into full windows.", rich_help_panel=INPUT),
    model: str = model_option(),
    dtype: Optional[str] = dtype_option("Base compute dtype: float32, float16 or bfloat16."),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank.", rich_help_panel=LORA),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="scale = alpha / rank (default alpha 16).", rich_help_panel=LORA),
    scale: Optional[float] = typer.Option(None, "--scale", help="The LoRA scale itself, instead of --alpha.", rich_help_panel=LORA),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the LoRA input, in [0, 1).", rich_help_panel=LORA),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Adapt the last N blocks (default: all).", rich_help_panel=LORA),
    lora_keys: Optional[str] = typer.Option(None, "--lora-keys", help="Comma-separated, of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (default: all).", rich_help_panel=LORA),
    full: bool = typer.Option(False, "--full", help="Fine-tune every weight instead of LoRA adapters.", rich_help_panel=LORA),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps in all (a resumed run trains on to this).", rich_help_panel=OPTIMIZER),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Rows per batch.", rich_help_panel=OPTIMIZER),
    learning_rate: float = typer.Option(2e-4, "--learning-rate", "--lr", help="Peak learning rate (AdamW).", rich_help_panel=OPTIMIZER),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps, then cosine (default: min(100, iters / 10)).", rich_help_panel=OPTIMIZER),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay.", rich_help_panel=OPTIMIZER),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max global gradient norm; 0 turns clipping off.", rich_help_panel=OPTIMIZER),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Batches per optimizer step.", rich_help_panel=OPTIMIZER),
    seed: int = typer.Option(0, "--seed", help="Seed of the adapters' init, the data order and dropout.", rich_help_panel=OPTIMIZER),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Rows per forward/backward pass (default 2): less memory, same result.", rich_help_panel=MEMORY),
    grad_checkpoint: bool = typer.Option(True, "--grad-checkpoint/--no-grad-checkpoint", help="Recompute activations in the backward pass: under half the memory, about 25% slower.", rich_help_panel=MEMORY),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="QLoRA: quantize the base on load (4 bits, group 64 unless told).", rich_help_panel=QLORA),
    bits: Optional[int] = typer.Option(None, "--bits", help="Base bits: 2, 3, 4, 6 or 8 (implies --quantize).", rich_help_panel=QLORA),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Base group size: 32, 64 or 128 (implies --quantize).", rich_help_panel=QLORA),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="Leave the token embedding / head in float.", rich_help_panel=QLORA),
    adapter_path: Path = typer.Option(..., "--adapter-path", help="Directory for adapters, checkpoints and metrics.jsonl.", rich_help_panel=OUTPUT),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --adapter-path (same options).", rich_help_panel=RUN),
    steps_per_report: int = typer.Option(10, "--steps-per-report", help="Steps between progress lines.", rich_help_panel=RUN),
    steps_per_eval: int = typer.Option(100, "--steps-per-eval", help="Steps between validation losses.", rich_help_panel=RUN),
    val_batches: int = typer.Option(25, "--val-batches", help="Validation batches per evaluation (-1: all).", rich_help_panel=RUN),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints.", rich_help_panel=RUN),
    quiet: bool = typer.Option(False, "--quiet", help="Print warnings only: no progress bar, no report lines.", rich_help_panel=OUTPUT),
) -> None:
    """Fine-tune with LoRA, QLoRA or fully.

    Ctrl-C saves a checkpoint that --resume continues exactly.
    """
    from ..lora import TrainConfig, train

    qlora = quantize or bits is not None or group_size is not None or keep_embeddings
    config = TrainConfig(
        model=model, data=str(data), adapter_path=str(adapter_path), iters=iters, batch_size=batch_size,
        learning_rate=learning_rate, max_seq_length=max_seq_length, seed=seed, resume=resume, num_layers=num_layers,
        lora_keys=_keys(lora_keys), rank=rank, alpha=alpha, scale=scale, dropout=dropout, full=full,
        grad_accum=grad_accum, micro_batch_size=micro_batch_size, grad_clip=grad_clip or None, warmup=warmup,
        weight_decay=weight_decay, grad_checkpoint=grad_checkpoint, steps_per_report=steps_per_report,
        steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, pack=pack,
        quantize=dict(bits=bits or 4, group_size=group_size or 64, keep_embeddings=keep_embeddings) if qlora else None,
        dtype=dtype,
    )
    train(config, quiet=quiet)


def _keys(text: Optional[str]) -> tuple[str, ...]:
    from ..lora import LORA_KEYS

    return LORA_KEYS if text is None else tuple(k.strip() for k in text.split(",") if k.strip())


def fuse(
    adapter_path: Path = typer.Option(..., "--adapter-path", help="Adapters saved by `mlx-gpt2 lora`.", rich_help_panel=INPUT),
    model: Optional[str] = model_option("The base model (default: the one the adapters were trained on).", default=None),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the base's own).", rich_help_panel=MODEL),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights even if the base is quantized.", rich_help_panel=OUTPUT),
    export_hf: bool = typer.Option(False, "--export-hf", help="Write a transformers GPT2LMHeadModel checkpoint.", rich_help_panel=OUTPUT),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically).", rich_help_panel=OUTPUT),
    force: bool = force_option("Replace a non-empty output directory."),
) -> None:
    """Merge LoRA adapters into the base weights."""
    from ..lora import fuse as run_fuse

    path = run_fuse(model, adapter_path, out, dequantize=dequantize, export_hf=export_hf, force=force, dtype=dtype)
    typer.echo(f"wrote {path}")
