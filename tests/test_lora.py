"""LoRA layers, training data, fusing and export: each checked against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_gpt2 import UserError, load
from mlx_gpt2.cli import app
from mlx_gpt2.lora import LoRALinear, LoRASpec, TrainConfig, apply_lora, fuse, fuse_lora, train
from mlx_gpt2.lora.data import encode_record, iterate_train, load_data, make_batch, pack_rows
from mlx_gpt2.tokenizer import Tokenizer

GPL = Path("/usr/share/common-licenses/GPL-3")
runner = CliRunner()


def paragraphs(n: int, offset: int = 0) -> list[str]:
    """Real English prose: paragraphs of the GPL (or Python's docs where the licence files are absent)."""
    if GPL.is_file():
        text = GPL.read_text()
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    parts = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
    return parts[offset : offset + n]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-data")
    write_jsonl(root / "train.jsonl", [{"text": p[:300]} for p in paragraphs(24)])
    write_jsonl(root / "valid.jsonl", [{"text": p[:300]} for p in paragraphs(4, offset=24)])
    return root


@pytest.fixture(scope="module")
def tokenizer(small_converted) -> Tokenizer:
    return Tokenizer.from_dir(small_converted)


def small_config(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), adapter_path=str(out), iters=3, batch_size=2, max_seq_length=32,
                  steps_per_report=1, steps_per_eval=100, val_batches=1, save_every=100, warmup=0)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained_adapters(small_converted, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "run"
    train(small_config(small_converted, data_dir, out, learning_rate=1e-2), quiet=True)
    return out


def logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)))


# ---- layers ----------------------------------------------------------------------------------------

def test_lora_with_b_zero_leaves_logits_unchanged(small_converted, ids):
    base, _ = load(small_converted)
    adapted, _ = load(small_converted)
    apply_lora(adapted, LoRASpec(num_layers=2, rank=4, scale=3.0))
    diff = np.abs(logits(adapted, ids) - logits(base, ids)).max()
    print(f"B = 0: max |logits diff| = {diff}")
    assert diff == 0.0


def test_fused_logits_equal_unfused(small_converted, ids):
    model, _ = load(small_converted)
    apply_lora(model, LoRASpec(num_layers=2, rank=4, scale=2.0))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    unfused = logits(model, ids)
    fuse_lora(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    diff = np.abs(logits(model, ids) - unfused).max()
    print(f"fused vs unfused: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_lora_over_a_quantized_linear_fuses_back_to_quantized_or_float():
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=64, bits=4)
    layer = LoRALinear.from_base(base, rank=4, scale=1.5)
    assert layer.lora_a.shape == (128, 4) and layer.lora_b.shape == (4, 96)
    layer.lora_b = mx.random.normal((4, 96)) * 0.1
    x = mx.random.normal((3, 128))
    expected = np.array(layer(x))
    float_fused = layer.fuse(dequantize=True)
    assert isinstance(float_fused, nn.Linear)
    print(f"dequantized fuse: max diff {np.abs(np.array(float_fused(x)) - expected).max():.3g}")
    assert np.allclose(np.array(float_fused(x)), expected, atol=1e-4)
    requantized = layer.fuse()
    assert isinstance(requantized, nn.QuantizedLinear)  # requantized: close, not equal
    update = np.abs(expected - np.array(base(x))).max()  # what the LoRA adds: a fuse that dropped it is this far off
    error = np.abs(np.array(requantized(x)) - expected).max()
    print(f"requantized fuse: max error {error:.3g}, the update itself {update:.3g}")
    assert error < 0.5 * update  # 4-bit rounding of the merged weight costs some; dropping the update costs it all


def test_too_many_layers_is_one_clear_error_and_writes_nothing(small_converted, data_dir, tmp_path):
    out = tmp_path / "adapters"
    with pytest.raises(UserError, match="this model has 2 layers") as error:
        train(small_config(small_converted, data_dir, out, num_layers=5), quiet=True)
    assert "\n" not in str(error.value)
    assert not out.exists()


# ---- data ------------------------------------------------------------------------------------------

def test_completion_only_loss_mask_ignores_prompt_tokens(tokenizer):
    prompt, completion = "Translate to French: cheese", " fromage"
    tokens, mask, _ = encode_record({"prompt": prompt, "completion": completion}, tokenizer, "x:1")
    n_prompt = len(tokenizer.encode(prompt))
    assert tokens.tolist() == tokenizer.encode(prompt) + tokenizer.encode(completion) + [tokenizer.eos_token_id]
    assert not mask[:n_prompt].any() and mask[n_prompt:].all()
    batch = make_batch([(tokens, mask)], max_seq_length=64)
    # The loss mask of target position t covers token t + 1: exactly the completion and <|endoftext|>.
    trained = [int(t) for t, m in zip(np.array(batch.targets)[0], np.array(batch.mask)[0]) if m]
    assert trained == tokenizer.encode(completion) + [tokenizer.eos_token_id]


def test_text_trains_on_every_token_and_long_text_is_split_with_a_warning(tmp_path, tokenizer):
    long_text = " ".join(paragraphs(6))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "short text"}, {"text": long_text},
                                           {"prompt": long_text, "completion": " end"}])  # fmt: skip
    warnings: list[str] = []
    data = load_data(tmp_path, tokenizer, max_seq_length=64, on_warning=warnings.append)
    assert len(warnings) == 1 and "2 of 3 examples are longer than --max-seq-length 64" in warnings[0]
    assert "1 texts split" in warnings[0] and "1 prompt/completion pairs truncated (1 dropped" in warnings[0]
    rows = data.train + data.valid
    assert all(len(t) <= 64 for t, _ in rows)
    n_long = len(tokenizer.encode(long_text)) + 1
    # Pieces overlap by one token, and every token after the first is trained on exactly once.
    assert sum(int(m[1:].sum()) for t, m in rows if len(t) > 4) == n_long - 1


