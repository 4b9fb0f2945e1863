"""Read every tensor of a GPT-2 checkpoint directory, whatever layout the Hub left it in.

Safetensors come first (one file, or shards named by `model.safetensors.index.json`) and are read by
`mx.load`, lazily and in their own dtype. Only a directory without safetensors falls back to
`pytorch_model.bin` (or its shards). Those are pickles, and a pickle can run any code it names, so
they are read without torch by an unpickler that knows only how tensors are rebuilt and refuses every
other name. Keys come back exactly as stored: renaming them is the next step's job.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import mlx.core as mx
import numpy as np

from mlx_gpt2.errors import CheckpointError
from mlx_gpt2.fileio import parse_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)  # in order of preference


def read_tensors(directory: Path) -> dict[str, mx.array]:
    """Every tensor in a checkpoint directory, by its stored name; safetensors before .bin."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the folder that holds the checkpoint")
    readers: dict[str, Callable[[Path], dict[str, mx.array]]] = {
        SAFETENSORS: read_safetensors,
        SAFETENSORS_INDEX: lambda index: read_sharded(index, read_safetensors),
        TORCH_BIN: read_torch_bin,
        TORCH_BIN_INDEX: lambda index: read_sharded(index, read_torch_bin),
    }
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return _at_most_float32(readers[name](directory / name), directory)
    raise CheckpointError(
        f"no weights in {directory}: looked for {', '.join(WEIGHT_FILES)}; "
        "pass a GPT-2 checkpoint directory or a Hub repo id"
    )


# safetensors dtype names -> bytes per element (the format's own table).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: Path) -> dict[str, Any]:
    """Read and check a safetensors header before MLX sees the file.

    Every tensor's bytes must lie inside the file, match its shape and dtype exactly, and overlap no
    other tensor's: a header that lies about any of these would make a reader allocate or read past
    what the file holds.
    """
    truncated = f"{path} is truncated or not a safetensors file; re-download it"
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(truncated)
        header = parse_json(f.read(length), source=f"{path}'s header", hint="; re-download it")
    if not isinstance(header, dict):
        raise CheckpointError(truncated)
    data_size, spans = size - 8 - length, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_tensor_span(path, name, entry, data_size), name))
    spans.sort()
    for (begin, end, name), (next_begin, _, next_name) in zip(spans, spans[1:]):
        if next_begin < end:
            raise CheckpointError(f"{path}: tensors {name} and {next_name} overlap in the file; it is corrupt, re-download it")
    return header


def _tensor_span(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """(begin, end) byte offsets of one header entry, after checking them against its dtype and shape."""
    bad = f"{path}: the header entry of tensor {str(name)[:80]} is corrupt"
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{bad} (unknown dtype); re-download it")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and _all_natural(shape) and isinstance(offsets, list) and len(offsets) == 2
            and _all_natural(offsets)):  # fmt: skip
        raise CheckpointError(f"{bad} (shape or offsets); re-download it")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download it (tensor {str(name)[:80]} lies past its end)")
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]]:
        raise CheckpointError(f"{bad}: {end - begin} bytes for a {entry['dtype']} tensor of shape {shape}; re-download it")
    return begin, end


# safetensors dtypes numpy can view (bfloat16 travels as its uint16 bits).
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                 "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}  # fmt: skip


def _read_safetensors_as_float32(path: Path, header: dict[str, Any]) -> dict[str, mx.array]:
    """A safetensors file holding float64 tensors, read tensor by tensor with numpy; float64 becomes float32."""
    start = 8 + int.from_bytes(path.open("rb").read(8), "little")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {entry['dtype']}, which cannot be read beside float64 ones")
        begin = entry["data_offsets"][0]
        data = np.fromfile(path, dtype=_NUMPY_DTYPES[entry["dtype"]], count=math.prod(entry["shape"]), offset=start + begin)
        data = data.reshape(entry["shape"])
        if entry["dtype"] == "F64":
            data = data.astype(np.float32)
        tensors[name] = mx.view(mx.array(data), mx.bfloat16) if entry["dtype"] == "BF16" else mx.array(data)
    warnings.warn(f"{path} stores tensors in float64; they are read as float32")
    return tensors


def _at_most_float32(tensors: dict[str, mx.array], directory: Path) -> dict[str, mx.array]:
    """float64 weights as float32: MLX computes in float32 at most (float64 only on the CPU, slowly)."""
    wide = [name for name, t in tensors.items() if t.dtype == mx.float64]
    if wide:
        warnings.warn(f"{directory} stores {len(wide)} tensor(s) in float64; they are read as float32")
    return {name: t.astype(mx.float32) if t.dtype == mx.float64 else t for name, t in tensors.items()}


