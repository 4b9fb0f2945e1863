"""Prompt caching: a saved prefix cache continues exactly as recomputing from scratch; wrong caches are refused."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from checkpoints import make_checkpoint
from mlx_gpt2 import (
    UserError, generate, load, load_prompt_cache, make_prompt_cache, save_prompt_cache, stream_generate,
)
from mlx_gpt2.cli import app
from mlx_gpt2.generation.speculative import Draft
from mlx_gpt2.generation.prompt_cache import cache_prompt, check_prefix, prepare_cached_prompt

PREFIX = "The animal didn't cross the street because it was too tired. It had walked all day in the rain."
REST = " When night came, the animal"

runner = CliRunner()


def tokens_of(model, tokenizer, prompt, **options) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24, ignore_eos=True, **options)]


def test_round_trip_equals_recomputation(small_loaded, tmp_path):
    model, tokenizer = small_loaded
    path = tmp_path / "prefix.safetensors"
    assert cache_prompt(model, tokenizer, PREFIX, path) == len(tokenizer.encode(PREFIX))
    cache, ids = prepare_cached_prompt(path, model, tokenizer, REST)
    assert ids == tokenizer.encode(PREFIX + REST) and cache[0].offset == len(tokenizer.encode(PREFIX))
    assert tokens_of(model, tokenizer, ids, cache=cache) == tokens_of(model, tokenizer, PREFIX + REST)
    # The cached prefix alone is a whole prompt too: its last token is recomputed for its logits.
    cache, ids = prepare_cached_prompt(path, model, tokenizer, "")
    assert tokens_of(model, tokenizer, ids, cache=cache) == tokens_of(model, tokenizer, PREFIX)


def test_saved_keys_and_values_are_the_computed_ones(small_loaded, tmp_path):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PREFIX)
    fresh = make_prompt_cache(model, ids, prefill_step_size=5)
    save_prompt_cache(tmp_path / "c.safetensors", fresh, ids, model)
    loaded, tokens = load_prompt_cache(tmp_path / "c.safetensors", model)
    assert tokens == ids and len(loaded) == len(fresh)
    for a, b in zip(loaded, fresh):
        assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))
        assert np.array_equal(np.array(a.state[1]), np.array(b.state[1]))
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_a_cache_works_with_a_draft_model(small_loaded, tmp_path):
    model, tokenizer = small_loaded
    cache_prompt(model, tokenizer, PREFIX, tmp_path / "c.safetensors")
    cache, ids = prepare_cached_prompt(tmp_path / "c.safetensors", model, tokenizer, REST)
    assert tokens_of(model, tokenizer, ids, cache=cache, draft=Draft(model)) == tokens_of(model, tokenizer, ids)


def test_a_cache_from_another_model_is_refused(small_loaded, tmp_path):
    model, tokenizer = small_loaded
    other, _ = load(make_checkpoint(tmp_path / "other", config_kwargs={"initializer_range": 0.2}, seed=1))
    cache_prompt(other, tokenizer, PREFIX, tmp_path / "other.safetensors")  # same config, other weights
    with pytest.raises(UserError, match="was made by another model"):
        load_prompt_cache(tmp_path / "other.safetensors", model)


def test_bad_files_and_prefixes_are_refused(small_loaded, tmp_path):
    model, tokenizer = small_loaded
    with pytest.raises(UserError, match="not found"):
        load_prompt_cache(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(UserError, match="is not an mlx-gpt2 prompt cache"):
        load_prompt_cache(tmp_path / "junk.safetensors", model)
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"x": mx.zeros(2)})
    with pytest.raises(UserError, match="is not an mlx-gpt2 prompt cache"):
        load_prompt_cache(tmp_path / "plain.safetensors", model)
    cached = tokenizer.encode(PREFIX)
    with pytest.raises(UserError, match="does not start with the cached prefix"):
        check_prefix(cached, tokenizer.encode("Something else entirely. " + PREFIX))
    with pytest.raises(UserError, match="end the cached text before a space"):
        check_prefix(tokenizer.encode("It was"), tokenizer.encode("It wasn't"))
    with pytest.raises(UserError, match="prompt to cache is empty"):
        make_prompt_cache(model, [])


def test_cli_cache_prompt_then_generate_equals_the_whole_prompt(small_converted, small_loaded, tmp_path):
    model, tokenizer = small_loaded
    path = tmp_path / "prefix.safetensors"
    result = runner.invoke(app, ["cache-prompt", "-m", str(small_converted), "-p", PREFIX, "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {path} ({len(tokenizer.encode(PREFIX))} tokens)\n"
    args = ["generate", "-m", str(small_converted), "-n", "20", "--ignore-eos"]
    result = runner.invoke(app, args + ["--prompt-cache", str(path), "-p", REST])
    assert result.exit_code == 0, result.output
    assert result.stdout == generate(model, tokenizer, PREFIX + REST, max_tokens=20, ignore_eos=True) + "\n"
    other = make_checkpoint(tmp_path / "other", config_kwargs={"initializer_range": 0.2, "n_layer": 1}, seed=3)
    result = runner.invoke(app, ["generate", "-m", str(other), "--prompt-cache", str(path), "-p", REST])
    assert result.exit_code == 1 and result.stderr.startswith("error: prompt cache ")
    assert "was made by another model" in result.stderr and result.stderr.count("\n") == 1