def test_pack_fills_whole_windows(tmp_path, tokenizer):
    examples = [encode_record({"text": p[:100]}, tokenizer, "x") for p in paragraphs(12)]
    rows = pack_rows(examples, 48)
    assert all(len(t) == 48 for t, _ in rows[:-1])
    assert sum(len(e[0]) for e in examples) - 1 == sum(int(m[1:].sum()) for _, m in rows)


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "not valid JSON"), ('{"txt": "a"}', "expected"), ('["a"]', "expected"), ('{"prompt": "a"}', "expected")],
)
def test_a_malformed_line_names_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(UserError, match=rf"train.jsonl:3: {message}"):
        load_data(tmp_path, tokenizer, max_seq_length=32)


def test_missing_training_file_is_a_clear_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="no train.jsonl or train.txt"):
        load_data(tmp_path, tokenizer, max_seq_length=32)


def test_txt_files_are_cut_into_blocks_and_one_file_holds_out_validation(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs(10)))
    data = load_data(path, tokenizer, max_seq_length=40)
    assert len(data.valid) >= 1 and len(data.train) > 5 * len(data.valid)
    assert all(len(t) == 40 for t, _ in data.train)


def test_batch_order_replays_from_any_position(tmp_path, tokenizer, data_dir):
    rows = load_data(data_dir, tokenizer, max_seq_length=32, on_warning=lambda _: None).train
    first = [np.array(b.inputs) for _, b in zip(range(40), iterate_train(rows, 2, 32, seed=3))]
    later = [np.array(b.inputs) for _, b in zip(range(15), iterate_train(rows, 2, 32, seed=3, start=25))]
    assert all(np.array_equal(a, b) for a, b in zip(first[25:], later))


# ---- use: load, fuse, export -------------------------------------------------------------------------