def read_safetensors(path: Path) -> dict[str, mx.array]:
    header = check_safetensors(path)
    if any(isinstance(e, dict) and e.get("dtype") == "F64" for e in header.values()):
        return _read_safetensors_as_float32(path, header)  # MLX's reader has no float64
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download it") from error


def read_sharded(index_path: Path, read_one: Callable[[Path], dict]) -> dict[str, mx.array]:
    """Read the shards an index names, and check each holds the tensors the index says it does."""
    weight_map = _weight_map(index_path)
    shards = list(dict.fromkeys(weight_map.values()))  # in index order, each once
    missing = [shard for shard in shards if not (index_path.parent / shard).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path} names shards that are not in {index_path.parent}: {', '.join(missing)}; "
            "re-download the checkpoint"
        )
    tensors: dict[str, mx.array] = {}
    for shard in shards:
        tensors.update(read_one(index_path.parent / shard))
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise CheckpointError(
            f"{index_path} lists {len(absent)} tensors its shards do not hold ({', '.join(absent[:5])}"
            f"{', ...' if len(absent) > 5 else ''}); re-download the checkpoint"
        )
    return tensors


def _weight_map(index_path: Path) -> dict[str, str]:
    index = parse_json(index_path.read_bytes(), source=str(index_path), hint="; re-download the checkpoint")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) and shard == Path(shard).name
        for name, shard in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path} has a malformed weight_map (it must map tensor names to file names in the "
            "same folder); re-download the checkpoint"
        )
    return weight_map


# ---- PyTorch .bin files, read without torch ----------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file
_LEGACY_PROTOCOL = 1001


class _StorageType(NamedTuple):
    """Stands in for torch.FloatStorage and kin: just the dtype of the bytes."""

    name: str
    dtype: np.dtype  # little-endian; bfloat16 travels as uint16 bits
    bfloat16: bool = False


_STORAGE_TYPES = {
    st.name: st
    for st in (
        _StorageType("FloatStorage", np.dtype("<f4")),
        _StorageType("DoubleStorage", np.dtype("<f8")),
        _StorageType("HalfStorage", np.dtype("<f2")),
        _StorageType("BFloat16Storage", np.dtype("<u2"), bfloat16=True),
        _StorageType("LongStorage", np.dtype("<i8")),
        _StorageType("IntStorage", np.dtype("<i4")),
        _StorageType("ShortStorage", np.dtype("<i2")),
        _StorageType("CharStorage", np.dtype("i1")),
        _StorageType("ByteStorage", np.dtype("u1")),
        _StorageType("BoolStorage", np.dtype("?")),
    )
}


class _StorageRef(NamedTuple):
    """A storage the pickle points at, by key; `offset` is non-zero only for legacy storage views."""

    key: str
    type: _StorageType
    offset: int = 0


class _TensorRef(NamedTuple):
    """What the pickle says a tensor is; it becomes an array once every storage has been read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_hooks_and_metadata) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2); the ignored arguments are autograd hooks."""
    shape_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    ints = (storage_offset, *size, *stride) if shape_ok else ()
    if not (isinstance(storage, _StorageRef) and shape_ok and _all_natural(ints)):
        raise pickle.UnpicklingError(f"bad tensor record: offset {storage_offset!r}, size {size!r}")
    return _TensorRef(storage, storage.offset + storage_offset, size, stride)


def _rebuild_parameter(data, _requires_grad, _hooks, *_state) -> _TensorRef:
    """Stands in for torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("bad parameter record")
    return data


def _all_natural(values) -> bool:
    return all(type(value) is int and value >= 0 for value in values)


# Every global a GPT-2 state dict's pickle needs, and nothing that can run code.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into _TensorRefs; any other global is refused, never imported."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, tuple[_StorageType, int]] = {}  # key -> (type, element count)

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"refusing to load {self.path}: its pickle asks for {module}.{name}, which is not a "
                "tensor; this file may be malicious, use the model's safetensors instead"
            )
        return allowed

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage type, key, location, element count[, legacy view metadata])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _all_natural([numel])):
            raise pickle.UnpicklingError(f"bad storage record {str(pid)[:80]}")
        if self.storages.setdefault(key, (storage_type, numel)) != (storage_type, numel):
            raise pickle.UnpicklingError(f"storage {key!r} is declared twice, differently")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(key, storage_type)
        if not (isinstance(view, tuple) and len(view) == 3 and _all_natural(view[1:])):
            raise pickle.UnpicklingError(f"bad storage view {str(view)[:80]}")
        return _StorageRef(key, storage_type, offset=view[1])


def read_torch_bin(path: Path) -> dict[str, mx.array]:
    """A torch.save'd state dict, read as data: storages from the file, never code from the pickle."""
    try:
        if zipfile.is_zipfile(path):
            refs, storages = _read_torch_zip(path)
        else:
            refs, storages = _read_torch_legacy(path)
        return {name: _to_mx(ref, storages, path) for name, ref in refs.items()}
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, IndexError,
            AttributeError, TypeError, ValueError, MemoryError, RecursionError, OverflowError) as error:  # fmt: skip
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(error).__name__}: {error}); "
            "re-download it"
        ) from error


