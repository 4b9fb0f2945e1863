"""Training runs: learning on real text, exact stop-and-resume, Ctrl-C, NaN, QLoRA, full fine-tuning."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt2 import UserError, load
from mlx_gpt2.lora import LoRASpec, apply_lora, fuse, fuse_lora, read_metrics, train
from mlx_gpt2.quant.quantize import is_quantized
from test_lora import paragraphs, small_config, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    write_jsonl(root / "train.jsonl", [{"text": p[:300]} for p in paragraphs(24)])
    write_jsonl(root / "valid.jsonl", [{"text": p[:300]} for p in paragraphs(4, offset=24)])
    return root


def adapters(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def test_training_lowers_validation_loss_on_real_text(request, tmp_path):
    """A GPT-2 trained on Python's documentation, fine-tuned on the GPL: held-out GPL text gets likelier."""
    assert (Path(__file__).parent / "data" / "trained-small").is_dir(), "tests/data/trained-small is missing"
    model = request.getfixturevalue("trained_small_dir")
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": p} for p in paragraphs(40)])
    write_jsonl(tmp_path / "data" / "valid.jsonl", [{"text": p} for p in paragraphs(6, offset=40)])
    config = small_config(model, tmp_path / "data", tmp_path / "out", iters=8, batch_size=4, max_seq_length=32,
                          learning_rate=5e-4, steps_per_eval=8, val_batches=-1, dtype="float32")  # fmt: skip
    result = train(config, quiet=True)
    (_, before), (_, after) = result.val_losses[0], result.val_losses[-1]
    print(f"validation loss on the GPL: {before:.3f} -> {after:.3f}; training losses {np.round(result.losses, 2)}")
    assert after < before - 0.1


def test_stop_and_resume_ends_exactly_like_an_uninterrupted_run(small_converted, data_dir, tmp_path):
    # Dropout and gradient accumulation make the RNG key and the data position matter.
    options = dict(iters=4, dropout=0.1, grad_accum=2, steps_per_report=2, steps_per_eval=2, save_every=3, warmup=1)
    whole = train(small_config(small_converted, data_dir, tmp_path / "whole", **options), quiet=True)

    def stop_at_1(step: int, loss: float) -> None:
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(small_converted, data_dir, tmp_path / "split", **options), on_step=stop_at_1, quiet=True)
    assert json.loads((tmp_path / "split" / "state.json").read_text())["step"] == 1
    rest = train(small_config(small_converted, data_dir, tmp_path / "split", resume=True, **options), quiet=True)

    def losses(run: str) -> list[tuple]:
        return [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(tmp_path / run)]

    print(f"uninterrupted: {whole.losses}\nresumed at 1:  {rest.losses}")
    assert rest.losses == whole.losses[1:]
    assert losses("split") == losses("whole")
    a, b = adapters(tmp_path / "whole"), adapters(tmp_path / "split")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_micro_batches_train_exactly_like_one_pass_over_the_batch(small_converted, tmp_path):
    """Splitting each batch into passes of fewer rows changes memory, not the training (up to rounding).

    Rows of different lengths, with padding masked out, make a per-pass mean differ from the batch mean:
    the step must weight every token the same however the batch is split.
    """
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": p[: 60 + 37 * (i % 5)]} for i, p in enumerate(paragraphs(16))])
    runs = {}
    for rows in (4, 1, 3):
        config = small_config(small_converted, data, tmp_path / f"rows-{rows}", iters=3, batch_size=4,
                              micro_batch_size=rows, max_seq_length=48, warmup=0, val_batches=0)  # fmt: skip
        runs[rows] = (train(config, quiet=True).losses, adapters(tmp_path / f"rows-{rows}"))
    (losses, weights) = runs[4]
    for rows in (1, 3):
        other_losses, other = runs[rows]
        diff = max(np.abs(weights[k] - other[k]).max() for k in weights)
        print(f"micro-batches of {rows} rows vs one pass of 4: losses {other_losses} vs {losses}, max |adapter diff| {diff:.2g}")
        assert np.allclose(other_losses, losses, rtol=1e-5) and diff < 1e-5


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(small_converted, data_dir, tmp_path):
    def press_ctrl_c(step: int, loss: float) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with pytest.raises(KeyboardInterrupt):
        train(small_config(small_converted, data_dir, tmp_path / "run", iters=5), on_step=press_ctrl_c, quiet=True)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def _checkpoint_is_good(model_dir: Path, run: Path) -> bool:
    """Every saved adapter finite, and the model with them gives finite logits."""
    if not all(np.isfinite(w).all() for w in adapters(run).values()):
        return False
    lm, tokenizer = load(model_dir, adapter_path=run)
    return bool(mx.isfinite(lm(mx.array([tokenizer.encode("The license is free software")]))).all().item())


