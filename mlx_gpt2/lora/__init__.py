"""LoRA and QLoRA fine-tuning: adapt (layers), feed (data), train (train), merge and export (fuse)."""

from .checkpoint import read_metrics
from .fuse import fuse
from .layers import LORA_KEYS, LoRALinear, LoRASpec, apply_lora, fuse_lora, load_adapters
from .train import TrainConfig, TrainResult, train

__all__ = [
    "LORA_KEYS", "LoRALinear", "LoRASpec", "TrainConfig", "TrainResult", "apply_lora", "fuse", "fuse_lora",
    "load_adapters", "read_metrics", "train",
]
