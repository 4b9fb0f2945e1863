"""Hooks, ablation, patching, attribution, saliency and neurons against TransformerLens and torch autograd.

TransformerLens holds the same weights unprocessed (tests/lens.py); every activation and every
intervention is compared point for point through the name table in mlx_gpt2/analysis/hooks.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from lens import hooked_transformer
from mlx_gpt2.analysis.hooks import hook_names, run_with_cache, run_with_hooks, transformer_lens_name
from mlx_gpt2.analysis.interventions import Ablation, ablate, direct_logit_attribution, patch, patch_heads
from mlx_gpt2.analysis.neurons import neuron_activations, neuron_factors, top_neurons
from mlx_gpt2.analysis.saliency import saliency
from mlx_gpt2.errors import UserError

TEXT = "The animal didn't cross the street because it was too tired"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def tl(small_hf):
    return hooked_transformer(small_hf)


@pytest.fixture(scope="module")
def ids(small_loaded):
    return small_loaded[1].encode(TEXT)


def tl_value(tl, cache, name: str) -> np.ndarray:
    """TransformerLens's activation for our `name`, in our layout (see the table in hooks.py)."""
    ref = cache[transformer_lens_name(name)].numpy()
    if name.endswith(("attn.q", "attn.k", "attn.v")):
        ref = ref.transpose(0, 2, 1, 3)  # [B, L, H, d] -> [B, H, L, d]
    if name.endswith(("ln_1", "ln_2")) or name == "ln_f":  # TL hooks the norm before its affine
        ln = tl.ln_final if name == "ln_f" else getattr(tl.blocks[int(name.split(".")[1])], name[-4:].replace("_", ""))
        ref = ref * ln.w.detach().numpy() + ln.b.detach().numpy()
    return ref


def test_every_cached_activation_equals_transformer_lens(small_loaded, tl, ids):
    model, _ = small_loaded
    logits, cache = run_with_cache(model, ids)
    with torch.no_grad():
        tl_logits, tl_cache = tl.run_with_cache(torch.tensor([ids]))
    assert list(cache) == hook_names(model) and len(cache) == 2 + 15 * model.config.n_layer + 1
    diffs = {"logits": np.abs(np.array(logits) - tl_logits[0].numpy()).max()}
    for name in cache:
        ours, ref = cache.numpy(name), tl_value(tl, tl_cache, name)
        assert ours.shape == ref.shape, name
        finite = np.isfinite(ref)  # the scores' future is -inf in both
        assert (finite == np.isfinite(ours)).all(), name
        diffs[name] = np.abs(ours[finite] - ref[finite]).max()
    print("OK, maxdiff =", f"{max(diffs.values()):.2e}", "over", len(diffs), "points")
    assert max(diffs.values()) <= 1e-4, {k: v for k, v in diffs.items() if v > 1e-4}


def test_hooks_read_replace_and_refuse(small_loaded, ids):
    model, _ = small_loaded
    seen = []
    plain = run_with_hooks(model, ids, {"h.1.attn.pattern": lambda v: seen.append(v.shape)})
    assert seen == [(1, 4, len(ids), len(ids))]
    assert np.abs(np.array(plain) - np.array(model(mx.array([ids]))[0])).max() <= 1e-4  # the fused path's numbers
    doubled = run_with_hooks(model, ids, {"ln_f": lambda v: 2 * v})
    assert not np.allclose(np.array(doubled), np.array(plain))
    with pytest.raises(UserError, match="did you mean h.1.attn.pattern"):
        run_with_hooks(model, ids, {"h.1.attn.patern": lambda v: v})
    with pytest.raises(UserError, match=r"must return an mx.array of \(1, 12, 64\)"):
        run_with_hooks(model, ids, {"wte": lambda v: v[:, :3]})
    with pytest.raises(UserError, match="token id 50257"):
        run_with_cache(model, [1, 50257])
    _, only = run_with_cache(model, ids, names=lambda n: n.endswith("mlp.act"))
    assert list(only) == ["h.0.mlp.act", "h.1.mlp.act"]


