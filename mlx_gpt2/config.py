"""GPT-2 hyperparameters: one frozen dataclass, read from a checkpoint's own config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .activations import ACTIVATIONS as activation_table
from .errors import UserError
from .fileio import read_json

# Every activation transformers' GPT-2 accepts (transformers.activations.ACT2CLS) that is a fixed function;
# prelu and xielu carry learned parameters that GPT-2's MLP has no slot for, so they are refused.
ACTIVATIONS = tuple(activation_table)

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
            if not _is_int(value) or value < 1:
                raise UserError(f"config.json: {name} must be a positive integer, got {_short(value)}")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner < 1):
            raise UserError(f"config.json: n_inner must be a positive integer or null, got {_short(self.n_inner)}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise UserError(f"config.json: layer_norm_epsilon must be a number in (0, 1) (GPT-2 uses 1e-05), got {_short(eps)}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"config.json: {name} must be true or false, got {_short(getattr(self, name))}")
        if self.n_embd % self.n_head:
            raise UserError(f"config.json: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config.json: activation_function {_short(self.activation_function)} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.num_parameters > MAX_PARAMETERS:
            raise UserError(
                f"config.json describes a model of {_magnitude(self.num_parameters)} parameters, far beyond any GPT-2 "
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
        return cls.from_config_json(read_config_json(path), source=str(path))

    @classmethod
    def from_config_json(cls, raw: dict[str, Any], *, source: str) -> GPT2Config:
        """From a checkpoint's config.json as read (`read_config_json`); a model of another type is refused."""
        if raw.get("model_type", "gpt2") != "gpt2":
            raise UserError(f"{source}: model_type is {_short(raw.get('model_type'))}; mlx-gpt2 runs GPT-2 models only")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers and mlx-lm both read (mlx-lm needs n_ctx)."""
        out = dataclasses.asdict(self)
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        return out


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a model directory, as a dict; anything else is a one-line UserError."""
    path = Path(path)
    raw = read_json(path, missing="a model directory needs its config.json", invalid="; re-download or re-convert the model")
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object of GPT-2 hyperparameters")
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 40) -> str:
    """repr(value), cut short: a hostile config may hold a 400-digit number or a megabyte of text."""
    text = repr(value) if not _is_int(value) or value < 10**limit else f"a {len(str(value))}-digit number"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _magnitude(n: int) -> str:
    """3 significant digits of a count that may be too large for a float (10**400 parameters)."""
    return f"{n:.3g}" if n < 10**300 else f"about 1e{len(str(n)) - 1}"


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
}
