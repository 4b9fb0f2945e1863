"""Every rename and transpose between a transformers GPT-2 checkpoint and our module tree, in one place."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gpt2.config import GPT2Config
from mlx_gpt2.errors import CheckpointError

# transformers' Conv1D stores its weight as (in_features, out_features); nn.Linear wants (out, in).
CONV1D_WEIGHTS = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# The causal-mask buffers old checkpoints saved beside the weights: constants, not parameters.
BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
BLOCK_NAME = re.compile(r"^h\.(\d+)\.")
# Prefixes that wrap the same names: transformers' save_pretrained, and mlx-lm's converted directories.
HF_PREFIX = "transformer."
MLX_PREFIX = "model."


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter our GPT2 has for this config; nothing is allocated."""
    from mlx_gpt2.model import GPT2

    # MLX initialisers are lazy: building the module only records shapes until something is evaluated.
    return {name: tuple(p.shape) for name, p in tree_flatten(GPT2(config).parameters())}


def _rename_hf(name: str) -> str:
    return name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name


def hf_to_mlx(tensors: dict[str, mx.array], config: GPT2Config, *, source: str = "checkpoint") -> dict[str, mx.array]:
    """A transformers GPT2LMHeadModel state dict (any prefix, buffers, tied or not) -> our names and layout."""
    out: dict[str, mx.array] = {}
    for hf_name, tensor in tensors.items():
        name = _rename_hf(hf_name)
        if BUFFERS.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # transformers ties it to wte on load, whatever the file holds
        out[name] = tensor.T if CONV1D_WEIGHTS.match(name) else tensor
    check_weights(out, config, source=source)
    return out


def mlx_to_hf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our names and layout -> the Hub's GPT-2 layout (no prefix, Conv1D weights (in, out))."""
    return {name: w.T if CONV1D_WEIGHTS.match(name) else w for name, w in weights.items()}


def strip_mlx_prefix(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm (and our own files, which share its format) prefix every name with `model.`."""
    return {k[len(MLX_PREFIX) :] if k.startswith(MLX_PREFIX) else k: v for k, v in tensors.items()}


def add_mlx_prefix(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {MLX_PREFIX + k: v for k, v in weights.items()}


def stored_sizes(weights: dict[str, mx.array]) -> dict[str, int]:
    """The sizes a checkpoint's own tensors show (quantized or not), from names and shapes alone.

    Layer norms and biases are never quantized, so they give the widths; the embeddings' first axes give
    the vocabulary and the window; the names give the number of blocks.
    """
    sizes: dict[str, int] = {}
    blocks = {int(m.group(1)) for m in map(BLOCK_NAME.match, weights) if m}
    sizes["n_layer"] = max(blocks) + 1 if blocks else 0
    rows = {"vocab_size": "wte.weight", "n_positions": "wpe.weight", "n_embd": "ln_f.weight", "ffn_dim": "h.0.mlp.c_fc.bias"}
    for size, name in rows.items():
        if name in weights and weights[name].ndim >= 1:
            sizes[size] = int(weights[name].shape[0])
    return sizes


def check_sizes(
    weights: dict[str, mx.array], config: GPT2Config, *, source: str = "checkpoint", only: tuple[str, ...] | None = None
) -> None:
    """Refuse a config.json whose sizes (`only` these) are not those of the stored tensors, before anything
    is built. A config claiming 300000 layers beside a 2-layer checkpoint would otherwise build 300000 blocks.
    """
    wanted = {"n_layer": config.n_layer, "vocab_size": config.vocab_size, "n_positions": config.n_positions,
              "n_embd": config.n_embd, "ffn_dim": config.ffn_dim}  # fmt: skip
    found = {k: v for k, v in stored_sizes(weights).items() if only is None or k in only}
    wrong = [f"{name} {wanted[name]} but the tensors hold {value}" for name, value in found.items() if value != wanted[name]]
    if wrong:
        raise CheckpointError(
            f"{source}: config.json says {'; '.join(wrong)}; config.json belongs to another model: "
            "use the one that came with these weights"
        )


def check_weights(weights: dict[str, mx.array], config: GPT2Config, *, source: str = "checkpoint") -> None:
    """Raise one CheckpointError listing every missing, unexpected, wrongly shaped or wrongly typed tensor."""
    check_sizes(weights, config, source=source, only=("n_layer",))  # the one size that costs to build
    expected = expected_shapes(config)
    problems = []
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_short(missing)}")
    if unknown:
        problems.append(f"unexpected {len(unknown)} tensor(s): {_short(unknown)}")
    for name in sorted(set(expected) & set(weights)):
        if tuple(weights[name].shape) != expected[name]:
            problems.append(f"{name} has shape {tuple(weights[name].shape)}, config.json implies {expected[name]}")
        elif not mx.issubdtype(weights[name].dtype, mx.floating):
            problems.append(f"{name} holds {dtype_name(weights[name].dtype)} values where weights are floating point")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config.json: " + "; ".join(problems)
            + " (is config.json from the same model? is this a GPT2LMHeadModel checkpoint?)"
        )


# A float is NaN or infinite exactly when all its exponent bits are set: (bits dtype, exponent mask) per dtype.
_EXPONENT_BITS = {mx.float32: (mx.uint32, 0x7F800000), mx.float16: (mx.uint16, 0x7C00), mx.bfloat16: (mx.uint16, 0x7F80)}
_CHUNK = 1 << 20  # elements tested at a time: bounds the temporaries at a few MB


def is_finite(w: mx.array) -> bool:
    """Whether a float array holds no NaN or infinity: its exponent bits, tested with numpy on MLX's own
    buffer (no copy). 10x faster than `mx.isfinite(w).all()` on MLX's CPU backend: 0.02 s for gpt2's
    38.6M-value embedding in float32 instead of 0.24 s."""
    if w.dtype not in _EXPONENT_BITS:
        return bool(mx.isfinite(w).all().item())
    bits, mask = _EXPONENT_BITS[w.dtype]
    words = np.asarray(memoryview(mx.contiguous(mx.view(w, bits)))).reshape(-1)
    mask = words.dtype.type(mask)
    return not any((np.bitwise_and(words[i : i + _CHUNK], mask) == mask).any() for i in range(0, words.size, _CHUNK))


def nonfinite(weights: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (every tensor is read once)."""
    return [name for name, w in weights.items() if mx.issubdtype(w.dtype, mx.floating) and not is_finite(w)]


def check_finite(weights: dict[str, mx.array], *, source: str) -> None:
    """Refuse weights holding NaN or infinity: such a model computes nothing but NaN ("!!!!" as text)."""
    bad = nonfinite(weights)
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) ({_short(bad, 4)}) hold NaN or infinite values; the checkpoint is "
            "corrupt or training diverged: re-download it or use an earlier checkpoint"
        )


def dtype_name(dtype: mx.Dtype) -> str:
    """"int32", not "mlx.core.int32"."""
    return str(dtype).rsplit(".", 1)[-1]


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