@pytest.mark.parametrize("learning_rate", [1e12, 1e30])
def test_a_diverged_run_stops_and_never_keeps_a_bad_checkpoint(small_converted, data_dir, tmp_path, learning_rate):
    """Weights of 3e30 are finite but their logits are not: such a checkpoint is refused, not kept."""
    run = tmp_path / "run"
    config = small_config(small_converted, data_dir, run, iters=8, learning_rate=learning_rate, grad_clip=None, save_every=1)
    with pytest.raises(UserError, match=r"training diverged: .*(nan|inf).*; stopped \((the checkpoint of step \d+ in .* is kept|no checkpoint was saved)\)"):
        train(config, quiet=True)
    if (run / "state.json").exists():
        assert _checkpoint_is_good(small_converted, run)
    if learning_rate == 1e30:  # the first step's weights already give inf: nothing was saved, and nothing blocks a rerun
        assert not (run / "state.json").exists() and not (run / "adapters.safetensors").exists()
        train(small_config(small_converted, data_dir, run, iters=1), quiet=True)
        assert _checkpoint_is_good(small_converted, run)


@pytest.mark.parametrize("option, value", [("learning_rate", 1e39), ("alpha", 1e39), ("scale", -1e39), ("seed", -1), ("seed", 2**64)])
def test_options_that_are_not_finite_float32_are_refused_up_front(small_converted, data_dir, tmp_path, option, value):
    name = "--" + option.replace("_", "-")
    with pytest.raises(UserError, match=f"{name} must be"):
        train(small_config(small_converted, data_dir, tmp_path / "run", **{option: value}), quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_one_step_run_that_diverges_exits_1_without_adapters(small_converted, data_dir, tmp_path):
    from typer.testing import CliRunner

    from mlx_gpt2.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["lora", "-m", str(small_converted), "--data", str(data_dir), "--adapter-path", str(run),
                                      "--iters", "1", "--learning-rate", "1e30", "--grad-clip", "0", "--save-every", "1",
                                      "--max-seq-length", "32", "--quiet"])  # fmt: skip
    assert result.exit_code == 1 and result.stderr.count("error:") == 1, result.output
    assert "training diverged" in result.stderr and not (run / "adapters.safetensors").exists()


def test_fuse_and_generate_refuse_adapters_that_are_not_finite(small_converted, data_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(small_converted, data_dir, run, iters=1), quiet=True)
    poisoned = {k: mx.full(v.shape, np.nan) if i == 0 else v for i, (k, v) in enumerate(mx.load(str(run / "adapters.safetensors")).items())}
    mx.save_safetensors(str(run / "adapters.safetensors"), poisoned)
    with pytest.raises(UserError, match="hold NaN or infinite values"):
        fuse(small_converted, run, tmp_path / "fused")
    with pytest.raises(UserError, match="hold NaN or infinite values"):
        load(small_converted, adapter_path=run)
    assert not (tmp_path / "fused").exists()


