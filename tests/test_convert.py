"""The converter: every layout in, one MLX layout out, checked before writing, written all-or-nothing."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy

from checkpoints import make_hf_model, write_checkpoint
from conftest import hf_logits
from mlx_gpt2 import CheckpointError, UserError, load
from mlx_gpt2.convert import convert


def test_convert_writes_mlx_layout_and_loads_back(small_hf, small_dir, tmp_path, ids):
    out = convert(small_dir, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 128 and config["mlx_gpt2"]["format_version"] == 1
    tensors = mx.load(str(out / "model.safetensors"))
    assert not any(".attn.bias" in k for k in tensors)  # causal-mask buffers dropped
    assert tensors["model.h.0.attn.c_attn.weight"].shape == (192, 64)  # Conv1D (in, out) -> Linear (out, in)
    model, _ = load(out)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(small_hf, ids)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_dtype(dtype, small_dir, tmp_path):
    out = convert(small_dir, tmp_path / dtype, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for v in mx.load(str(out / "model.safetensors")).values())


def test_bad_dtype_is_a_clear_error(small_dir, tmp_path):
    with pytest.raises(UserError, match="dtype 'int8' is not supported; use one of float32"):
        convert(small_dir, tmp_path / "x", dtype="int8")


def test_existing_output_is_refused_without_force(small_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="pass --force"):
        convert(small_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(small_dir, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def _siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing(small_dir, tmp_path, monkeypatch):
    def interrupted(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(small_dir, tmp_path / "out")
    assert _siblings(tmp_path) == []


def test_failed_forced_conversion_keeps_previous_output(small_dir, tmp_path, monkeypatch):
    out = convert(small_dir, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        convert(small_dir, out, force=True)
    assert (out / "model.safetensors").read_bytes() == before and _siblings(tmp_path) == ["out"]


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)


def test_missing_unknown_and_misshapen_tensors_are_all_reported(small_hf, tmp_path):
    directory = write_checkpoint(small_hf, tmp_path / "bad", "hub")

    def edit(t):
        del t["h.1.mlp.c_fc.bias"]
        t["h.0.attn.extra"] = np.zeros(3, np.float32)
        t["ln_f.weight"] = np.zeros(65, np.float32)

    _edit_tensors(directory, edit)
    with pytest.raises(CheckpointError) as info:
        convert(directory, tmp_path / "out")
    message = str(info.value)
    assert "missing 1 tensor(s): h.1.mlp.c_fc.bias" in message
    assert "unexpected 1 tensor(s): h.0.attn.extra" in message
    assert "ln_f.weight has shape (65,), config.json implies (64,)" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_config_from_another_model_is_a_shape_error(small_hf, tmp_path):
    directory = write_checkpoint(small_hf, tmp_path / "bad", "hub")
    config = json.loads((directory / "config.json").read_text())
    config["n_embd"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wte.weight has shape \(50257, 64\), config.json implies \(50257, 128\)"):
        load(directory)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_head": 5}, r"n_embd \(64\) must be divisible by n_head \(5\)"),
        ({"activation_function": "swiglu"}, "activation_function 'swiglu' is not supported"),
        ({"n_layer": -1}, "n_layer must be a positive integer"),
        ({"model_type": "bert"}, "runs GPT-2 models only"),
        ({"vocab_size": 10**12}, "far beyond any GPT-2"),
    ],
)
def test_bad_configs_are_clear_errors(change, message, small_hf, tmp_path):
    directory = write_checkpoint(small_hf, tmp_path / "bad", "hub")
    config = {**json.loads((directory / "config.json").read_text()), **change}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        convert(directory, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_absurd_config_is_refused_before_anything_is_read(small_dir, tmp_path, monkeypatch):
    import importlib

    converter = importlib.import_module("mlx_gpt2.convert.convert")  # the module, not the function of its name

    directory = tmp_path / "absurd"
    directory.mkdir()
    for f in small_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))

    def read_tensors(_):
        raise AssertionError("the tensors were read before the config was refused")

    monkeypatch.setattr(converter, "read_tensors", read_tensors)
    with pytest.raises(UserError, match="describes a model of 6.4e\\+13 parameters, far beyond any GPT-2"):
        load(directory)


def test_config_json_that_is_not_json(small_hf, tmp_path):
    directory = write_checkpoint(small_hf, tmp_path / "bad", "hub")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load(directory)


def test_untied_head_is_kept(tmp_path, ids):
    hf = make_hf_model({"tie_word_embeddings": False}, seed=2)
    out = convert(write_checkpoint(hf, tmp_path / "src", "save_pretrained"), tmp_path / "out")
    tensors = mx.load(str(out / "model.safetensors"))
    assert "model.lm_head.weight" in tensors
    model, _ = load(out)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(hf, ids)).max() <= 1e-4


def test_loading_a_converted_directory_is_lazy(small_converted):
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    load(small_converted)
    assert mx.get_active_memory() - before < 1e6  # 3.3M float32 parameters would be 13 MB


def test_mlx_lm_directories_load_with_the_same_logits(small_dir, tmp_path, ids):
    """A directory written by mlx-lm's converter (tokenizer only in tokenizer.json) loads as mlx-lm loads it."""
    import mlx_lm  # the reference for its own format (a test dependency)
    out = tmp_path / "mlx-lm"
    mlx_lm.convert(str(small_dir), mlx_path=str(out))
    assert not (out / "vocab.json").exists() and (out / "tokenizer.json").exists()
    ours, tokenizer = load(out)
    theirs, their_tokenizer = mlx_lm.load(str(out))
    diff = float(np.abs(np.array(ours(mx.array(ids))) - np.array(theirs(mx.array(ids)))).max())
    print(f"OK, maxdiff = {diff:.3g}")
    assert diff <= 1e-4
    text = "Hello world, it's 2026 😀"
    assert tokenizer.encode(text) == their_tokenizer.encode(text)


def test_our_directories_load_in_mlx_lm(small_converted, small_loaded, ids):
    import mlx_lm  # the reference for its own format (a test dependency)
    theirs, _ = mlx_lm.load(str(small_converted))
    ours, _ = small_loaded
    assert float(np.abs(np.array(ours(mx.array(ids))) - np.array(theirs(mx.array(ids)))).max()) <= 1e-4
