"""Batched generation: left padding, mask and positions against transformers; each row as if generated alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gpt2 import SamplingOptions, UserError, batch_generate, batch_generate_response, generate, stream_generate
from mlx_gpt2.generation.batch import Batch

PROMPTS = [
    "Hello",
    "The animal didn't cross the street because it was too tired",
    "One two three four",
    "A",
    "In a shocking finding, scientists discovered a herd of unicorns living in",
]


def single(model, tokenizer, prompt, **options) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, **options)]


def test_left_padded_logits_equal_transformers_with_attention_mask(small_hf, small_loaded):
    model, tokenizer = small_loaded
    ids = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, ids))
    batch = Batch(model, ids, pad_id=tokenizer.eos_token_id)
    ours = np.array(batch.prefill(step_size=7))  # several chunks, so the mask over a filled cache is exercised too
    padded = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    with torch.no_grad():
        ref = small_hf(padded, attention_mask=attention, position_ids=positions).logits[:, -1].numpy()
    diff = np.abs(ours - ref).max()
    assert diff < 1e-3, f"max difference {diff}"
    # One decode step with the bottom-right aligned padding mask.
    step = np.array(batch.forward(mx.array([[11]] * len(ids))))
    with torch.no_grad():
        full = torch.cat([padded, torch.full((len(ids), 1), 11)], 1)
        mask = torch.cat([attention, torch.ones(len(ids), 1, dtype=torch.long)], 1)
        ref = small_hf(full, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    diff = np.abs(step - ref.numpy()).max()
    assert diff < 1e-3, f"max difference {diff}"


def test_batched_greedy_equals_each_prompt_alone(small_loaded):
    model, tokenizer = small_loaded
    response = batch_generate_response(model, tokenizer, PROMPTS, max_tokens=24, ignore_eos=True)
    for prompt, tokens, text in zip(PROMPTS, response.tokens, response.texts):
        assert tokens == single(model, tokenizer, prompt, max_tokens=24, ignore_eos=True), prompt
        assert text == generate(model, tokenizer, prompt, max_tokens=24, ignore_eos=True)
    assert response.finish_reasons == ["length"] * len(PROMPTS)
    assert response.generation_tokens == 24 * len(PROMPTS) and response.generation_tps > 0
    assert response.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert batch_generate(model, tokenizer, PROMPTS, max_tokens=24, ignore_eos=True) == response.texts


def test_each_row_stops_on_its_own_at_end_of_text(small_loaded):
    model, tokenizer = small_loaded
    # This bias makes <|endoftext|> win after a different number of tokens in each row (1 to 25 of 30).
    options = dict(max_tokens=30, sampling=SamplingOptions(logit_bias={tokenizer.eos_token_id: 7.0}))
    alone = [single(model, tokenizer, p, **options) for p in PROMPTS]
    assert len({len(t) for t in alone}) >= 4, [len(t) for t in alone]
    response = batch_generate_response(model, tokenizer, PROMPTS, **options)
    assert response.tokens == alone
    expected = ["stop" if t[-1] == tokenizer.eos_token_id else "length" for t in alone]
    assert response.finish_reasons == expected and "stop" in expected


def test_each_row_stops_on_its_own_at_a_stop_string(small_loaded):
    model, tokenizer = small_loaded
    full = generate(model, tokenizer, PROMPTS[1], max_tokens=20, ignore_eos=True)
    stop = full[8:12]  # occurs in row 1's text; the other rows run to max_tokens unless it occurs there too
    texts = batch_generate(model, tokenizer, PROMPTS, max_tokens=20, ignore_eos=True, stop=[stop])
    for prompt, text in zip(PROMPTS, texts):
        assert text == generate(model, tokenizer, prompt, max_tokens=20, ignore_eos=True, stop=[stop])
    assert texts[1] == full[: full.index(stop)]


def test_penalty_and_bias_apply_per_row(small_loaded):
    model, tokenizer = small_loaded
    options = dict(max_tokens=12, ignore_eos=True, sampling=SamplingOptions(repetition_penalty=1.5, logit_bias={11: 3.0}))
    response = batch_generate_response(model, tokenizer, PROMPTS[:3], **options)
    assert response.tokens == [single(model, tokenizer, p, **options) for p in PROMPTS[:3]]


def test_sampling_is_reproducible_with_a_seed(small_loaded):
    model, tokenizer = small_loaded
    run = lambda seed: batch_generate(model, tokenizer, PROMPTS[:3], max_tokens=10, ignore_eos=True,
                                      sampling=SamplingOptions(temp=1.0, seed=seed))  # fmt: skip
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bad_input_is_refused(small_loaded):
    model, tokenizer = small_loaded
    with pytest.raises(ValueError, match="at least one prompt"):
        batch_generate(model, tokenizer, [], max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0"):
        batch_generate(model, tokenizer, PROMPTS, max_tokens=-1)
    with pytest.raises(ValueError, match="logit_bias token ids must be integers in"):
        batch_generate(model, tokenizer, PROMPTS, sampling=SamplingOptions(logit_bias={50257: 1.0}))
    with pytest.raises(UserError, match="longer than the model's window of 128"):
        batch_generate(model, tokenizer, ["word " * 200], max_tokens=5)


def test_the_window_ends_rows_with_reason_window(small_loaded):
    model, tokenizer = small_loaded
    response = batch_generate_response(model, tokenizer, ["Hi", "word " * 100], max_tokens=60, ignore_eos=True)
    # The long row reaches position 127 first; the batch ends there, as on_overflow="stop" would.
    assert response.finish_reasons == ["window", "window"]
    fed = 128 - len(tokenizer.encode("word " * 100))  # positions left for generated tokens; the last is not fed
    alone = single(model, tokenizer, "word " * 100, max_tokens=60, ignore_eos=True, on_overflow="stop")
    assert len(response.tokens[1]) == fed + 1 and response.tokens[1] == alone[:-1] and alone[-1] == -1
