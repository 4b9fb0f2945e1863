"""read_tensors against transformers' own state dicts, in every layout; and the ways files go wrong."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import (
    BIN_LAYOUTS,
    LAYOUTS,
    UNTIED,
    expected_tensors,
    make_hf_model,
    write_checkpoint,
)
from mlx_gpt2.convert.read import read_tensors, read_torch_bin
from mlx_gpt2.errors import CheckpointError

# Small vocabulary: these tests are about files, not about the real tokenizer.
TINY = {"vocab_size": 1000}


@pytest.fixture(scope="module")
def tied():
    return make_hf_model(TINY, seed=0)


@pytest.fixture(scope="module")
def untied():
    return make_hf_model({**TINY, **UNTIED}, seed=1)


def as_numpy(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)


def assert_same_tensors(got: dict[str, mx.array], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected), "key sets differ"
    worst = 0.0
    for name, want in expected.items():
        have = as_numpy(got[name])
        assert have.shape == want.shape, f"{name}: shape {have.shape} != {want.shape}"
        worst = max(worst, float(np.max(np.abs(have - want), initial=0.0)))
    print(f"OK, {len(expected)} tensors, maxdiff = {worst}")
    assert worst == 0.0


@pytest.fixture(scope="module")
def real_vocab():
    return make_hf_model(seed=2)  # SMALL_CONFIG: the real 50257-token vocabulary


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head", ["tied", "untied", "real_vocab"])
def test_every_layout_reads_back_exactly(layout, head, request, tmp_path):
    model = request.getfixturevalue(head)
    directory = write_checkpoint(model, tmp_path / layout, layout, tokenizer=False)
    tensors = read_tensors(directory)
    assert_same_tensors(tensors, expected_tensors(model, layout))
    assert all(t.dtype == mx.float32 for t in tensors.values())
    assert ("lm_head.weight" in tensors) == (head == "untied")


@pytest.mark.parametrize("layout", ["hub", *BIN_LAYOUTS])
def test_hub_layouts_keep_their_buffers(layout, tied, tmp_path):
    tensors = read_tensors(write_checkpoint(tied, tmp_path, layout, tokenizer=False))
    n = tied.config.n_positions
    mask = np.tril(np.ones((n, n), np.float32)).reshape(1, 1, n, n)
    np.testing.assert_array_equal(np.array(tensors["h.1.attn.bias"]), mask)
    assert "wte.weight" in tensors and "transformer.wte.weight" not in tensors
    if layout in BIN_LAYOUTS:
        assert np.array(tensors["h.0.attn.masked_bias"]).shape == ()
        assert float(tensors["h.0.attn.masked_bias"].item()) == -1e4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bin", "hub"])
def test_half_precision_keeps_its_dtype(dtype, layout, tied, tmp_path):
    model = copy.deepcopy(tied).to(dtype)
    tensors = read_tensors(write_checkpoint(model, tmp_path, layout, tokenizer=False))
    want = mx.float16 if dtype == torch.float16 else mx.bfloat16
    assert tensors["h.0.attn.c_attn.weight"].dtype == want
    assert tensors["h.0.attn.bias"].dtype == mx.float32  # the buffers stay float32
    assert_same_tensors(tensors, expected_tensors(model, layout))


def odd_tensors() -> dict[str, torch.Tensor]:
    """Views with storage offsets and strides, shared storages, 0-d and empty tensors, other dtypes."""
    base = torch.randn(5, 7)
    return {
        "transposed": torch.arange(12, dtype=torch.float32).view(3, 4).t(),
        "slice": base[1:4, 2:6],
        "base": base,
        "step": torch.arange(10, dtype=torch.int64)[::3],
        "bf16_offset": torch.randn(12).to(torch.bfloat16)[3:7],
        "param": torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float16)),
        "scalar": torch.tensor(-1e4),
        "empty": torch.empty(0, 5),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pre-1.6"])
def test_bin_honours_offsets_strides_and_dtypes(zipped, tmp_path):
    state = odd_tensors()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    tensors = read_torch_bin(path)
    for name, tensor in state.items():
        want = tensor.detach()
        want = want.float().numpy() if want.dtype == torch.bfloat16 else want.numpy()
        np.testing.assert_array_equal(as_numpy(tensors[name]), want, err_msg=name)
        assert as_numpy(tensors[name]).shape == want.shape, name
    assert tensors["bf16_offset"].dtype == mx.bfloat16
    assert tensors["param"].dtype == mx.float16
    assert tensors["step"].dtype == mx.int64
    assert tensors["mask"].dtype == mx.bool_


# ---- malicious pickles --------------------------------------------------------------------------


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_torch_zip(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    return {
        "reduce-os.system": pickle.dumps({"wte.weight": RunsCommand(command)}, protocol=2),
        "opcodes-builtins.exec": (
            b"cbuiltins\nexec\n(Vimport os; os.system(" + repr(command).encode() + b")\ntR."
        ),
        "opcodes-subprocess": b"csubprocess\ncall\n((Vtouch\nV" + str(marker).encode() + b"\nltR.",
        # a legitimate global first, then the payload inside the state dict
        "after-a-real-global": (
            b"\x80\x02ccollections\nOrderedDict\n)R(Vh.0\ncposix\nsystem\n(V"
            + command.encode()
            + b"\ntRu."
        ),
    }


@pytest.mark.parametrize("name", list(hostile_pickles(Path("x"))))
@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(name, container, tmp_path):
    marker = tmp_path / "pwned"
    payload = hostile_pickles(marker)[name]
    directory = tmp_path / "ckpt"
    directory.mkdir()
    path = directory / "pytorch_model.bin"
    if container == "zip":
        write_torch_zip(path, payload)
    else:  # a pre-1.6 file: its first pickle is read before anything else
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="which is not a tensor; this file may be malicious") as info:
        read_tensors(directory)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickle's command ran"


def test_refusal_names_the_global(tmp_path):
    path = write_torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps(RunsCommand("true"), protocol=2))
    with pytest.raises(CheckpointError, match=r"asks for (posix|os|nt)\.system"):
        read_torch_bin(path)


def test_bin_without_a_state_dict_is_refused(tmp_path):
    path = write_torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match="flat state dict"):
        read_torch_bin(path)


# ---- broken and missing files -------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(tied, tmp_path):
    directory = write_checkpoint(tied, tmp_path, "hub", tokenizer=False)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file; re-download it") as info:
        read_tensors(directory)
    assert str(path) in str(info.value)


def test_garbage_safetensors_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_text("<html>Not Found</html>")
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pre-1.6"])
def test_truncated_bin_is_an_error(zipped, tied, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": tied.transformer.wte.weight.detach()}, path,
               _use_new_zipfile_serialization=zipped)  # fmt: skip
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_tensors(tmp_path)


def test_short_storage_in_zip_is_an_error(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.randn(100)}, good)
    bad = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item.filename, data[:40] if item.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        read_torch_bin(bad)


@pytest.mark.parametrize("layout", ["sharded", "bin_sharded"])
def test_missing_shard_is_named(layout, tied, tmp_path):
    directory = write_checkpoint(tied, tmp_path, layout, tokenizer=False)
    index_name = "model.safetensors.index.json" if layout == "sharded" else "pytorch_model.bin.index.json"
    shard = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))[1]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are not in .*{shard}"):
        read_tensors(directory)


def test_index_naming_a_tensor_no_shard_holds(tied, tmp_path):
    directory = write_checkpoint(tied, tmp_path, "sharded", tokenizer=False)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["h.9.attn.c_attn.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="h.9.attn.c_attn.weight"):
        read_tensors(directory)


def test_index_may_not_point_outside_its_folder(tmp_path):
    index = {"weight_map": {"wte.weight": "../elsewhere/model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="malformed weight_map"):
        read_tensors(tmp_path)


def test_empty_directory_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        read_tensors(tmp_path)
    message = str(info.value)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert name in message
    assert "\n" not in message


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_tensors(tmp_path / "nowhere")


def test_safetensors_win_over_bin(tied, untied, tmp_path):
    write_checkpoint(tied, tmp_path, "hub", tokenizer=False)
    write_checkpoint(untied, tmp_path, "bin", tokenizer=False)  # different weights, same folder
    assert_same_tensors(read_tensors(tmp_path), expected_tensors(tied, "hub"))


def test_torch_save_needs_only_allowed_globals(tmp_path):
    """The allow-list is what the unpickler sees: check a real torch.save uses nothing else."""
    path = tmp_path / "pytorch_model.bin"
    torch.save(odd_tensors(), path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    import pickletools

    used = set()
    ops = list(pickletools.genops(io.BytesIO(data)))
    for op, arg, _ in ops:
        if op.name == "GLOBAL":
            used.add(arg.replace(" ", "."))
    assert used <= {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.FloatStorage",
        "torch.HalfStorage",
        "torch.BFloat16Storage",
        "torch.LongStorage",
        "torch.BoolStorage",
    }, used
