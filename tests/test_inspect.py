"""Looking inside the model: the traced forward against transformers, the logit lens, the CLI and its PNGs."""

from __future__ import annotations

import copy
import json
import os
import struct
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from checkpoints import make_hf_model, write_checkpoint
from conftest import PEAKED
from mlx_gpt2 import load
from mlx_gpt2.cli import app
from mlx_gpt2.errors import UserError
from mlx_gpt2.analysis.trace import lens_logits, logit_lens, next_tokens, trace

TEXT = "The animal didn't cross the street because it was too tired"
# Both attention options transformers implements as separate code paths, on at once.
SCALED_UPCAST = {**PEAKED, "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}
runner = CliRunner()


def eager(hf_model):
    """A copy running transformers' eager attention, the only one that returns its probabilities."""
    model = copy.deepcopy(hf_model)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def scaled_upcast(tmp_path_factory):
    """A small GPT-2 with scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn: (hf, (model, tok))."""
    hf = make_hf_model(SCALED_UPCAST, seed=1)
    return hf, load(write_checkpoint(hf, tmp_path_factory.mktemp("scaled-upcast"), "hub"))


@pytest.fixture(params=["default", "scaled_upcast"])
def pair(request, small_hf, small_loaded):
    """(transformers model with eager attention, (mlx model, tokenizer)) for each attention variant."""
    if request.param == "default":
        return eager(small_hf), small_loaded
    hf, loaded = request.getfixturevalue("scaled_upcast")
    return eager(hf), loaded


@pytest.fixture(scope="module")
def small_trace(small_loaded):
    model, tokenizer = small_loaded
    return trace(model, tokenizer, TEXT)


def test_attentions_and_hidden_states_equal_transformers(pair):
    hf, (model, tokenizer) = pair
    t = trace(model, tokenizer, TEXT)
    with torch.no_grad():
        out = hf(torch.tensor([t.token_ids]), output_attentions=True, output_hidden_states=True)
    attentions = np.stack([a[0].numpy() for a in out.attentions])  # [n_layer, n_head, L, L]
    hidden = np.stack([h[0].numpy() for h in out.hidden_states])  # [n_layer + 1, L, n_embd]
    assert t.attentions.shape == attentions.shape and t.hidden_states.shape == hidden.shape
    diffs = {
        "attentions": np.abs(t.attentions - attentions).max(),
        "hidden_states": np.abs(t.hidden_states - hidden).max(),
        "logits": np.abs(t.logits - out.logits[0].numpy()).max(),
    }
    print("OK, maxdiff =", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4, diffs


def test_hidden_states_order_is_transformers(small_trace, small_loaded):
    """Entry 0 is the embedding sum; the last is ln_f(last block output); residual_stream keeps it raw."""
    model, _ = small_loaded
    t = small_trace
    assert np.array_equal(t.hidden_states[:-1], t.residual_stream[:-1])
    final = np.array(model.ln_f(mx.array(t.residual_stream[-1])))
    assert np.abs(t.hidden_states[-1] - final).max() <= 1e-5
    embeddings = np.array(model.wte.weight)[t.token_ids] + np.array(model.wpe.weight)[: len(t.token_ids)]
    assert np.abs(t.residual_stream[0] - embeddings).max() <= 1e-6
    assert np.array_equal(t.token_embeddings, np.array(model.wte.weight)[t.token_ids])
    assert np.array_equal(t.position_embeddings, np.array(model.wpe.weight)[: len(t.token_ids)])


def test_attention_rows_are_causal_distributions(small_trace):
    probs = small_trace.attentions  # [n_layer, n_head, L, L]
    L = probs.shape[-1]
    assert np.abs(probs.sum(-1) - 1).max() <= 1e-5
    rows, cols = np.triu_indices(L, k=1)  # every (query, key) with the key in the query's future
    assert np.all(probs[..., rows, cols] == 0)
    assert np.all(probs >= 0)


def test_kept_q_and_k_give_the_kept_probabilities(small_trace, small_loaded):
    model, _ = small_loaded
    t = small_trace
    L, head_dim = t.q.shape[2], t.q.shape[3]
    assert t.q.shape == t.k.shape == t.v.shape == (t.n_layer, t.n_head, L, model.config.head_dim)
    assert t.after_attention.shape == (t.n_layer, L, model.config.n_embd)
    scores = t.q @ t.k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    assert np.abs(probs / probs.sum(-1, keepdims=True) - t.attentions).max() <= 1e-5


def test_logit_lens_of_the_last_layer_is_the_models_own_logits(small_trace, small_loaded):
    model, tokenizer = small_loaded
    t = small_trace
    own = np.array(model(mx.array([t.token_ids]))[0])  # the fused, normal forward path
    diff = np.abs(lens_logits(model, t, t.n_layer) - own).max()
    print(f"OK, maxdiff = {diff:.2e} (lens at the last layer vs model logits)")
    assert diff <= 1e-4 and np.abs(t.logits - own).max() <= 1e-4
    lens = logit_lens(model, tokenizer, t, top=3)
    L = len(t.token_ids)
    assert lens.top_ids.shape == lens.top_probs.shape == (t.n_layer + 1, L, 3)
    assert np.array_equal(lens.top_ids[-1, :, 0], own.argmax(-1))
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0) and np.all(lens.top_probs.sum(-1) <= 1 + 1e-6)
    assert lens.top_tokens[-1][0][0] == tokenizer.decode([int(lens.top_ids[-1, 0, 0])])


def test_next_tokens_are_the_top_of_the_softmax(small_loaded):
    model, tokenizer = small_loaded
    ids = tokenizer.encode(TEXT)
    logits = np.array(model(mx.array([ids]))[0, -1], dtype=np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    candidates = next_tokens(model, tokenizer, TEXT, top=5)
    assert [c.token_id for c in candidates] == list(np.argsort(-probs)[:5])
    assert np.allclose([c.prob for c in candidates], np.sort(probs)[::-1][:5], atol=1e-6)
    assert candidates[0].token == tokenizer.decode([candidates[0].token_id])


def test_trace_of_token_ids_equals_trace_of_text(small_trace, small_loaded):
    model, tokenizer = small_loaded
    again = trace(model, tokenizer, small_trace.token_ids)
    assert again.tokens == small_trace.tokens and np.array_equal(again.attentions, small_trace.attentions)


def test_trace_on_a_quantized_model(small_converted):
    model, tokenizer = load(small_converted)
    nn.quantize(model, group_size=64, bits=4)  # QuantizedLinear and QuantizedEmbedding everywhere
    assert isinstance(model.h[0].attn.c_attn, nn.QuantizedLinear) and isinstance(model.wte, nn.QuantizedEmbedding)
    t = trace(model, tokenizer, TEXT)
    diff = np.abs(t.logits - np.array(model(mx.array([t.token_ids]))[0])).max()
    print(f"OK, maxdiff = {diff:.2e} (4-bit trace vs 4-bit fused forward)")
    assert diff <= 1e-4
    assert np.abs(t.attentions.sum(-1) - 1).max() <= 1e-5
    assert logit_lens(model, tokenizer, t, top=2).top_ids.shape == (t.n_layer + 1, len(t.tokens), 2)


def test_trace_in_float16_stays_close_to_the_fused_path(scaled_upcast, tmp_path):
    hf, _ = scaled_upcast
    model, tokenizer = load(write_checkpoint(hf, tmp_path, "hub"), dtype="float16")
    t = trace(model, tokenizer, TEXT)
    own = np.array(model(mx.array([t.token_ids]))[0].astype(mx.float32))
    assert t.logits.dtype == np.float32 and t.attentions.dtype == np.float32
    diff = np.abs(t.logits - own).max() / np.abs(own).max()
    print(f"OK, relative maxdiff = {diff:.2e} (float16 trace vs float16 fused forward)")
    assert diff <= 1e-2


@pytest.mark.parametrize(
    "text, message",
    [("", "text is empty"), ("hello " * 200, "sees at most 128"), ([50257], "token id 50257 .*token ids are integers 0..50256")],
)
def test_trace_refuses_bad_input(small_loaded, text, message):
    model, tokenizer = small_loaded
    with pytest.raises(UserError, match=message):
        trace(model, tokenizer, text)


# ---- the CLI ----------------------------------------------------------------------------------------------


def run(*args, input=None):
    return runner.invoke(app, ["inspect", *map(str, args)], input=input)


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def figure_size(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * figure.dpi
    return round(width), round(height)


def test_tables_name_the_tokens(cli_model):
    for command, extra, expected in [
        ("attention", ["--layer", 1, "--head", 2], "layer 1, head 2"),
        ("attention", [], "head 3"),  # every head of layer 0
        ("logit-lens", [], "embeddings"),
        ("next", ["--top", 3], "next token after \"The animal didn't cross"),
        ("embeddings", [], "wte: 50257 x 64; position embeddings wpe: 128 x 64"),
    ]:
        result = run(command, TEXT, "-m", cli_model, *extra)
        assert result.exit_code == 0, result.output
        assert expected in result.stdout and "animal" in result.stdout, result.stdout


def test_json_has_the_documented_shape(cli_model, small_trace):
    L, n_layer, n_head, n_embd = len(small_trace.tokens), 2, 4, 64

    def as_json(*args):
        result = run(*args, "-m", cli_model, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["tokens"] == small_trace.tokens and data["token_ids"] == small_trace.token_ids
        assert data["model"] == cli_model
        return data

    data = as_json("attention", TEXT, "--layer", 1)
    assert data["layer"] == 1 and data["heads"] == list(range(n_head))
    assert np.array(data["attentions"]).shape == (n_head, L, L)
    assert np.abs(np.array(data["attentions"]) - small_trace.attentions[1]).max() <= 1e-6
    assert np.array(as_json("attention", TEXT, "--head", 3)["attentions"]).shape == (1, L, L)

    top = as_json("logit-lens", TEXT, "--top", 2)["top"]
    assert (len(top), len(top[0]), len(top[0][0])) == (n_layer + 1, L, 2)
    assert set(top[0][0][0]) == {"token_id", "token", "prob"}

    nexts = as_json("next", TEXT, "--top", 4)["next"]
    assert len(nexts) == 4 and set(nexts[0]) == {"token_id", "token", "prob", "logprob"}
    assert [n["prob"] for n in nexts] == sorted((n["prob"] for n in nexts), reverse=True)

    data = as_json("embeddings", TEXT)
    assert (data["vocab_size"], data["n_positions"], data["n_embd"]) == (50257, 128, n_embd)
    for key in ("token_embeddings", "position_embeddings", "embeddings"):
        assert np.array(data[key]).shape == (L, n_embd)
    assert np.abs(np.array(data["embeddings"]) - small_trace.residual_stream[0]).max() <= 1e-5


def test_png_files_are_images_of_the_expected_size(cli_model, small_loaded, small_trace, tmp_path):
    import matplotlib.image

    from mlx_gpt2.analysis import viz

    model, tokenizer = small_loaded
    t = small_trace
    umask = os.umask(0)
    os.umask(umask)
    expected = {
        "attention --layer 1 --head 0": viz.attention_figure(t, layer=1, head=0),
        "attention --layer 0": viz.attention_figure(t, layer=0),
        "logit-lens": viz.logit_lens_figure(logit_lens(model, tokenizer, t)),
        "next --top 6": viz.next_tokens_figure(next_tokens(model, tokenizer, TEXT, top=6), t.tokens),
        "embeddings": viz.embeddings_figure(t),
    }
    for i, (command, figure) in enumerate(expected.items()):
        out = tmp_path / f"{i}.png"
        command, *options = command.split()
        result = run(command, TEXT, "-m", cli_model, *options, "--png", out)
        assert result.exit_code == 0, result.output
        assert f"wrote {out}" in result.stderr
        assert png_size(out) == figure_size(figure), command
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
        assert matplotlib.image.imread(out).shape[:2] == figure_size(figure)[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(5)]  # no temporary left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", 2], "--layer must be in 0-1 (this model has 2 layers), got 2"),
        (["--layer", -1], "--layer must be in 0-1"),
        (["--head", 4], "--head must be in 0-3 (this model has 4 heads per layer), got 4"),
        (["--png", "/nonexistent/dir/a.png"], "directory /nonexistent/dir does not exist"),
        (["--png", "/"], "cannot write /: it is a directory"),
    ],
)
def test_bad_options_are_one_line_errors(cli_model, args, message):
    result = run("attention", TEXT, "-m", cli_model, *args)
    assert result.exit_code == 1
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_missing_matplotlib_names_the_install_command(cli_model, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("next", TEXT, "-m", cli_model, "--png", tmp_path / "a.png")
    assert result.exit_code == 1 and not (tmp_path / "a.png").exists()
    assert result.stderr == "error: drawing a PNG needs matplotlib: pip install 'mlx-gpt2[viz]'\n"
    assert run("next", TEXT, "-m", cli_model).exit_code == 0  # tables never need it


def test_text_from_stdin(small_converted):
    result = run("next", "-", "-m", small_converted, "--json", input=TEXT)
    assert result.exit_code == 0 and "".join(json.loads(result.stdout)["tokens"]) == TEXT


def test_the_example_walks_through_every_figure(small_dir, tmp_path, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "inside_gpt2.py"
    monkeypatch.setattr(sys, "argv", [str(example), str(small_dir), str(tmp_path)])
    runpy.run_path(str(example), run_name="__main__")
    printed = capsys.readouterr().out
    assert "token embeddings wte: 50257 × 64" in printed and "64 → 192" in printed and "64 → 256 → 64" in printed
    # layer 0's residual at the one changed token is the embedding: patching it restores the clean run
    assert "5. Ablation" in printed and "at ' John' recovers 100% of it" in printed and "7. Saliency" in printed
    names = ["attention_head.png", "attention_heads.png", "embeddings.png", "logit_lens.png", "next_token.png",
             "patching.png", "saliency.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "explorer.html"])
    assert all(png_size(tmp_path / name)[0] > 100 for name in names)