def _tl_replace(index, value):
    def fn(act, hook):
        act = act.clone()
        act[..., index, :] = value if value.ndim < 3 else value[..., index, :]  # heads: [B, L, H, d]
        return act
    return fn


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_ablation_equals_transformer_lens_hooks(small_loaded, tl, ids, method):
    model, tokenizer = small_loaded
    reference = tokenizer.encode("A cat sat on the warm mat and then it slept for hours")[: len(ids)]
    assert len(reference) == len(ids)
    spec = Ablation(heads=((0, 1), (1, 3)), neurons=((1, 7), (1, 200)), method=method)
    ours = np.array(ablate(model, ids, spec, reference=reference if method != "zero" else None))
    with torch.no_grad():
        _, ref_cache = tl.run_with_cache(torch.tensor([ids if method == "zero" else reference]))
        hooks = []
        for layer, head in spec.heads:
            z = ref_cache[f"blocks.{layer}.attn.hook_z"]
            value = {"zero": torch.tensor(0.0), "mean": z.mean(dim=(0, 1))[head], "resample": z}[method]
            hooks.append((f"blocks.{layer}.attn.hook_z", _tl_replace(head, value)))
        for layer, neuron in spec.neurons:
            post = ref_cache[f"blocks.{layer}.mlp.hook_post"]
            value = {"zero": 0.0, "mean": post.mean(dim=(0, 1))[neuron], "resample": post[..., neuron]}[method]

            def fn(act, hook, n=neuron, v=value):
                act = act.clone()
                act[..., n] = v
                return act
            hooks.append((f"blocks.{layer}.mlp.hook_post", fn))
        ref = tl.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0].numpy()
    plain = np.array(model(mx.array([ids]))[0])
    print("OK, maxdiff =", f"{np.abs(ours - ref).max():.2e}", "(the ablation moved logits by", f"{np.abs(ref - plain).max():.2f})")
    assert np.abs(ours - ref).max() <= 1e-4 and np.abs(ref - plain).max() > 1e-2


def test_ablation_refuses_bad_requests(small_loaded, ids):
    model, _ = small_loaded
    with pytest.raises(UserError, match="head 2.0 is not in this model: layers 0-1, heads 0-3"):
        ablate(model, ids, Ablation(heads=((2, 0),)))
    with pytest.raises(UserError, match="neurons 0-255"):
        ablate(model, ids, Ablation(neurons=((0, 256),)))
    with pytest.raises(UserError, match="one of zero, mean, resample"):
        Ablation(heads=((0, 0),), method="random")
    with pytest.raises(UserError, match="nothing to ablate"):
        Ablation()
    with pytest.raises(UserError, match="same length"):
        ablate(model, ids, Ablation(heads=((0, 0),), method="resample"), reference=ids[:3])


@pytest.fixture(scope="module")
def ioi(small_loaded):
    _, tokenizer = small_loaded
    clean, corrupted = tokenizer.encode(CLEAN), tokenizer.encode(CORRUPTED)
    answer, wrong = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]
    return clean, corrupted, answer, wrong


@pytest.mark.parametrize("point,tl_patch", [("resid_pre", "get_act_patch_resid_pre"),
                                             ("attn.c_proj", "get_act_patch_attn_out"),
                                             ("heads", "get_act_patch_attn_head_out_all_pos")])
def test_patching_equals_transformer_lens(small_loaded, tl, ioi, point, tl_patch):
    from transformer_lens import patching

    model, _ = small_loaded
    clean, corrupted, answer, wrong = ioi
    if point == "heads":
        ours = patch_heads(model, clean, corrupted, answer=answer, wrong=wrong)
    else:
        ours = patch(model, clean, corrupted, answer=answer, wrong=wrong, point=point)
    with torch.no_grad():
        _, clean_cache = tl.run_with_cache(torch.tensor([clean]))
        ref = getattr(patching, tl_patch)(tl, torch.tensor([corrupted]), clean_cache,
                                          lambda logits: logits[0, -1, answer] - logits[0, -1, wrong]).numpy()
        tl_clean = tl(torch.tensor([clean]))[0, -1]
    assert ours.patched.shape == ref.shape
    assert abs(ours.clean - (tl_clean[answer] - tl_clean[wrong]).item()) <= 1e-4
    print("OK, maxdiff =", f"{np.abs(ours.patched - ref).max():.2e}", "; the table spans",
          f"{ref.min():.3f}..{ref.max():.3f}")
    assert np.abs(ours.patched - ref).max() <= 1e-4 and np.ptp(ref) > 1e-2
    if point == "resid_pre":  # layer 0's residual is the embedding: patching the one changed position
        changed = [p for p in range(len(clean)) if clean[p] != corrupted[p]]  # makes the clean run
        assert len(changed) == 1 and abs(ours.recovered[0, changed[0]] - 1.0) <= 1e-4
        assert np.abs(np.delete(ours.recovered[0], changed)).max() <= 1e-4  # and the others change nothing


