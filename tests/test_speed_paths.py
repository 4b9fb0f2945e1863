"""The fast paths compute the same function as the plain ones; doctor and bench run. Speed is never asserted.

load() re-lays the weights input-major on the CPU backend by default, so every other test in this suite
already runs the fast path against transformers; here it is compared with the checkpoint layout directly.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_gpt2 import generate_step, load
from mlx_gpt2.backend import backend_name, default_dtype, prepare, resolve_layout, use_input_major

PROMPT_IDS = [464, 5044, 1422, 470, 3272, 262, 4675, 780, 340, 373]


@pytest.fixture(scope="module")
def both_layouts(small_converted):
    plain, _ = load(small_converted, layout="checkpoint")
    fast, _ = load(small_converted, layout="input-major")
    return plain, fast


def greedy(model, n: int = 40) -> list[int]:
    return [t for t, _ in generate_step(PROMPT_IDS, model, max_tokens=n)]


def test_input_major_gives_the_same_logits_and_greedy_tokens(both_layouts, ids):
    plain, fast = both_layouts
    a, b = np.array(plain(mx.array(ids))), np.array(fast(mx.array(ids)))
    diff = np.abs(a - b).max()
    print(f"OK, maxdiff = {diff:.2e}")
    assert diff < 1e-4
    assert greedy(plain) == greedy(fast)


def test_input_major_keeps_names_shapes_and_values(both_layouts):
    plain, fast = both_layouts
    p, f = dict(tree_flatten(plain.parameters())), dict(tree_flatten(fast.parameters()))
    assert p.keys() == f.keys()
    for name in p:
        assert p[name].shape == f[name].shape and p[name].dtype == f[name].dtype, name
        assert mx.array_equal(p[name], f[name]).item(), name


def test_saved_weights_are_the_checkpoint_layout(both_layouts, tmp_path):
    """A re-laid model saves exactly what the checkpoint holds: every tensor equal to the plain model's."""
    plain, fast = both_layouts
    path = str(tmp_path / "w.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(fast.parameters())))
    back, stored = mx.load(path), dict(tree_flatten(plain.parameters()))
    assert back.keys() == stored.keys()
    different = [k for k in stored if back[k].shape != stored[k].shape or not mx.array_equal(back[k], stored[k]).item()]
    assert not different, different


def test_gradients_are_the_same_in_both_layouts(both_layouts, ids):
    plain, fast = both_layouts
    x, y = mx.array(ids[:, :-1]), mx.array(ids[:, 1:])

    def grads(model):
        loss = lambda m: nn.losses.cross_entropy(m(x), y).mean()
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    gp, gf = grads(plain), grads(fast)
    worst = max(float(mx.abs(gp[k] - gf[k]).max()) for k in gp)
    assert worst < 1e-4, worst


def test_use_input_major_is_idempotent(small_converted, ids):
    model, _ = load(small_converted, layout="checkpoint")
    stored = model.h[0].attn.c_attn.weight
    before = np.array(model(mx.array(ids)))
    use_input_major(model, evaluate=True)
    relaid = model.h[0].attn.c_attn.weight
    assert relaid is not stored  # the first call re-lays every float weight
    embedding = model.wte.weight
    use_input_major(model)
    assert model.h[0].attn.c_attn.weight is relaid and model.wte.weight is embedding  # the second does nothing
    model.h[0].attn.c_attn.weight = stored  # a weight assigned since is laid out again
    use_input_major(model)
    assert model.h[0].attn.c_attn.weight is not stored
    assert np.abs(np.array(model(mx.array(ids))) - before).max() < 1e-4


def test_use_input_major_leaves_quantized_layers_alone(small_converted, ids):
    model, _ = load(small_converted, layout="checkpoint", quantize=True)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    use_input_major(model, evaluate=True)
    assert weights and all(m.weight is weights[name] for name, m in model.named_modules() if name in weights)


def test_layout_choices():
    assert resolve_layout("input-major") and not resolve_layout("checkpoint")
    assert resolve_layout("auto") == (backend_name() == "cpu")
    with pytest.raises(ValueError, match="layout must be one of auto, input-major, checkpoint"):
        prepare(nn.Linear(2, 2), layout="columns")


def test_dtype_default_per_backend(small_dir, tmp_path):
    from mlx_gpt2.convert import convert

    half = convert(small_dir, tmp_path / "f16", dtype="float16")
    auto, _ = load(half)
    kept, _ = load(half, dtype="float16")
    expected = mx.float32 if backend_name() == "cpu" else mx.float16
    assert default_dtype(mx.float16) == expected and default_dtype(mx.float32) == mx.float32
    assert auto.ln_f.weight.dtype == expected and auto.h[0].mlp.c_fc.weight.dtype == expected
    assert kept.h[0].mlp.c_fc.weight.dtype == mx.float16


def test_doctor_prints_its_fields():
    from mlx_gpt2.cli import app

    result = CliRunner().invoke(app, ["doctor", "--quick"])
    assert result.exit_code == 0, result.output
    for field in ("backend:", "mlx:", "dtype default:", "weight layout:", "BLAS:", "sgemm:", "decode head:"):
        assert field in result.output
    info = json.loads(CliRunner().invoke(app, ["doctor", "--quick", "--json"]).output)
    assert info["backend"] == backend_name() and info["here"]["matmul_rel_error"] < 1e-5


def test_bench_ratios_and_table_from_a_record():
    from benchmarks.bench import markdown, ratios

    def run(engine, n, decode, prefill, peak):
        return {"shape": "gpt2", "dtype": "float32", "batch": 1, "engine": engine, "run": n, "load_s": 1.0,
                "prefill_tps": prefill, "prefill_cpu_s": 512 / prefill, "decode_tps": decode, "decode_cpu_ms": 1e3 / decode, "peak_gb": peak,
                "rss_peak_gb": 1.0, "tokens": [1, 2, 3]}

    record = {"runs": [run("mlx-gpt2", 0, 20.0, 40.0, 0.5), run("mlx-lm", 0, 10.0, 20.0, 0.5),
                       run("mlx-gpt2", 1, 16.0, 40.0, 0.5), run("mlx-lm", 1, 10.0, 40.0, 0.5)], "conversions": []}
    (entry,) = ratios(record)
    assert entry["decode"] == {"median": 1.8, "min": 1.6, "max": 2.0}
    assert entry["prefill"]["min"] == 1.0 and entry["memory"]["median"] == 1.0 and entry["same_tokens"]
    table = markdown(record)
    assert "| gpt2 | float32 | 1 | 1.80× (1.60–2.00) |" in table


def test_bench_quick_smoke(tmp_path):
    """`mlx-gpt2 bench` from a clone runs the repository's benchmarks (python -m benchmarks), in a real process."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "mlx-gpt2"
    result = subprocess.run([str(script), "bench", "--quick", "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SMOKE RUN")  # its numbers mean nothing, and it says so first
    assert "| tiny | float32 | 1 | mlx-gpt2 |" in result.stdout and "| tiny | float32 | 1 | mlx-lm |" in result.stdout
    record = json.loads((tmp_path / "r.json").read_text())
    assert {r["engine"] for r in record["runs"]} == {"mlx-gpt2", "mlx-lm"}
    assert all(r["decode_tps"] > 0 and r["peak_gb"] > 0 for r in record["runs"])
