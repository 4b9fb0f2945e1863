"""Shared fixtures: real Hub-format GPT-2 checkpoints built with transformers, and their MLX conversions."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from checkpoints import TOKENIZER_DIR, copy_tokenizer, make_hf_model, write_checkpoint

# A wider init than GPT-2's 0.02 makes the next-token distribution peaked, so greedy choices are not
# near-ties that float rounding could flip; the numerics under test are the same.
PEAKED = {"initializer_range": 0.2}


@pytest.fixture(scope="session", autouse=True)
def _own_cache_and_the_bundled_blas(tmp_path_factory) -> None:
    """Commands run by the tests keep MLX's bundled BLAS, so a subprocess computes exactly what the test
    process does (tests/test_blas.py turns OpenBLAS on where it tests it), and never touch ~/.cache."""
    os.environ["MLX_GPT2_OPENBLAS"] = "0"
    os.environ["MLX_GPT2_CACHE_DIR"] = str(tmp_path_factory.mktemp("mlx-gpt2-cache"))


@pytest.fixture(scope="session", autouse=True)
def _tokenizer_files_exist() -> None:
    assert (TOKENIZER_DIR / "vocab.json").is_file(), f"GPT-2 tokenizer files missing at {TOKENIZER_DIR}"


@pytest.fixture(scope="session", autouse=True)
def _the_fixtures_are_real_checkpoints(tmp_path_factory) -> None:
    """Not a test of ours: the checkpoint writers' own check, that transformers reads every layout they
    write back to the same logits (so the tests that read them test real checkpoints)."""
    from transformers import GPT2LMHeadModel

    from checkpoints import LAYOUTS, UNTIED

    model = make_hf_model({"vocab_size": 1000, **UNTIED}, seed=1)
    ids = torch.arange(20).view(1, 20)
    for layout in LAYOUTS:
        directory = write_checkpoint(model, tmp_path_factory.mktemp(f"fixture-{layout}"), layout, tokenizer=False)
        loaded = GPT2LMHeadModel.from_pretrained(directory).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits), f"the {layout} writer is broken"


@pytest.fixture(scope="session")
def small_hf():
    """A small GPT-2 (2 layers, 64 wide, real 50257 vocabulary) in transformers."""
    return make_hf_model(PEAKED, seed=0)


@pytest.fixture(scope="session")
def small_dir(small_hf, tmp_path_factory):
    """small_hf written in the real Hub layout (bare keys, attn.bias buffers, n_ctx)."""
    return write_checkpoint(small_hf, tmp_path_factory.mktemp("small-hub"), "hub")


@pytest.fixture(scope="session")
def small_converted(small_dir, tmp_path_factory):
    from mlx_gpt2.convert import convert

    return convert(small_dir, tmp_path_factory.mktemp("conv") / "small-mlx")


@pytest.fixture(scope="session")
def small_loaded(small_converted):
    from mlx_gpt2 import load

    return load(small_converted)


@pytest.fixture(scope="session")
def trained_small_dir(tmp_path_factory):
    """A GPT-2 that has learned English (2 layers, 128 wide, trained on Python's docs; tests/data/README.md),
    in the Hub's layout (float16 safetensors, n_ctx), with the real tokenizer files beside it."""
    import shutil
    from pathlib import Path

    out = tmp_path_factory.mktemp("trained-small")
    for path in (Path(__file__).parent / "data" / "trained-small").iterdir():
        shutil.copyfile(path, out / path.name)
    copy_tokenizer(out)
    return out


@pytest.fixture
def cli_model(monkeypatch, small_converted, small_loaded) -> str:
    """small_converted's path, which the CLI's load() then serves from memory.

    Each real load spends ~0.5 s building the tokenizer; test_text_from_stdin goes through the real one.
    """
    import mlx_gpt2

    real_load = mlx_gpt2.load

    def load(path, **kwargs):
        return small_loaded if path == str(small_converted) else real_load(path, **kwargs)

    monkeypatch.setattr(mlx_gpt2, "load", load)  # the CLI imports it from the package at call time
    return str(small_converted)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, (2, 33))