def test_direct_logit_attribution_sums_to_the_logit_and_equals_transformer_lens(small_loaded, tl, ids):
    model, _ = small_loaded
    token = 318
    dla = direct_logit_attribution(model, ids, token)
    total = dla.embeddings + dla.heads.sum() + dla.attn_bias.sum() + dla.mlps.sum() + dla.ln_f_bias
    assert abs(total - dla.logit) <= 1e-3, (total, dla.logit)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.tensor([ids]))
        heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)[:, 0]  # [n_layer*H, D]
        mlps = torch.stack([cache.apply_ln_to_stack(cache[f"blocks.{i}.hook_mlp_out"][:, -1], layer=-1, pos_slice=-1)[0]
                            for i in range(tl.cfg.n_layers)])
        direction = tl.ln_final.w * tl.W_U[:, token]  # TL assumes ln_f's weight folded; it is not here
        ref_heads = (heads @ direction).reshape(tl.cfg.n_layers, tl.cfg.n_heads).numpy()
        ref_mlps = (mlps @ direction).numpy()
    diff = max(np.abs(dla.heads - ref_heads).max(), np.abs(dla.mlps - ref_mlps).max())
    print("OK, maxdiff =", f"{diff:.2e}")
    assert diff <= 1e-4


def _torch_saliency(hf, ids, target, steps=None):
    """Gradient x input (steps None) or integrated gradients, by torch autograd on transformers."""
    embeds = hf.transformer.wte(torch.tensor([ids])).detach()
    alphas = torch.ones(1) if steps is None else torch.arange(1, steps + 1) / steps
    path = (alphas[:, None, None] * embeds).requires_grad_()
    hf(inputs_embeds=path).logits[:, -1, target].sum().backward()
    return (path.grad.mean(dim=0) * embeds[0]).numpy()


@pytest.mark.parametrize("method", ["gradient_x_input", "integrated_gradients"])
def test_saliency_equals_torch_autograd(small_hf, small_loaded, ids, method):
    model, _ = small_loaded
    target = int(np.argmax(np.array(model(mx.array([ids]))[0, -1])))
    ours = saliency(model, ids, target, method=method, steps=16)
    ref = _torch_saliency(small_hf, ids, target, steps=16 if method == "integrated_gradients" else None)
    diff = np.abs(ours.attributions - ref).max()
    print("OK, maxdiff =", f"{diff:.2e}", "scale", f"{np.abs(ref).max():.2e}")
    assert diff <= 1e-4 and np.abs(ref).max() > 1e-3
    assert np.allclose(ours.scores, ref.sum(-1), atol=1e-4) and np.isclose(ours.shares.sum(), 1.0)
    with pytest.raises(UserError, match="target token must be an id"):
        saliency(model, ids, 50257)


def test_integrated_gradients_are_complete(small_loaded, ids):
    """The attributions sum to the logit's change from the zero input (more steps, closer)."""
    model, _ = small_loaded
    target = 13
    real = np.array(model(mx.array([ids]))[0, -1, target]).item()
    zero = run_with_hooks(model, ids, {"wte": lambda v: mx.zeros_like(v)})[-1, target].item()
    gaps = [abs(saliency(model, ids, target, method="integrated_gradients", steps=s).scores.sum() - (real - zero))
            for s in (4, 64)]
    print("completeness gaps at 4 and 64 steps:", gaps)
    assert gaps[1] < gaps[0] and gaps[1] < 0.05 * abs(real - zero)


