"""Beam search against transformers' `generate(num_beams=..., do_sample=False)`, token for token."""

from __future__ import annotations

import copy

import pytest
import torch

from checkpoints import write_checkpoint
from mlx_gpt2 import UserError, beam_generate, beam_search, load
from mlx_gpt2.cli import app

PROMPTS = [
    "The animal didn't cross the street because it was",
    "Hello there",
    "In a shocking finding, scientists discovered a herd of unicorns",
]
EOS = 50256


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """transformers' beam search is 30x slower with two threads on two busy cores (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eos_models(small_hf, tmp_path_factory):
    """small_hf with <|endoftext|>'s embedding (tied to the head) pointed along the mean hidden state, so
    beams end after 1 to 15 tokens depending on the prompt and the settings; (transformers, ours)."""
    hf = copy.deepcopy(small_hf)
    with torch.no_grad():
        ids = torch.tensor([[464, 5044, 1422, 470, 3272, 262, 4675, 780, 340, 373]])  # PROMPTS[0]
        mean = hf.transformer(ids).last_hidden_state[0].mean(0)
        hf.transformer.wte.weight[EOS] = 7.0 * mean / mean.norm() ** 2  # an end-of-text logit near 7
    from mlx_gpt2.convert import convert

    directory = write_checkpoint(hf, tmp_path_factory.mktemp("eos-hub"), "hub")
    return hf, load(convert(directory, tmp_path_factory.mktemp("eos") / "mlx"))


def hf_beams(hf, ids: list[int], **settings) -> tuple[list[int], float]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            pad_token_id=EOS, return_dict_in_generate=True, output_scores=True, **settings,
        )
    return out.sequences[0, len(ids):].tolist(), out.sequences_scores[0].item()


SETTINGS = [
    dict(num_beams=4, max_new_tokens=12),
    dict(num_beams=4, max_new_tokens=12, early_stopping=True),
    dict(num_beams=3, max_new_tokens=15, length_penalty=2.0),
    dict(num_beams=5, max_new_tokens=15, length_penalty=-1.0, early_stopping="never"),
    dict(num_beams=2, max_new_tokens=10, length_penalty=0.0),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_equals_transformers_with_end_of_text(eos_models, settings):
    hf, (model, tokenizer) = eos_models
    ours = beam_search(
        model, tokenizer, PROMPTS, num_beams=settings["num_beams"], max_tokens=settings["max_new_tokens"],
        length_penalty=settings.get("length_penalty", 1.0), early_stopping=settings.get("early_stopping", False),
    )  # the three prompts in one batch, left-padded; transformers runs each alone
    for prompt, result in zip(PROMPTS, ours):
        tokens, score = hf_beams(hf, tokenizer.encode(prompt), **settings)
        assert result.tokens == tokens, (prompt, result.tokens, tokens)
        assert abs(result.score - score) < 1e-3 * max(1.0, abs(score)), (result.score, score)
        assert result.finish_reason == ("stop" if tokens[-1] == EOS else "length")
        assert result.text == tokenizer.decode([t for t in tokens if t != EOS])


def test_the_settings_reach_both_ends_and_early_stopping_matters(eos_models):
    hf, (model, tokenizer) = eos_models
    ids = tokenizer.encode(PROMPTS[2])
    free = hf_beams(hf, ids, num_beams=4, max_new_tokens=12)[0]
    early = hf_beams(hf, ids, num_beams=4, max_new_tokens=12, early_stopping=True)[0]
    # Without early stopping the search outlives a late end of text and finds a better unfinished beam.
    assert free[-1] != EOS and early[-1] == EOS and len(early) > 5


def test_beam_search_without_end_of_text_equals_transformers(small_hf, small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(PROMPTS[0])
    result = beam_search(model, tokenizer, [ids], num_beams=3, max_tokens=14)[0]
    assert result.tokens == hf_beams(small_hf, ids, num_beams=3, max_new_tokens=14)[0]
    assert result.finish_reason == "length" and len(result.tokens) == 14
    assert beam_generate(model, tokenizer, ids, num_beams=3, max_tokens=14) == result.text
    ignored = beam_search(model, tokenizer, [ids], num_beams=3, max_tokens=14, ignore_eos=True)[0]
    assert ignored.tokens == result.tokens


def test_bad_options_are_refused(small_loaded):
    model, tokenizer = small_loaded
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1"):
        beam_search(model, tokenizer, ["Hi"], num_beams=0)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        beam_search(model, tokenizer, ["Hi"], early_stopping="sometimes")
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        beam_search(model, tokenizer, ["Hi"], max_tokens=0)
    with pytest.raises(ValueError, match="length_penalty must be a finite number"):
        beam_search(model, tokenizer, ["Hi"], length_penalty=float("nan"))
    with pytest.raises(UserError, match="window of 128"):
        beam_search(model, tokenizer, ["word " * 100], max_tokens=40)


def test_cli_num_beams_prints_the_best_beam_and_refuses_sampling(small_converted, small_loaded):
    from typer.testing import CliRunner

    model, tokenizer = small_loaded
    runner = CliRunner()
    args = ["generate", "-m", str(small_converted), "-p", "Hello there", "-n", "8", "--num-beams", "3"]
    result = runner.invoke(app, args + ["--length-penalty", "0.5", "--early-stopping"])
    assert result.exit_code == 0, result.output
    expected = beam_generate(model, tokenizer, "Hello there", num_beams=3, max_tokens=8, length_penalty=0.5,
                             early_stopping=True)
    assert result.stdout == expected + "\n"
    result = runner.invoke(app, args + ["--temp", "0.7"])
    assert result.exit_code == 1
    assert result.stderr == "error: --num-beams is greedy beam search and does not combine with --temp\n"
    result = runner.invoke(app, args[:-2] + ["--early-stopping"])
    assert result.exit_code == 1 and "add --num-beams" in result.stderr
