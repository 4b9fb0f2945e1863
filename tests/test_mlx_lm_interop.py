"""Quantized directories cross between mlx-lm and mlx-gpt2 with identical logits, both ways.

mlx-lm is the reference for its own format (a test dependency). Its converter reads the Hub's GPT-2
layout (it needs n_ctx in config.json, which transformers 5's save_pretrained leaves out).
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from checkpoints import make_checkpoint
from mlx_gpt2.backend.cpu_quantized import QUANTIZED
from mlx_gpt2 import load
from mlx_gpt2.convert import convert

import mlx_lm  # noqa: E402  (a test dependency: never skipped)


def _max_diff(ours, theirs, ids) -> float:
    return float(np.abs(np.array(ours(mx.array(ids))) - np.array(theirs(mx.array(ids)))).max())


def _mlx_c_proj_at_8_bits(path: str, module: nn.Module):
    """A per-layer recipe of the kind mlx-lm records layer by layer in config.json."""
    return {"group_size": 32, "bits": 8, "mode": "affine"} if path.endswith("mlp.c_proj") else True


@pytest.mark.parametrize(
    "options",
    [dict(), dict(q_bits=8, q_group_size=32), dict(q_bits=3, quant_predicate=_mlx_c_proj_at_8_bits)],
    ids=["default-4bit", "8bit-g32", "per-layer"],
)
def test_mlx_lm_quantized_directory_gives_mlx_lm_logits(options, trained_small_dir, tmp_path, ids):
    from mlx_lm.convert import convert as mlx_lm_convert

    out = tmp_path / "mlx-lm"
    mlx_lm_convert(str(trained_small_dir), mlx_path=str(out), quantize=True, dtype="float32", **options)
    ours, tokenizer = load(out)
    theirs, their_tokenizer = mlx_lm.load(str(out))
    assert isinstance(ours.wpe, QUANTIZED)  # mlx-lm quantizes the position table too
    diff = _max_diff(ours, theirs, ids)
    print(f"OK, maxdiff = {diff:.3g}")
    assert diff <= 1e-5
    assert tokenizer.encode("for x in range(10):") == their_tokenizer.encode("for x in range(10):")


@pytest.mark.parametrize(
    "options",
    [dict(), dict(bits=6, group_size=32), dict(recipe="mixed", keep_embeddings=True)],
    ids=["default-4bit", "6bit-g32", "mixed-keep-embeddings"],
)
def test_ours_load_in_mlx_lm(options, trained_small_dir, tmp_path, ids):
    out = convert(trained_small_dir, tmp_path / "ours", dtype="float32", quantize=options)
    ours, _ = load(out)
    theirs, _ = mlx_lm.load(str(out))
    diff = _max_diff(ours, theirs, ids)
    print(f"OK, maxdiff = {diff:.3g}")
    # Scales are stored in float16. mlx-lm dequantizes the token embedding in that dtype (rounding it to
    # float16), we in float32; everything else is the same arithmetic.
    assert diff <= 2e-3


def test_group_size_fallback_loads_in_mlx_lm(tmp_path, ids):
    source = make_checkpoint(tmp_path / "src", config_kwargs={"n_embd": 96, "n_head": 4})
    with pytest.warns(UserWarning):
        out = convert(source, tmp_path / "ours", quantize=dict(group_size=128))
    theirs, _ = mlx_lm.load(str(out))
    assert theirs.model.h[0].attn.c_attn.group_size == 32
    assert _max_diff(load(out)[0], theirs, ids) <= 2e-3  # float16 embedding rounding, as above


def test_mlx_lm_cannot_read_an_untied_head(tmp_path):
    """As the README says: mlx-lm's GPT-2 always ties the head, so an untied checkpoint is refused there."""
    source = make_checkpoint(tmp_path / "src", config_kwargs={"tie_word_embeddings": False})
    out = convert(source, tmp_path / "ours", quantize=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="lm_head"):
        mlx_lm.load(str(out))