def test_neurons_equal_transformer_lens_and_factor_with_sklearn(small_loaded, tl, ids):
    from sklearn.decomposition import NMF

    model, _ = small_loaded
    acts = neuron_activations(model, ids)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.tensor([ids]))
    ref = np.stack([cache[f"blocks.{i}.mlp.hook_post"][0].numpy() for i in range(tl.cfg.n_layers)])
    assert acts.shape == ref.shape and np.abs(acts - ref).max() <= 1e-4
    top = top_neurons(acts, top=3)
    for layer, best in enumerate(top):
        order = np.argsort(-ref[layer].max(axis=0))[:3]
        assert [n.neuron for n in best] == order.tolist() and best[0].position == int(ref[layer][:, order[0]].argmax())
    factors = neuron_factors(acts, factors=3)
    expected = NMF(n_components=3, init="nndsvda", random_state=0, max_iter=500).fit(np.maximum(np.concatenate(list(ref), -1), 0).astype(np.float64))
    assert factors.token_weights.shape == (len(ids), 3) and factors.neuron_weights.shape == (3, 2 * 256)
    assert np.abs(factors.neuron_weights - expected.components_).max() <= 1e-3
    assert (factors.token_weights >= 0).all()


# The commands: each prints what the API computes (checked above against the references), as a table,
# --json or --png, and refuses bad input in one line.
from test_inspect import png_size, run  # noqa: E402