def test_load_with_adapter_path_equals_the_trained_model(small_converted, trained_adapters, ids):
    """The base with every saved update merged by hand, W + scale * (A B)^T, computes what load gives."""
    config = json.loads((trained_adapters / "adapter_config.json").read_text())
    saved = {k: np.array(v) for k, v in mx.load(str(trained_adapters / "adapters.safetensors")).items()}
    merged, _ = load(small_converted, layout="checkpoint")
    weights = dict(tree_flatten(merged.parameters()))
    for name in {k.rsplit(".", 1)[0] for k in saved}:  # h.1.attn.c_attn, ...
        a, b = saved[f"{name}.lora_a"], saved[f"{name}.lora_b"]
        weights[f"{name}.weight"] = mx.array(np.array(weights[f"{name}.weight"]) + config["lora"]["scale"] * (a @ b).T)
    merged.load_weights(list(weights.items()))
    adapted, _ = load(small_converted, adapter_path=trained_adapters)
    base, _ = load(small_converted)
    diff = np.abs(logits(adapted, ids) - logits(merged, ids)).max()
    print(f"adapters loaded vs merged by hand: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4 and np.abs(logits(adapted, ids) - logits(base, ids)).max() > 1e-3


def test_fuse_writes_a_model_with_the_same_logits(small_converted, trained_adapters, tmp_path, ids):
    unfused, _ = load(small_converted, adapter_path=trained_adapters)
    out = fuse(small_converted, trained_adapters, tmp_path / "fused")
    fused, _ = load(out)
    diff = np.abs(logits(fused, ids) - logits(unfused, ids)).max()
    print(f"fused directory vs adapters: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_export_hf_runs_in_transformers_with_our_logits(small_converted, trained_adapters, tmp_path, ids):
    from transformers import GPT2LMHeadModel

    ours, _ = load(small_converted, adapter_path=trained_adapters)
    out = fuse(small_converted, trained_adapters, tmp_path / "hf", export_hf=True)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    diff = np.abs(theirs - logits(ours, ids)).max()
    print(f"--export-hf: transformers vs ours, max |logits diff| = {diff:.3g}")
    assert diff < 1e-4
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "vocab.json", "merges.txt"}


def test_missing_adapter_file_is_a_clear_error_and_overwrites_nothing(small_converted, trained_adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((trained_adapters / "adapter_config.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="adapters.safetensors not found"):
        load(small_converted, adapter_path=broken)
    with pytest.raises(UserError, match="adapters.safetensors not found"):
        fuse(small_converted, broken, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---- the CLI -----------------------------------------------------------------------------------------

def test_cli_lora_fuse_and_generate(small_converted, data_dir, tmp_path):
    adapters, fused = tmp_path / "adapters", tmp_path / "fused"
    result = runner.invoke(app, ["lora", "--model", str(small_converted), "--data", str(data_dir), "--adapter-path",
                                 str(adapters), "--iters", "2", "--batch-size", "2", "--max-seq-length", "32",
                                 "--val-batches", "1", "--steps-per-report", "1", "--learning-rate", "1e-2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "step 2/2: train loss" in result.stdout and "validation loss" in result.stdout
    metrics = [json.loads(line) for line in (adapters / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_loss" in m] == [1, 2]
    assert all(k in metrics[-2] for k in ("learning_rate", "tokens_per_second", "peak_memory_gb"))
    result = runner.invoke(app, ["fuse", "--model", str(small_converted), "--adapter-path", str(adapters), "--out", str(fused)])
    assert result.exit_code == 0, result.output
    with_adapters = runner.invoke(app, ["generate", "-m", str(small_converted), "--adapter-path", str(adapters), "-p", "The", "-n", "8"])
    from_fused = runner.invoke(app, ["generate", "-m", str(fused), "-p", "The", "-n", "8"])
    assert with_adapters.exit_code == 0 and with_adapters.stdout == from_fused.stdout


def test_cli_errors_are_one_line(small_converted, data_dir, tmp_path):
    result = runner.invoke(app, ["lora", "-m", str(small_converted), "--data", str(data_dir), "--adapter-path",
                                 str(tmp_path / "a"), "--num-layers", "7"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --num-layers 7 is out of range: this model has 2 layers (blocks); pass 1 to 2, or leave it out to adapt them all"
    ]
    result = runner.invoke(app, ["generate", "-m", str(small_converted), "--adapter-path", str(tmp_path), "-p", "x"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "adapter_config.json not found" in result.stderr


def test_the_fused_head_loss_has_autograds_value_and_gradients(small_converted):
    from mlx.utils import tree_flatten

    from mlx_gpt2.lora.loss import loss_fn

    model, _ = load(small_converted)
    apply_lora(model, LoRASpec(num_layers=2))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    tokens = mx.random.randint(0, 50257, (2, 81))  # 160 targets: two 64-token slices and a ragged one
    mask = (mx.random.uniform(shape=(2, 80)) > 0.3).astype(mx.float32)
    results = []
    for fused in (False, True):
        loss_and_grad = nn.value_and_grad(model, lambda m, *a: loss_fn(m, *a, fused_head=fused))
        (loss, _), grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:], mask)
        results.append((loss.item(), dict(tree_flatten(grads))))
    (plain, g_plain), (fused, g_fused) = results
    diff = max(np.abs(np.array(g_plain[k]) - np.array(g_fused[k])).max() for k in g_plain)
    print(f"fused head loss: loss {fused:.6f} vs {plain:.6f}, max |gradient diff| {diff:.3g}")
    assert abs(fused - plain) < 1e-5 and diff < 1e-5
