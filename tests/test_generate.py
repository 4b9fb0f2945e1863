"""Generation: exact token ids against transformers, sampling options, stop strings, the window."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gpt2 import SamplingOptions, generate, generate_step, make_sampler, stream_generate
from mlx_gpt2.generation.sampling import apply_min_p, apply_top_k, apply_top_p

PROMPT = "The animal didn't cross the street because it was"


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=50256,
        )
    return out[0, len(ids):].tolist()


def test_greedy_ids_equal_transformers(small_hf, small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    ours = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=40, ignore_eos=True)]
    reference = hf_greedy(small_hf, ids, 40)
    assert ours == reference, (ours, reference)
    assert len(set(ours)) > 5  # not a degenerate repeat of one token


def test_greedy_text_is_the_decoded_ids(small_loaded):
    model, tokenizer = small_loaded
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=30, ignore_eos=True))
    assert "".join(r.text for r in responses) == tokenizer.decode([r.token for r in responses])
    assert generate(model, tokenizer, PROMPT, max_tokens=30, ignore_eos=True) == "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "length" and all(r.finish_reason is None for r in responses[:-1])
    last = responses[-1]
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT)) and last.generation_tokens == 30
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def test_logprob_is_the_chosen_tokens_log_probability(small_hf, small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    first = next(stream_generate(model, tokenizer, ids, max_tokens=1))
    with torch.no_grad():
        ref = torch.log_softmax(small_hf(torch.tensor([ids])).logits[0, -1], -1)[first.token].item()
    assert abs(first.logprob - ref) < 1e-4


def test_same_seed_same_text_and_different_seed_differs(small_loaded):
    model, tokenizer = small_loaded
    run = lambda seed: generate(model, tokenizer, PROMPT, max_tokens=25, sampling=SamplingOptions(temp=1.0, seed=seed), ignore_eos=True)
    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_stop_at_eos(small_loaded):
    model, tokenizer = small_loaded
    eos = tokenizer.eos_token_id
    # A logit bias makes <|endoftext|> certain, so the stop is forced, not hoped for.
    certain = SamplingOptions(logit_bias={eos: 1e4})
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=10, sampling=certain))
    assert len(responses) == 1 and responses[0].finish_reason == "stop" and responses[0].text == ""
    ignored = list(stream_generate(model, tokenizer, PROMPT, max_tokens=5, sampling=certain, ignore_eos=True))
    assert [r.token for r in ignored] == [eos] * 5


def test_stop_strings_are_never_printed_even_across_tokens(small_loaded):
    model, tokenizer = small_loaded
    full = generate(model, tokenizer, PROMPT, max_tokens=40, ignore_eos=True)
    # A stop string that spans a token boundary in the greedy output.
    ids = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=40, ignore_eos=True)]
    boundary = len(tokenizer.decode(ids[:10]))
    stop = full[boundary - 2 : boundary + 3]
    assert len(stop) == 5
    text = generate(model, tokenizer, PROMPT, max_tokens=40, stop=[stop], ignore_eos=True)
    assert text == full[: full.index(stop)] and stop not in text
    pieces = [r.text for r in stream_generate(model, tokenizer, PROMPT, max_tokens=40, stop=stop, ignore_eos=True)]
    assert all(stop[:2] not in p or p.endswith(stop[:1]) is False for p in pieces[-1:])
    assert "".join(pieces) == text


def test_empty_prompt_starts_from_endoftext(small_hf, small_loaded):
    model, tokenizer = small_loaded
    ours = [r.token for r in stream_generate(model, tokenizer, "", max_tokens=12, ignore_eos=True)]
    assert ours == hf_greedy(small_hf, [tokenizer.eos_token_id], 12)


def test_sliding_window_continues_past_the_window(small_loaded):
    model, tokenizer = small_loaded
    window = model.config.n_positions  # 128 in the small model
    prompt = tokenizer.encode(PROMPT)
    out = [t for t, _ in generate_step(prompt, model, max_tokens=2 * window)]
    assert len(out) == 2 * window
    # Right after a rebuild, the next token is what a fresh forward over the kept tokens predicts.
    history = prompt + out
    keep = 3 * window // 4
    first_rebuild = window - len(prompt) + 1  # the index of the first token generated from a rebuilt cache
    recent = history[len(prompt) + first_rebuild - keep : len(prompt) + first_rebuild]
    expected = int(mx.argmax(model(mx.array([recent]))[0, -1]).item())
    assert out[first_rebuild] == expected


def test_window_stop_and_error(small_loaded):
    from mlx_gpt2 import UserError

    model, tokenizer = small_loaded
    window = model.config.n_positions
    prompt = tokenizer.encode(PROMPT)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=500, ignore_eos=True, on_overflow="stop"))
    assert responses[-1].finish_reason == "window"
    assert len(prompt) + sum(r.token >= 0 for r in responses) == window + 1
    with pytest.raises(UserError, match="reached the model's window"):
        list(stream_generate(model, tokenizer, prompt, max_tokens=500, ignore_eos=True, on_overflow="error"))
    with pytest.raises(UserError, match="longer than the model's window"):
        list(stream_generate(model, tokenizer, [1] * (window + 1), max_tokens=1, on_overflow="error"))
    with pytest.raises(ValueError, match="on_overflow must be one of slide, stop, error"):
        list(stream_generate(model, tokenizer, prompt, max_tokens=1, on_overflow="wrap"))


def test_chunked_prefill_equals_one_shot(small_loaded):
    model, tokenizer = small_loaded
    prompt = tokenizer.encode(PROMPT * 4)
    a = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=7)]
    b = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=512)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temp": -1}, r"temp must be >= 0"),
        ({"top_k": -2}, r"top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
        ({"logit_bias": {60000: 1.0}}, r"logit_bias token ids must be integers in \[0, 50257\)"),
        ({"max_tokens": -1}, r"max_tokens must be an integer >= 0"),
    ],
)
def test_out_of_range_options_name_their_range(kwargs, message, small_loaded):
    model, tokenizer = small_loaded
    max_tokens = kwargs.pop("max_tokens", 3)
    with pytest.raises(ValueError, match=message):  # options are checked where they enter, or where the vocabulary is known
        generate(model, tokenizer, PROMPT, max_tokens=max_tokens, sampling=SamplingOptions(**kwargs))


def _logprobs(values):
    x = mx.array([values], dtype=mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def test_filters_keep_exactly_the_right_tokens():
    lp = _logprobs([np.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    kept = lambda out: [i for i, v in enumerate(np.array(out)[0]) if np.isfinite(v)]
    assert kept(apply_top_k(lp, 2)) == [0, 1]
    assert kept(apply_top_p(lp, 0.8)) == [0, 1]
    assert kept(apply_top_p(lp, 0.81)) == [0, 1, 2]
    assert kept(apply_min_p(lp, 0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5
    assert kept(apply_min_p(lp, 0.31)) == [0, 1]


def test_sampling_follows_the_distribution():
    mx.random.seed(0)
    lp = mx.broadcast_to(_logprobs([np.log(p) for p in (0.6, 0.3, 0.1)]), (4000, 3))
    counts = np.bincount(np.array(make_sampler(SamplingOptions(temp=1.0))(lp)), minlength=3) / 4000
    assert np.allclose(counts, [0.6, 0.3, 0.1], atol=0.03)
    top1 = np.array(make_sampler(SamplingOptions(temp=1.0, top_k=1))(lp))
    assert (top1 == 0).all()


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from mlx_gpt2.generation.sampling import make_repetition_penalty

    logits = np.random.default_rng(0).normal(size=(1, 50)).astype(np.float32)
    seen = np.array([3, 7, 7, 12])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen[None]), torch.tensor(logits)).numpy()
    ours = np.array(make_repetition_penalty(1.3)(mx.array(seen), mx.array(logits)))
    assert np.abs(ours - ref).max() < 1e-6


def _warped_probs(logits: np.ndarray, temp: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """transformers' warpers in generate()'s order (temperature, top-k, top-p, min-p), as probabilities."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    scores = torch.tensor(logits[None])
    warpers = [TemperatureLogitsWarper(temp)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    for warp in warpers:
        scores = warp(None, scores)
    return torch.softmax(scores, dim=-1)[0].double().numpy()


CHAINS = [  # each chain's filters interact: top-p after top-k, min-p after top-p, ...
    dict(temp=0.7, top_k=3, top_p=0.7, min_p=0.0),
    dict(temp=1.3, top_k=0, top_p=0.9, min_p=0.05),
    dict(temp=1.0, top_k=12, top_p=1.0, min_p=0.2),
    dict(temp=0.8, top_k=20, top_p=0.6, min_p=0.1),
    dict(temp=2.0, top_k=8, top_p=0.95, min_p=0.0),
]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampling_chains_draw_from_transformers_warped_distribution(chain):
    """200,000 draws: tokens the warpers drop are never drawn, the rest follow their probabilities (chi-square)."""
    logits = (np.random.default_rng(1).normal(size=64) * 1.5).astype(np.float32)
    expected = _warped_probs(logits, **chain)
    mx.random.seed(0)
    n = 200_000
    lp = mx.broadcast_to(_logprobs(logits.tolist()), (n, logits.size))
    counts = np.bincount(np.array(make_sampler(SamplingOptions(**chain))(lp)), minlength=logits.size)
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"drew tokens transformers drops: {np.nonzero(counts * ~kept)[0].tolist()}"
    chi2 = (((counts - n * expected) ** 2)[kept] / (n * expected[kept])).sum()
    dof = kept.sum() - 1
    print(f"{chain}: {kept.sum()} tokens kept, chi-square {chi2:.1f} for {dof} degrees of freedom")
    assert chi2 < dof + 8 * np.sqrt(2 * dof) + 10  # far beyond this is a wrong distribution, not chance