def json_of(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return __import__("json").loads(result.stdout)


def test_inspect_ablate_patch_saliency_neurons_print_the_api(cli_model, small_loaded, ids, ioi):
    model, tokenizer = small_loaded
    data = json_of("ablate", TEXT, "-m", cli_model, "--head", "0.1", "--neuron", "1.7", "--top", "3")
    assert json_of("ablate", TEXT, "-m", cli_model, "--head", "0.1,1.2", "--head", "1.3")["heads"] == [[0, 1], [1, 2], [1, 3]]
    probs = np.array(mx.softmax(ablate(model, ids, Ablation(heads=((0, 1),), neurons=((1, 7),)))[-1], axis=-1))
    assert [round(float(probs[r["token_id"]]), 6) for r in data["next"]] == [r["ablated"] for r in data["next"]]
    assert data["heads"] == [[0, 1]] and data["neurons"] == [[1, 7]] and len(data["ablated_next"]) == 3

    clean, corrupted, answer, wrong = ioi
    data = json_of("patch", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " John", "-m", cli_model, "--point", "heads")
    ref = patch_heads(model, clean, corrupted, answer=answer, wrong=wrong)
    assert np.abs(np.array(data["patched_logit_diff"]) - ref.patched).max() <= 1e-5 and data["answer"] == answer

    data = json_of("saliency", TEXT, "-m", cli_model, "--target", "id:318", "--method", "gradient_x_input")
    assert np.abs(np.array(data["shares"]) - saliency(model, ids, 318).shares).max() <= 1e-5

    data = json_of("neurons", TEXT, "-m", cli_model, "--layer", "1", "--top", "2", "--factors", "2")
    acts = neuron_activations(model, ids, [1])
    assert [n["neuron"] for n in data["layers"][0]] == [n.neuron for n in top_neurons(acts, 2, [1])[0]]
    assert np.array(data["factors"]["token_weights"]).shape == (2, len(ids))

    same = json_of("patch", CLEAN, "--corrupted", CLEAN, "--answer", " Mary", "--wrong", " John", "-m", cli_model)
    assert same["recovered"][0][0] is None  # no gap to recover: null, never NaN (not JSON)
    table = run("patch", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " John", "-m", cli_model)
    assert table.exit_code == 0 and table.stdout.count("\n") == 1 + 1 + model.config.n_layer


def test_the_new_views_draw_pngs(cli_model, tmp_path):
    commands = {"ablate": ["--head", "1.0"], "saliency": ["--steps", "4"], "neurons": ["--layer", "0"],
                "patch": ["--corrupted", TEXT.replace("tired", "happy"), "--answer", " was", "--wrong", " is"]}
    for name, options in commands.items():
        out = tmp_path / f"{name}.png"
        result = run(name, TEXT, "-m", cli_model, *options, "--png", out)
        assert result.exit_code == 0 and f"wrote {out}" in result.stderr, result.output
        width, height = png_size(out)
        assert width >= 400 and height >= 200


@pytest.mark.parametrize("args, message", [
    (["ablate", TEXT], "nothing to ablate: name at least one head"),
    (["ablate", TEXT, "--head", "1-2"], "--head takes LAYER.INDEX (e.g. 5.1 for layer 5's head 1), got '1-2'"),
    (["ablate", TEXT, "--neuron", "0.999"], "neuron 0.999 is not in this model"),
    (["ablate", TEXT, "--head", "0.0", "--method", "resample"], "resample ablation takes a reference text of the same length"),
    (["patch", CLEAN, "--corrupted", "short", "--answer", " Mary", "--wrong", " John"], "same length; got 14 and 1 tokens"),
    (["patch", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary Ann", "--wrong", " John"], "--answer ' Mary Ann' is 2 tokens"),
    (["patch", CLEAN, "--corrupted", CORRUPTED, "--answer", "id:99999", "--wrong", " John"], "answer token must be an id in 0-50256"),
    (["patch", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " John", "--point", "attn.q"], "--point must be one of"),
    (["patch", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", "id:5335"], "the same token"),
    (["ablate", TEXT, "--head", "0.1,1.x"], "got '1.x'"),
    (["saliency", TEXT, "--method", "lime"], "saliency method must be one of gradient_x_input, integrated_gradients"),
    (["saliency", TEXT, "--steps", "0"], "steps must be in 1-1024"),
    (["neurons", TEXT, "--factors", "99"], "factors must be in 1-12"),
    (["neurons", TEXT, "--layer", "5"], "--layer must be in 0-1"),
    (["html", TEXT, "--out", "/nonexistent/dir/p.html"], "directory /nonexistent/dir does not exist"),
])
def test_bad_requests_are_one_line_errors(cli_model, args, message):
    result = run(*args[:2], "-m", cli_model, *args[2:])
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_inspect_html_writes_once_and_never_loses_a_page(cli_model, tmp_path):
    out = tmp_path / "page.html"
    out.write_text("keep me")
    assert "already exists; pass --force" in run("html", TEXT, "-m", cli_model, "--out", out).stderr
    bad = run("html", TEXT, "-m", cli_model, "--out", out, "--force", "--layer", "7")
    assert bad.exit_code == 1 and "--layer must be in 0-1" in bad.stderr and out.read_text() == "keep me"
    good = run("html", TEXT, "-m", cli_model, "--out", out, "--force")
    assert good.exit_code == 0 and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no temporary left beside it


@pytest.mark.parametrize("kind", ["4-bit", "float16"])
def test_everything_runs_on_half_and_quantized_models(small_converted, kind):
    """As trace does: the hooked pass runs the model's own (quantized, half) layers and agrees with its fused path."""
    import mlx.nn as nn

    from mlx_gpt2 import load
    from mlx_gpt2.analysis.explorer import explorer_data

    model, tokenizer = load(small_converted, **({"dtype": "float16"} if kind == "float16" else {}))
    if kind == "4-bit":
        nn.quantize(model, group_size=64, bits=4)
    ids = tokenizer.encode(TEXT)
    logits, cache = run_with_cache(model, ids)
    own = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    diff = np.abs(np.array(logits.astype(mx.float32)) - own).max() / np.abs(own).max()
    print(f"OK, relative maxdiff = {diff:.2e} ({kind} hooked pass vs its fused forward)")
    assert diff <= (1e-5 if kind == "4-bit" else 1e-2)
    dla = direct_logit_attribution(model, ids, 318)
    parts = dla.embeddings + dla.heads.sum() + dla.attn_bias.sum() + dla.mlps.sum() + dla.ln_f_bias
    assert abs(parts - dla.logit) <= (1e-3 if kind == "4-bit" else 2e-2)
    assert np.isclose(saliency(model, ids, 318).shares.sum(), 1.0)
    assert patch_heads(model, ids, tokenizer.encode(TEXT.replace("tired", "happy")), answer=13, wrong=318).patched.shape == (2, 4)
    assert np.isfinite(np.array(ablate(model, ids, Ablation(heads=((1, 1),), method="mean")).astype(mx.float32))).all()
    assert len(explorer_data(model, tokenizer, TEXT)["tokens"]) == len(ids)