def _read_torch_zip(path: Path) -> tuple[dict[str, _TensorRef], dict[str, np.ndarray]]:
    """torch >= 1.6: <archive>/data.pkl, <archive>/data/<key> per storage, <archive>/byteorder."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip but not a torch.save checkpoint; re-download it")
        root = pickles[0].removesuffix("data.pkl")
        order = "<"
        if f"{root}byteorder" in archive.namelist():
            order = ">" if archive.read(f"{root}byteorder").strip() == b"big" else "<"
        size = path.stat().st_size
        if any(info.file_size > size for info in archive.infolist()):  # a compressed member can claim any size
            raise CheckpointError(f"{path} holds members larger than the file itself; it is not a torch.save checkpoint")
        unpickler = _TensorUnpickler(io.BytesIO(archive.read(pickles[0])), path)
        refs = _state_dict(unpickler.load(), path)
        storages = {
            key: _storage_array(archive.read(f"{root}data/{key}"), storage_type, numel, order)
            for key, (storage_type, numel) in unpickler.storages.items()
        }
    return refs, storages


def _read_torch_legacy(path: Path) -> tuple[dict[str, _TensorRef], dict[str, np.ndarray]]:
    """torch < 1.6: magic, protocol, sys info, the state dict, storage keys, then each storage raw."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        header = [_plain_unpickle(file, path) for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not isinstance(header[2], dict):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint; re-download it")
        order = "<" if header[2].get("little_endian", True) else ">"
        unpickler = _TensorUnpickler(file, path)
        refs = _state_dict(unpickler.load(), path)
        keys = _plain_unpickle(file, path)
        if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
            raise CheckpointError(f"{path} lists storages its tensors do not use; re-download it")
        storages = {}
        for key in keys:  # each: element count (int64), then the elements
            storage_type, numel = unpickler.storages[key]
            count = int(np.frombuffer(file.read(8), dtype=f"{order}i8")[0])
            if count != numel or numel * storage_type.dtype.itemsize > size - file.tell():
                raise CheckpointError(f"{path} has a storage of the wrong size; re-download it")
            data = file.read(numel * storage_type.dtype.itemsize)
            storages[key] = _storage_array(data, storage_type, numel, order)
    return refs, storages


def _plain_unpickle(file, path: Path) -> Any:
    """The legacy header and storage-key pickles: plain data, under the same allow-list."""
    return _TensorUnpickler(file, path).load()


def _state_dict(obj: Any, path: Path) -> dict[str, _TensorRef]:
    if not (isinstance(obj, dict) and all(
        isinstance(name, str) and isinstance(ref, _TensorRef) for name, ref in obj.items()
    )):  # fmt: skip
        raise CheckpointError(
            f"{path} does not hold a flat state dict of tensors; save model.state_dict() instead"
        )
    return dict(obj)


def _storage_array(data: bytes, storage_type: _StorageType, numel: int, order: str) -> np.ndarray:
    dtype = storage_type.dtype.newbyteorder(order)
    if len(data) != numel * dtype.itemsize:
        raise ValueError(f"a storage holds {len(data)} bytes where {numel * dtype.itemsize} were expected")
    return np.frombuffer(data, dtype=dtype).astype(storage_type.dtype, copy=False)


def _to_mx(ref: _TensorRef, storages: dict[str, np.ndarray], path: Path) -> mx.array:
    storage = storages[ref.storage.key]
    if math.prod(ref.size) > storage.size:
        # Only zero or overlapping strides make a tensor larger than its storage: a 642-byte file could
        # otherwise ask for a 20000 x 20000 copy. No GPT-2 checkpoint stores such a view.
        raise CheckpointError(
            f"{path} has a tensor of shape {ref.size} over a storage of {storage.size} elements; "
            "the file is corrupt or hostile, use the model's safetensors"
        )
    if 0 in ref.size:
        array = np.empty(ref.size, dtype=storage.dtype)
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= storage.size:
            raise CheckpointError(f"{path} has a tensor that reaches past its storage; re-download it")
        strides = tuple(s * storage.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :], shape=ref.size, strides=strides, writeable=False
        )
        array = view if view.flags.c_contiguous else view.copy()  # copy() keeps 0-d tensors 0-d
    if ref.storage.type.bfloat16:
        return mx.view(mx.array(array), mx.bfloat16)  # numpy has no bfloat16: carry the bits
    return mx.array(array)
