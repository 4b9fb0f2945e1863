"""Real GPT-2 checkpoints on disk, built with transformers, in every layout the Hub holds.

Each writer returns the directory it filled. The layouts:

  save_pretrained  what transformers 5 writes: `transformer.` keys, tied head absent, no buffers, no n_ctx
  hub              the real `openai-community/gpt2` files: bare keys, `h.N.attn.bias` buffers, n_ctx
  sharded          save_pretrained split into model-0000x-of-0000y.safetensors + an index
  bin              only an old-style pytorch_model.bin: bare keys, attn.bias and attn.masked_bias
  bin_sharded      the same split into pytorch_model-0000x-of-0000y.bin + an index

`expected_tensors(model, layout)` is what the files hold, as numpy arrays, for tests to compare against.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from transformers import GPT2Config, GPT2LMHeadModel

TOKENIZER_DIR = Path(
    os.environ.get("MLX_GPT2_TOKENIZER_DIR")
    or Path(__file__).resolve().parents[1] / "mlx_gpt2" / "data" / "gpt2"
)

# Small enough to build in a fraction of a second; the vocabulary is the real one.
SMALL_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": 50257}
UNTIED = {"tie_word_embeddings": False}

LAYOUTS = ("save_pretrained", "hub", "sharded", "bin", "bin_sharded")
SAFETENSORS_LAYOUTS = ("save_pretrained", "hub", "sharded")
BIN_LAYOUTS = ("bin", "bin_sharded")

# The config.json of openai-community/gpt2, as the Hub serves it.
REAL_GPT2_CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}
_BOOKKEEPING = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}
_SHARD_SIZE = "200KB"  # splits the small config into four shards


def make_hf_model(config_kwargs: dict | None = None, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel in eval mode, float32; SMALL_CONFIG unless overridden."""
    config = GPT2Config(**{**SMALL_CONFIG, **(config_kwargs or {})})
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval().float()


def make_checkpoint(
    directory: Path | str,
    layout: str = "hub",
    *,
    config_kwargs: dict | None = None,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """make_hf_model + write_checkpoint in one call."""
    return write_checkpoint(make_hf_model(config_kwargs, seed), directory, layout, tokenizer=tokenizer)


def write_checkpoint(
    model: GPT2LMHeadModel, directory: Path | str, layout: str, tokenizer: bool = True
) -> Path:
    """Write `model` into `directory` (created if needed) in one of LAYOUTS; return the directory."""
    writers = {
        "save_pretrained": write_save_pretrained,
        "hub": write_hub,
        "sharded": write_sharded,
        "bin": write_bin,
        "bin_sharded": write_bin_sharded,
    }
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writers[layout](model, directory)
    if tokenizer:
        copy_tokenizer(directory)
    return directory


def write_save_pretrained(model: GPT2LMHeadModel, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def write_sharded(model: GPT2LMHeadModel, directory: Path) -> Path:
    model.save_pretrained(directory, max_shard_size=_SHARD_SIZE)
    return directory


def write_hub(model: GPT2LMHeadModel, directory: Path) -> Path:
    safetensors.torch.save_file(
        hub_state_dict(model), directory / "model.safetensors", metadata={"format": "pt"}
    )
    write_hub_config(model, directory)
    return directory


def write_bin(model: GPT2LMHeadModel, directory: Path) -> Path:
    torch.save(hub_state_dict(model, masked_bias=True), directory / "pytorch_model.bin")
    write_hub_config(model, directory)
    return directory


def write_bin_sharded(model: GPT2LMHeadModel, directory: Path, n_shards: int = 3) -> Path:
    state = hub_state_dict(model, masked_bias=True)
    names = list(state)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        filename = f"pytorch_model-{i:05d}-of-{n_shards:05d}.bin"
        torch.save({name: state[name] for name in group}, directory / filename)
        weight_map.update(dict.fromkeys(group, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    write_hub_config(model, directory)
    return directory


def hub_state_dict(model: GPT2LMHeadModel, *, masked_bias: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the Hub's own files: bare keys, causal-mask buffers, lm_head only if untied."""
    n_positions = model.config.n_positions
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                state[name] = tensor.detach().clone().contiguous()
            continue
        state[name.removeprefix("transformer.")] = tensor.detach().clone().contiguous()
    mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.float32))
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = mask.view(1, 1, n_positions, n_positions).clone()
        if masked_bias:
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def hub_config(model: GPT2LMHeadModel) -> dict:
    """The real gpt2 config.json, with this model's sizes and any non-default option."""
    config = model.config.to_dict()
    defaults = GPT2Config().to_dict()
    result = dict(REAL_GPT2_CONFIG)
    for key in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"):
        result[key] = config[key]
    for key, value in config.items():
        if key not in _BOOKKEEPING and value != defaults.get(key) and key not in ("n_ctx",):
            result[key] = value
    result["n_ctx"] = config["n_positions"]
    return result


def write_hub_config(model: GPT2LMHeadModel, directory: Path) -> None:
    text = json.dumps(hub_config(model), indent=2, sort_keys=True)
    (directory / "config.json").write_text(text + "\n")


def copy_tokenizer(directory: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        source = TOKENIZER_DIR / name
        if not source.is_file():
            raise FileNotFoundError(
                f"{source} is missing; set MLX_GPT2_TOKENIZER_DIR to a folder with vocab.json and merges.txt"
            )
        shutil.copyfile(source, directory / name)


def expected_tensors(model: GPT2LMHeadModel, layout: str) -> dict[str, np.ndarray]:
    """Every tensor a checkpoint written in `layout` holds, by name, from the model itself."""
    if layout in ("save_pretrained", "sharded"):
        tied = model.config.tie_word_embeddings
        state = {
            name: tensor
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
    elif layout == "hub":
        state = hub_state_dict(model)
    elif layout in BIN_LAYOUTS:
        state = hub_state_dict(model, masked_bias=True)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return {name: tensor.detach().float().numpy().copy() for name, tensor in state.items()}
