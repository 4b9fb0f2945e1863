"""Training data: jsonl or txt -> token rows with a loss mask -> padded batches in a reproducible order.

A row is `(tokens, mask)`: `mask[i]` says whether token i is trained on, i.e. predicted from
`tokens[:i]`. Text trains on every token; a prompt/completion pair only on the completion (and the
<|endoftext|> after it). Rows never exceed `max_seq_length` tokens: longer text is cut into pieces that
overlap by one token, so every token is still predicted exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..tokenizer import Tokenizer

Row = tuple[np.ndarray, np.ndarray]  # (int32 tokens [n], bool mask [n])
SPLITS = ("train", "valid")
SUFFIXES = (".jsonl", ".txt")
PAD_MULTIPLE = 32  # pad batch lengths to a multiple of this, so the compiled step sees few shapes
VALID_FRACTION = 0.1  # held out of a single data file for validation


@dataclasses.dataclass
class Batch:
    inputs: mx.array  # [B, T] int32
    targets: mx.array  # [B, T] int32: inputs shifted left by one
    mask: mx.array  # [B, T] float32: 1 where the target is trained on

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


@dataclasses.dataclass
class Data:
    train: list[Row]
    valid: list[Row]

    def fingerprint(self) -> str:
        """A digest of the training rows: resuming on different data is worth a warning."""
        digest = hashlib.sha256()
        for tokens, mask in self.train:
            digest.update(tokens.tobytes() + mask.tobytes())
        return digest.hexdigest()[:16]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_data(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_seq_length: int,
    pack: bool = False,
    on_warning: Callable[[str], None] = warn,
) -> Data:
    """Read `path` (a directory with train/valid .jsonl or .txt, or one such file) into token rows."""
    train_file, valid_file = find_files(Path(path).expanduser())
    train = _read_rows(train_file, tokenizer, max_seq_length, pack, on_warning)
    if valid_file is not None:
        valid = _read_rows(valid_file, tokenizer, max_seq_length, pack, on_warning)
    else:  # one file: hold its tail out, so there is a validation loss to watch
        held = int(len(train) * VALID_FRACTION) if len(train) >= 2 else 0
        held = max(held, 1) if len(train) >= 2 else 0
        train, valid = train[: len(train) - held], train[len(train) - held :]
    if not train:
        raise UserError(f"{train_file} holds no training examples")
    return Data(train, valid)


def find_files(path: Path) -> tuple[Path, Path | None]:
    """(train file, valid file or None) for a data directory or a single file."""
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"--data {path}: expected a .jsonl or .txt file, or a directory holding train.jsonl")
        return path, None
    if not path.is_dir():
        raise UserError(f"--data {path} does not exist; pass a directory with train.jsonl (and valid.jsonl) or a file")
    found = {split: [path / f"{split}{s}" for s in SUFFIXES if (path / f"{split}{s}").is_file()] for split in SPLITS}
    if not found["train"]:
        raise UserError(f"--data {path} has no train.jsonl or train.txt (a valid.jsonl or valid.txt is optional)")
    for split, files in found.items():
        if len(files) > 1:
            raise UserError(f"--data {path} has both {files[0].name} and {files[1].name}; keep one")
    return found["train"][0], (found["valid"] or [None])[0]


def _read_rows(file: Path, tokenizer: Tokenizer, length: int, pack: bool, on_warning: Callable[[str], None]) -> list[Row]:
    examples = read_txt(file, tokenizer) if file.suffix == ".txt" else read_jsonl(file, tokenizer)
    if pack:
        return pack_rows(examples, length)
    rows: list[Row] = []
    split = truncated = dropped = 0
    for tokens, mask, is_pair in examples:
        if len(tokens) <= length:
            rows.append((tokens, mask))
        elif is_pair:  # a completion cut in pieces would lose its prompt: keep the start, say so
            truncated += 1
            if mask[:length].any():
                rows.append((tokens[:length], mask[:length]))
            else:
                dropped += 1
        else:
            split += file.suffix != ".txt"  # a .txt file is one long text: cutting it is the plan
            rows.extend(cut(tokens, mask, length))
    if split or truncated:
        note = f" ({dropped} dropped: the prompt alone fills the window)" if dropped else ""
        what = [f"{split} texts split into pieces"] * bool(split) + [f"{truncated} prompt/completion pairs truncated{note}"] * bool(truncated)
        on_warning(
            f"{file.name}: {split + truncated} of {len(examples)} examples are longer than --max-seq-length "
            f"{length} tokens: {', '.join(what)}"
        )
    return rows


def read_jsonl(file: Path, tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(tokens, mask, is_pair) per line; a malformed line raises naming the file and line number."""
    examples = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8").strip()
                record = json.loads(line) if line else None
            except UnicodeDecodeError:
                raise UserError(f"{where}: not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if record is not None:
                examples.append(encode_record(record, tokenizer, where))
    return examples


def encode_record(record: object, tokenizer: Tokenizer, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """{"text"} trains on every token; {"prompt","completion"} only on the completion and end of text."""
    eos = [tokenizer.eos_token_id]
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        tokens = tokenizer.encode(record["text"]) + eos
        return np.array(tokens, np.int32), np.ones(len(tokens), bool), False
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        # Encoded separately, so the boundary is exact: begin the completion with a space if words should.
        prompt = tokenizer.encode(record["prompt"])
        completion = tokenizer.encode(record["completion"]) + eos
        mask = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
        return np.array(prompt + completion, np.int32), mask, True
    shown = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise UserError(f'{where}: expected {{"text": str}} or {{"prompt": str, "completion": str}}, got {shown}')


def read_txt(file: Path, tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """A whole .txt file as one text, ended by <|endoftext|>."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        return []
    tokens = tokenizer.encode(text) + [tokenizer.eos_token_id]
    return [(np.array(tokens, np.int32), np.ones(len(tokens), bool), False)]


def cut(tokens: np.ndarray, mask: np.ndarray, length: int) -> list[Row]:
    """Pieces of at most `length` tokens overlapping by one: the first token of a piece is context only."""
    rows = []
    for start in range(0, max(len(tokens) - 1, 1), length - 1):
        piece_mask = mask[start : start + length].copy()
        if start > 0:
            piece_mask[0] = False  # the previous piece already trained on it
        if len(piece_mask) >= 2:
            rows.append((tokens[start : start + length], piece_mask))
    return rows


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray, bool]], length: int) -> list[Row]:
    """Concatenate every example (each ends with <|endoftext|>) and cut the stream into full windows."""
    if not examples:
        return []
    tokens = np.concatenate([e[0] for e in examples])
    mask = np.concatenate([e[1] for e in examples])
    return cut(tokens, mask, length)


def batch_order(n_rows: int, batch_size: int, *, seed: int, epoch: int, lengths: np.ndarray) -> list[np.ndarray]:
    """The row indices of each batch of one epoch; a function of (seed, epoch) only, so resuming can replay it.

    Rows are shuffled, sorted by length within groups of 16 batches (less padding), then batches shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_rows)
    group = 16 * batch_size
    order = np.concatenate([g[np.argsort(lengths[g], kind="stable")] for g in np.split(order, range(group, n_rows, group))])
    batches = [order[i : i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(rows: list[Row], max_seq_length: int) -> Batch:
    """Pad rows to a common length (a multiple of PAD_MULTIPLE, plus one for the shift)."""
    longest = max(len(t) for t, _ in rows)
    width = min(max_seq_length, 1 + PAD_MULTIPLE * -(-(longest - 1) // PAD_MULTIPLE))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (t, m) in enumerate(rows):
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    # [B, width] -> inputs [B, width - 1], targets [B, width - 1]
    return Batch(mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask[:, 1:]))


def iterate_train(
    rows: list[Row], batch_size: int, max_seq_length: int, *, seed: int, start: int = 0
) -> Iterator[Batch]:
    """Training batches forever, epoch after epoch, beginning at batch number `start` (for resuming)."""
    if len(rows) < batch_size:
        raise UserError(f"the training data has {len(rows)} rows, fewer than --batch-size {batch_size}; lower it or add data")
    lengths = np.array([len(t) for t, _ in rows])
    per_epoch = len(rows) // batch_size
    epoch, index = divmod(start, per_epoch)
    while True:
        for indices in batch_order(len(rows), batch_size, seed=seed, epoch=epoch, lengths=lengths)[index:]:
            yield make_batch([rows[i] for i in indices], max_seq_length)
        epoch, index = epoch + 1, 0


def iterate_valid(rows: list[Row], batch_size: int, max_seq_length: int, num_batches: int) -> Iterator[Batch]:
    """Validation batches in file order; `num_batches` -1 means all of them."""
    stop = len(rows) if num_batches < 0 else min(len(rows), num_batches * batch_size)
    for i in range(0, stop, batch_size):
        yield make_batch(rows[i : i + batch_size], max_seq_length)
