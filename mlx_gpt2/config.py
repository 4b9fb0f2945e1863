"""GPT-2 hyperparameters: one frozen dataclass, read from a checkpoint's own config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import read_json

# Every activation transformers' GPT-2 accepts (transformers.activations.ACT2CLS) that is a fixed function.
# prelu and xielu carry learned parameters that GPT-2's MLP has no slot for, so they are refused.
ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
    "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2",
    "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh",
)

# gpt2-xl has 1.6e9 parameters; anything far past that is a corrupt or hostile config, and refusing it here
# happens before a single array is allocated.
MAX_PARAMETERS = 20_000_000_000


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise UserError(f"config.json: n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"config.json: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config.json: activation_function {self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.num_parameters > MAX_PARAMETERS:
            raise UserError(
                f"config.json describes a model of {self.num_parameters:.3g} parameters, far beyond any GPT-2 "
                f"(gpt2-xl has 1.6e9); the config is corrupt: check vocab_size, n_embd, n_layer, n_positions"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def num_parameters(self) -> int:
        d, f = self.n_embd, self.ffn_dim
        block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_positions * d + self.n_layer * block + 2 * d + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPT2Config:
        """Build from a transformers-style config dict; unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        # Old configs carry n_ctx (the attention window) beside n_positions; they are equal for every GPT-2.
        if "n_positions" not in values and "n_ctx" in raw:
            values["n_positions"] = raw["n_ctx"]
        for name in ("bos_token_id", "eos_token_id"):
            if not isinstance(values.get(name, 0), int):  # some fine-tunes store null or a list
                values.pop(name)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> GPT2Config:
        path = Path(path)
        raw = read_json(path, missing="a model directory needs its config.json", invalid="; re-download or re-convert the model")
        if not isinstance(raw, dict):
            raise UserError(f"{path} must hold a JSON object of GPT-2 hyperparameters")
        if raw.get("model_type", "gpt2") != "gpt2":
            raise UserError(f"{path}: model_type is {raw.get('model_type')!r}; mlx-gpt2 runs GPT-2 models only")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers and mlx-lm both read (mlx-lm needs n_ctx)."""
        out = dataclasses.asdict(self)
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        return out


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
}
