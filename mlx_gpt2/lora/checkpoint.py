"""A training run on disk: adapters, their config, optimizer and RNG state, step and data position.

Everything lives in the adapter directory, and every save writes the whole directory atomically
(a temporary sibling renamed into place), so an interrupted save leaves the previous checkpoint whole.
Metrics are appended to `metrics.jsonl` between saves so they can be watched while training runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import UserError
from ..fileio import atomic_directory, parse_json, read_json, write_json_atomic, write_text_atomic
from .layers import ADAPTER_CONFIG, ADAPTERS, read_adapter_config

OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainState:
    """Where a run stands after `step` optimizer updates."""

    step: int = 0
    batches_seen: int = 0  # micro-batches drawn from the data: the data position
    trained_tokens: int = 0
    rng: tuple[int, int] = (0, 0)  # MLX's global PRNG key, (high, low) 32-bit words
    data_fingerprint: str = ""
    window: list = dataclasses.field(default_factory=list)  # [loss, tokens] of each step since the last report


def rng_key() -> tuple[int, int]:
    high, low = (int(v) for v in mx.array(mx.random.state[0]).tolist())
    return high, low


def set_rng_key(key: tuple[int, int]) -> None:
    # mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff): any saved key can be put back this way.
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def save_checkpoint(
    out: Path, *, adapters: dict[str, mx.array], optimizer_state: dict, adapter_config: dict, state: TrainState
) -> None:
    """Write the whole run directory at once; the metrics written so far travel along."""
    with atomic_directory(out, force=True) as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS), adapters, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer_state)))
        write_json_atomic(tmp / ADAPTER_CONFIG, adapter_config)
        write_json_atomic(tmp / STATE, dataclasses.asdict(state))
        if (out / METRICS).is_file():
            shutil.copyfile(out / METRICS, tmp / METRICS)


def load_checkpoint(out: Path) -> tuple[dict[str, mx.array], dict[str, mx.array], dict[str, Any], TrainState]:
    """(adapters, flat optimizer state, adapter config, train state) of the run in `out`."""
    if not (out / STATE).is_file():
        raise UserError(f"--resume: {out} holds no checkpoint ({STATE} is missing); start without --resume")
    damaged = f"--resume: the checkpoint in {out} is incomplete or damaged"
    state = read_state(out / STATE, damaged)
    config = read_adapter_config(out)
    if not isinstance(config.get("train"), dict):
        raise UserError(f"{damaged}: {ADAPTER_CONFIG} has no \"train\" settings; start a new run")
    try:
        adapters = mx.load(str(out / ADAPTERS))
        optimizer = mx.load(str(out / OPTIMIZER))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{damaged} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return adapters, optimizer, config, state


def read_state(path: Path, damaged: str) -> TrainState:
    """state.json as a TrainState, every field of its type; anything else is one line saying it is damaged."""
    raw = read_json(path, missing="the run has no checkpoint yet")
    counts = ("step", "batches_seen", "trained_tokens")
    rng = raw.get("rng") if isinstance(raw, dict) else None
    ok = (
        isinstance(raw, dict) and set(raw) <= {f.name for f in dataclasses.fields(TrainState)}
        and all(type(raw.get(k, 0)) is int and raw.get(k, 0) >= 0 for k in counts)
        and isinstance(rng, list) and len(rng) == 2 and all(type(v) is int and 0 <= v < 2**32 for v in rng)
        and isinstance(raw.get("data_fingerprint", ""), str) and isinstance(raw.get("window", []), list)
    )  # fmt: skip
    if not ok:
        raise UserError(f"{damaged}: {path.name} does not hold a run's state; start a new run")
    return TrainState(**{**raw, "rng": tuple(rng)})


def has_checkpoint(out: Path) -> bool:
    return (out / STATE).is_file()


def checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint in `out`, or None if there is none (or it cannot be read)."""
    try:
        return read_state(out / STATE, "").step
    except UserError:
        return None


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """Every record of `metrics.jsonl`, in order (training lines have train_loss, validation lines val_loss)."""
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    return [parse_json(line, source=str(path)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(out: Path, step: int) -> None:
    """Drop records past `step`: a resumed run writes them again."""
    path = out / METRICS
    if path.is_file():
        kept = [json.dumps(r) for r in read_metrics(out) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