def test_a_new_run_never_overwrites_an_old_one_and_resume_keeps_the_options(small_converted, data_dir, tmp_path):
    out = tmp_path / "run"
    train(small_config(small_converted, data_dir, out, iters=1), quiet=True)
    before = (out / "adapters.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a training run; pass --resume"):
        train(small_config(small_converted, data_dir, out, iters=2), quiet=True)
    with pytest.raises(UserError, match=r"options differ from the checkpoint's \(rank 8 -> 4\)"):
        train(small_config(small_converted, data_dir, out, iters=2, rank=4, resume=True), quiet=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        train(small_config(small_converted, data_dir, tmp_path / "empty", resume=True), quiet=True)
    assert (out / "adapters.safetensors").read_bytes() == before


def test_gradient_checkpointing_computes_the_same_losses(small_converted, data_dir, tmp_path):
    plain = train(small_config(small_converted, data_dir, tmp_path / "a", iters=2, val_batches=0, grad_checkpoint=False), quiet=True)
    checkpointed = train(small_config(small_converted, data_dir, tmp_path / "b", iters=2, val_batches=0), quiet=True)
    print(f"losses without / with --grad-checkpoint: {plain.losses} / {checkpointed.losses}")
    assert np.allclose(plain.losses, checkpointed.losses, rtol=1e-5)


def test_qlora_trains_on_a_4_bit_base_and_fuses_with_dequantize(small_converted, data_dir, tmp_path, ids):
    out = tmp_path / "qlora"
    # The embedding stays float only to keep this test fast: 4-bit matmuls over the 50257-token head are slow on CPU.
    quantize = dict(bits=4, group_size=64, keep_embeddings=True)
    result = train(small_config(small_converted, data_dir, out, quantize=quantize, learning_rate=1e-2), quiet=True)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert json.loads((out / "adapter_config.json").read_text())["quantize"]["bits"] == 4
    qlora, _ = load(small_converted, adapter_path=out)  # quantized again, as in training
    assert is_quantized(qlora)
    base, _ = load(small_converted, quantize=quantize)
    expected = np.array(qlora(mx.array(ids)))
    assert np.abs(expected - np.array(base(mx.array(ids)))).max() > 1e-4  # the adapters do something
    fused, _ = load(fuse(small_converted, out, tmp_path / "float", dequantize=True))
    assert not is_quantized(fused) and "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    diff = np.abs(np.array(fused(mx.array(ids))) - expected).max()
    print(f"QLoRA fused with --dequantize vs unfused: max |logits diff| = {diff:.3g}")
    assert diff < 1e-3
    requantized, _ = load(fuse(small_converted, out, tmp_path / "q4"))
    assert is_quantized(requantized) and json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    # Quantized again, on the grid of the new weights: as close as quantizing the base itself is to float.
    float_base, _ = load(small_converted)
    yardstick = np.abs(np.array(base(mx.array(ids))) - np.array(float_base(mx.array(ids)))).max()
    assert np.abs(np.array(requantized(mx.array(ids))) - expected).max() < 2 * yardstick


def test_dequantize_also_turns_a_quantized_embedding_back_to_float(small_converted, ids):
    model, _ = load(small_converted, quantize=True)
    expected = np.array(model(mx.array(ids)))
    apply_lora(model, LoRASpec(num_layers=1))
    fuse_lora(model, dequantize=True)
    assert not is_quantized(model)
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() < 1e-3


def test_full_fine_tuning_trains_every_weight(small_converted, data_dir, tmp_path, ids):
    out = tmp_path / "full"
    train(small_config(small_converted, data_dir, out, full=True, iters=1, learning_rate=1e-3), quiet=True)
    base, _ = load(small_converted, layout="checkpoint")
    saved, before = adapters(out), {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    assert saved.keys() == before.keys()
    unchanged = [k for k in before if np.array_equal(saved[k], before[k])]
    assert not unchanged, f"one AdamW step left these weights as they were: {unchanged}"
    tuned, _ = load(small_converted, adapter_path=out)
    fused, _ = load(fuse(small_converted, out, tmp_path / "fused"))
    assert np.array_equal(np.array(tuned(mx.array(ids))), np.array(fused(mx.array(ids))))
