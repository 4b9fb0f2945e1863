"""Speculative decoding: greedy output identical to plain generation, the sampling rule's distribution, errors."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt2 import GPT2, SamplingOptions, UserError, generate, generate_step, speculative_generate_step, stream_generate
from mlx_gpt2.generation.speculative import Draft, _Distribution, _Speculator

PROMPT = "The animal didn't cross the street because it was"


@pytest.fixture(scope="module")
def shallow_draft(small_loaded):
    """The target without its last block: it agrees with the target often, but not always."""
    model, _ = small_loaded
    draft = GPT2(dataclasses.replace(model.config, n_layer=model.config.n_layer - 1))
    last = f"h.{model.config.n_layer - 1}."
    draft.load_weights([(k, v) for k, v in tree_flatten(model.parameters()) if not k.startswith(last)])
    return draft


@pytest.fixture(scope="module")
def unrelated_draft(small_loaded):
    """A random one-block model: the target rejects nearly everything it proposes."""
    model, _ = small_loaded
    mx.random.seed(5)
    draft = GPT2(dataclasses.replace(model.config, n_layer=1))
    mx.eval(draft.parameters())
    return draft


def plain(model, ids, n, **options) -> list[int]:
    return [t for t, _ in generate_step(ids, model, max_tokens=n, **options)]


@pytest.mark.parametrize("num_draft", [1, 4])
def test_greedy_output_equals_plain_generation_with_rejections(small_loaded, shallow_draft, unrelated_draft, num_draft):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    expected = plain(model, ids, 32)
    accepted = {}
    for name, draft in (("shallow", shallow_draft), ("unrelated", unrelated_draft)):
        steps = list(speculative_generate_step(ids, model, Draft(draft, num_draft=num_draft), max_tokens=32))
        assert [t for t, _, _ in steps] == expected, name
        accepted[name] = sum(d for *_, d in steps)
    assert 0 < accepted["shallow"] < 32 - 32 // (num_draft + 1)  # some proposals kept, some rejected


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    steps = list(speculative_generate_step(ids, model, Draft(model, num_draft=4), max_tokens=30))
    assert [t for t, _, _ in steps] == plain(model, ids, 30)
    assert sum(d for *_, d in steps) == 30 - 30 // 5  # each round of 5 tokens: 4 drafted + the target's own


def test_log_probs_are_the_targets(small_loaded, shallow_draft):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    ours = [lp for _, lp, _ in speculative_generate_step(ids, model, Draft(shallow_draft, num_draft=3), max_tokens=12)]
    ref = [lp for _, lp in generate_step(ids, model, max_tokens=12)]
    diff = max(float(mx.abs(a - b).max()) for a, b in zip(ours, ref))
    assert diff < 1e-4, f"max difference {diff}"


def test_stream_generate_with_a_draft_matches_plain_text_stops_and_processors(small_loaded, shallow_draft):
    model, tokenizer = small_loaded
    options = dict(max_tokens=30, sampling=SamplingOptions(repetition_penalty=1.3, logit_bias={11: 2.0}), ignore_eos=True)
    assert generate(model, tokenizer, PROMPT, draft=Draft(shallow_draft, num_draft=3), **options) == generate(
        model, tokenizer, PROMPT, **options
    )
    full = generate(model, tokenizer, PROMPT, max_tokens=30, ignore_eos=True)
    stop = full[10:14]
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=30, stop=stop, ignore_eos=True,
                                     draft=Draft(shallow_draft, num_draft=2)))
    assert "".join(r.text for r in responses) == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"


def test_sliding_and_stopping_at_the_window_match_plain_generation(small_loaded, shallow_draft):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT * 9)  # 99 tokens of a 128-token window: the window slides during generation
    spec = lambda **o: [t for t, _, _ in speculative_generate_step(ids, model, Draft(shallow_draft, num_draft=4), **o)]
    assert spec(max_tokens=45) == plain(model, ids, 45)
    stopped = spec(max_tokens=45, on_overflow="stop")
    assert stopped == plain(model, ids, 45, on_overflow="stop") and len(stopped) == 128 - len(ids) + 1


def test_sampling_rule_draws_from_the_targets_distribution():
    # p and q over a 4-token vocabulary; whatever q proposes, the first token kept must follow p.
    p = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    q = mx.log(mx.array([[0.1, 0.6, 0.1, 0.2]]))
    spec = _Speculator.__new__(_Speculator)
    spec.dist = _Distribution(SamplingOptions(temp=1.0))
    mx.random.seed(0)
    n = 3000
    drafts = mx.random.categorical(q[0], shape=(n,))
    mx.eval(drafts)
    counts = np.bincount([spec.accept(d[None], p, q)[0][0] for d in drafts], minlength=4) / n
    assert np.abs(counts - np.exp(np.array(p[0]))).max() < 0.035, counts


def test_sampling_with_a_seed_is_reproducible_and_an_identical_draft_is_always_kept(small_loaded, shallow_draft):
    model, tokenizer = small_loaded
    run = lambda draft, seed: [
        (r.token, r.from_draft) for r in stream_generate(model, tokenizer, PROMPT, max_tokens=20,
                                                         sampling=SamplingOptions(temp=0.9, seed=seed), ignore_eos=True,
                                                         draft=Draft(draft, num_draft=3))
    ]
    assert run(shallow_draft, 1) == run(shallow_draft, 1) != run(shallow_draft, 2)
    assert sum(d for _, d in run(model, 1)) == 20 - 20 // 4


def test_bad_drafts_and_options_are_refused(small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPT)
    with pytest.raises(ValueError, match="num_draft must be an integer >= 1"):
        Draft(model, num_draft=0)
    other_vocab = GPT2(dataclasses.replace(model.config, vocab_size=1000, n_layer=1))
    with pytest.raises(UserError, match="vocabulary"):
        next(speculative_generate_step(ids, model, Draft(other_vocab)))
    short = GPT2(dataclasses.replace(model.config, n_positions=64, n_layer=1))
    with pytest.raises(UserError, match="window"):
        next(speculative_generate_step(ids, model, Draft(short)))
    with pytest.raises(ValueError, match="temp must be >= 0"):
        SamplingOptions(temp=-1.0)
