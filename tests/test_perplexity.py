"""Strided perplexity: equal to transformers' (the loop of its perplexity guide) on a trained model."""

from __future__ import annotations

import math

import pytest
import torch
from pydoc_data.topics import topics
from typer.testing import CliRunner

from mlx_gpt2 import UserError, load, perplexity
from mlx_gpt2.cli import app
from mlx_gpt2.perplexity import windows

# Held-out text for the trained model: these topics sort into the last 10% of the corpus it never saw.
TEXT = "\n\n".join(topics[name] for name in ("while", "with", "yield"))


def hf_strided_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide, verbatim but for one thing: it counts the scored tokens exactly.

    The guide weights each window's mean loss by `num_valid_tokens - batch_size`, one token short for
    every window after the first; here the count is the targets the shifted loss really averaged over.
    """
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + context, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture(scope="module")
def trained(trained_small_dir):
    return load(trained_small_dir, dtype="float32")


@pytest.mark.parametrize("context, stride", [(128, 64), (100, 37)])
def test_perplexity_equals_transformers(context, stride, trained, trained_small_dir):
    from transformers import GPT2LMHeadModel

    model, tokenizer = trained
    hf = GPT2LMHeadModel.from_pretrained(trained_small_dir, dtype=torch.float32).eval()
    text = tokenizer.decode(tokenizer.encode(TEXT)[:600])  # ~10 windows keep it quick
    ids = tokenizer.encode(text)
    expected, n_tokens = hf_strided_perplexity(hf, ids, context, stride)
    result = perplexity(model, tokenizer, text, context=context, stride=stride, batch_size=4)
    rel = abs(result.perplexity - expected) / expected
    print(f"ours {result.perplexity:.4f}, transformers {expected:.4f}: relative difference {rel:.2g}")
    assert result.tokens == n_tokens == len(ids) - 1
    assert rel < 1e-3
    assert 5 < result.perplexity < 200  # a trained model on real text, not a random one (~50000)


def test_batch_size_does_not_change_the_result(trained):
    model, tokenizer = trained
    one = perplexity(model, tokenizer, TEXT[:800], context=48, stride=24, batch_size=1)
    many = perplexity(model, tokenizer, TEXT[:800], context=48, stride=24, batch_size=3)
    assert one.tokens == many.tokens and abs(one.nll - many.nll) < 1e-5


@pytest.mark.parametrize("n_tokens, context, stride", [(10, 4, 1), (100, 32, 16), (101, 32, 16), (33, 32, 31), (5, 32, 16)])
def test_windows_score_every_token_once(n_tokens, context, stride):
    scored: list[int] = []
    plan = windows(n_tokens, context, stride)
    for w in plan:
        assert w.end - w.begin <= context and w.scored <= w.end - w.begin - 1
        scored += range(w.end - w.scored, w.end)
    assert scored == list(range(1, n_tokens))
    assert all(w.end - w.scored - w.begin == context - stride for w in plan[1:])  # the left context


def test_bad_options_are_clear(trained):
    model, tokenizer = trained
    with pytest.raises(UserError, match="--context must be between 2 and the model's window of 128"):
        perplexity(model, tokenizer, TEXT, context=1024)
    with pytest.raises(UserError, match=r"--stride must be between 1 and context - 1 \(63\)"):
        perplexity(model, tokenizer, TEXT, context=64, stride=64)
    with pytest.raises(UserError, match="at least 2 tokens"):
        perplexity(model, tokenizer, "a")


def test_cli_perplexity(trained_small_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:1500])
    result = CliRunner().invoke(
        app, ["perplexity", "--model", str(trained_small_dir), "--file", str(text), "--context", "128", "--stride", "64",
              "--dtype", "float32", "--batch-size", "2"],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("perplexity: ") and lines[1].startswith("tokens scored: ") and "tokens/s" in lines[2]
    result = CliRunner().invoke(app, ["perplexity", "--model", str(trained_small_dir), "--file", str(tmp_path / "nope.txt")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
