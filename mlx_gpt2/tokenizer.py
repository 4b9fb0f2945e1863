"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline from a model directory's files.

A directory holds either `vocab.json` + `merges.txt` (the Hub's GPT-2 layout) or only `tokenizer.json`
(what `mlx_lm.convert` writes). Both become the same `tiktoken.Encoding`; `save` always writes the first
layout so converted directories carry it.
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import tiktoken

from mlx_gpt2.errors import UserError
from mlx_gpt2.fileio import parse_json, write_text_atomic

# tiktoken's current "gpt2" pattern (r50k_pat_str in tiktoken_ext/openai_public.py): GPT-2's original
# pre-tokenizer with possessive quantifiers and `\s++$`. The original form (`\s+(?!\S)|\s+`) backtracks
# through a trailing run of whitespace and the regex engine gives up on a run of ~100,000 spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
# GPT-2's vocab.json and merges.txt (OpenAI's encoder.json and vocab.bpe, MIT; see its LICENSE file), shipped
# so that tests and checkpoints without tokenizer files need nothing from the network.
BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "gpt2"
# A GPT-2 vocabulary has one token no merge builds (<|endoftext|>); fine-tunes add a few. Thousands mean a
# merges file cut short: the tokens past the cut would silently become "special" and take wrong ids.
MAX_SPECIAL_TOKENS = 256

Merge = tuple[str, str]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: vocab files spell every byte as one character."""
    # Printable Latin-1 bytes stand for themselves; the rest are shifted past 255 in byte order.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept}
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes | None:
    """The bytes a vocab token spells, or None if it uses a character outside GPT-2's byte table."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[char] for char in token)
    except KeyError:
        return None


def bytes_to_token(data: bytes) -> str:
    """The vocab spelling of `data` (inverse of `token_to_bytes`)."""
    table = bytes_to_unicode()
    return "".join(table[byte] for byte in data)


class Tokenizer:
    """GPT-2 byte-level BPE: ids equal those of tiktoken's `gpt2` and transformers' GPT-2 tokenizer."""

    def __init__(self, vocab: dict[str, int], merges: list[Merge], *, name: str = "gpt2", source: str | None = None) -> None:
        """Build from a token -> id map and the merges in rank order; raises UserError if they disagree.

        `source` names the files in messages (default: `name`).
        """
        mergeable_ranks, special_tokens = _split_vocab(vocab, merges, source=source or name)
        self._vocab = dict(vocab)
        self._merges = list(merges)
        self.encoding = tiktoken.Encoding(
            name, pat_str=GPT2_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.eos_token_id: int = special_tokens[ENDOFTEXT]
        # GPT-2 has no separate begin-of-text token: documents are separated by <|endoftext|>.
        self.bos_token_id: int = self.eos_token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from `vocab.json` + `merges.txt`, or else from `tokenizer.json`."""
        directory = Path(path)
        if not has_tokenizer_files(directory):
            raise UserError(
                f"no GPT-2 tokenizer files in {directory}: expected vocab.json and merges.txt, "
                "or tokenizer.json (copy them from the model's Hub snapshot)"
            )
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab = _read_vocab(directory / "vocab.json")
            merges = _read_merges_txt(directory / "merges.txt")
            source = str(directory / "merges.txt")
        else:
            vocab, merges = _read_tokenizer_json(directory / "tokenizer.json")
            source = str(directory / "tokenizer.json")
        return cls(vocab, merges, name=f"gpt2-bpe:{directory}", source=source)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's own BPE (50257 tokens), from the files shipped inside this package."""
        return cls.from_dir(BUNDLED_DIR)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (50257 for GPT-2)."""
        return self.encoding.n_vocab

    def encode(self, text: str, *, allowed_special: Literal["all"] | set[str] = "all") -> list[int]:
        """Token ids of `text`; special tokens in `allowed_special` map to their ids, others are text."""
        if allowed_special != "all":
            unknown = set(allowed_special) - self.encoding.special_tokens_set
            if isinstance(allowed_special, str) or unknown:
                known = sorted(self.encoding.special_tokens_set)
                raise ValueError(
                    f"allowed_special must be 'all' or a subset of {known}; got {allowed_special!r}"
                )
        # disallowed_special=() makes non-allowed special strings plain text (as transformers does)
        # instead of tiktoken's default of raising.
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        try:
            return self.encoding.decode(list(ids), errors="replace")
        except KeyError as error:
            raise ValueError(f"{error.args[0]}; token ids are 0..{self.vocab_size - 1}") from None

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (possibly part of a UTF-8 character)."""
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            raise ValueError(f"unknown token id {token_id}; token ids are 0..{self.vocab_size - 1}") from None

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer over this vocabulary."""
        return StreamingDetokenizer(self)

    def save(self, directory: str | Path) -> None:
        """Write `vocab.json` and `merges.txt` (the Hub's GPT-2 layout) into `directory`, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_id = dict(sorted(self._vocab.items(), key=lambda item: item[1]))
        write_text_atomic(directory / "vocab.json", json.dumps(by_id, ensure_ascii=False) + "\n")
        lines = [MERGES_HEADER, *(f"{a} {b}" for a, b in self._merges)]
        write_text_atomic(directory / "merges.txt", "\n".join(lines) + "\n")


class StreamingDetokenizer:
    """Turns ids into text one token at a time without ever splitting a UTF-8 character.

    Everything `add_token` returns, followed by `finalize()`, equals `tokenizer.decode(ids)` exactly.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and pending bytes."""
        # Python's incremental UTF-8 decoder keeps only the trailing bytes that are still a valid prefix
        # of a character (at most 3), and emits everything else: complete characters, and U+FFFD once a
        # sequence is definitely invalid. It makes the same decisions as a one-shot decode of the whole
        # byte string, which is what makes the pieces add up to `decode(ids)` exactly.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def add_token(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", mid-character)."""
        piece = self._decoder.decode(self._tokenizer.id_to_bytes(token_id))
        if piece:
            self._pieces.append(piece)
        return piece

    def finalize(self) -> str:
        """Flush the pending bytes; an incomplete character at the end becomes U+FFFD."""
        piece = self._decoder.decode(b"", final=True)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """All text returned so far."""
        if len(self._pieces) > 1:
            # Join lazily so add_token stays O(1); keep the join so repeated reads are cheap.
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""


def _split_vocab(
    vocab: dict[str, int], merges: list[Merge], *, source: str
) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks (byte tokens and merge results) and special tokens (everything else).

    tiktoken merges by the rank of the merged bytes and returns ranks as ids, so ids must grow in merge
    order; for GPT-2 they do (256 byte tokens, then one id per merge). Every problem is reported at once.
    """
    problems = _id_problems(vocab)
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    problems += [f"byte token {t!r} is missing from the vocab" for t in byte_tokens if t not in vocab]
    mergeable = {token_to_bytes(t): vocab[t] for t in byte_tokens if t in vocab}
    last_id = -1
    for rank, (a, b) in enumerate(merges):
        result = a + b
        missing = [t for t in (a, b, result) if t not in vocab]
        if missing:
            problems.append(f"merge {rank} ({a!r} {b!r}): {missing} not in the vocab")
        elif token_to_bytes(result) is None:
            problems.append(f"merge {rank} ({a!r} {b!r}) is not spelled in GPT-2's byte alphabet")
        elif vocab[result] <= last_id:
            problems.append(
                f"merge {rank} ({a!r} {b!r}) has id {vocab[result]}, not above the last merge's {last_id}"
            )
        else:
            last_id = vocab[result]
            mergeable[token_to_bytes(result)] = last_id
    special = _special_tokens(vocab, set(mergeable.values()), problems)
    if len(special) > MAX_SPECIAL_TOKENS and not problems:
        raise UserError(
            f"{source}: {len(special)} of the vocabulary's {len(vocab)} tokens are built by none of the "
            f"{len(merges)} merges; the merges are cut short or belong to another vocabulary: re-download them"
        )
    if ENDOFTEXT not in special:
        problems.append(f"{ENDOFTEXT!r} is missing from the vocab")
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise UserError(f"{source}: vocab and merges disagree ({len(problems)} problems): {shown}")
    return mergeable, special


def _id_problems(vocab: dict[str, int]) -> list[str]:
    """Ids that are not non-negative integers, or that two tokens share."""
    bad = [f"token {t!r} has id {i!r}" for t, i in vocab.items() if type(i) is not int or i < 0]
    owners: dict[int, list[str]] = {}
    for token, token_id in vocab.items():
        owners.setdefault(token_id, []).append(token)
    return bad + [f"tokens {ts} share id {i}" for i, ts in owners.items() if len(ts) > 1]


def _special_tokens(vocab: dict[str, int], mergeable_ids: set[int], problems: list[str]) -> dict[str, int]:
    """Vocab entries BPE never builds (<|endoftext|>, added tokens), keyed by the text they stand for."""
    special: dict[str, int] = {}
    for token, token_id in vocab.items():
        if token_id in mergeable_ids:
            continue
        # A byte-level spelling ("Ġfoo") stands for its decoded text (" foo"); other tokens (with
        # characters outside the byte table, or bytes that are not UTF-8) stand for themselves.
        data = token_to_bytes(token)
        try:
            text = data.decode("utf-8") if data is not None else token
        except UnicodeDecodeError:
            text = token
        if text in special or not text:
            problems.append(f"special token {token!r} (id {token_id}) has empty or repeated text {text!r}")
        special[text] = token_id
    return special


def has_tokenizer_files(directory: Path) -> bool:
    """Whether `directory` holds vocab.json + merges.txt or tokenizer.json."""
    pair = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    return pair or (directory / "tokenizer.json").is_file()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError covers UnicodeDecodeError
        raise UserError(f"cannot read {path}: {error}") from None


def _read_object(path: Path) -> dict:
    data = parse_json(_read_text(path), source=str(path), hint="; re-download the tokenizer files")
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_object(path)
    bad = next((f"{t!r}: {i!r}" for t, i in vocab.items() if type(i) is not int or i < 0), None)
    if bad is not None:
        raise UserError(f"{path} maps tokens to non-negative integer ids, but holds {bad[:80]}; re-download it")
    return vocab


def _read_merges_txt(path: Path) -> list[Merge]:
    """Merges in rank order, one "a b" per line after an optional "#version" line."""
    lines = _read_text(path).split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    # Not strip(): tokens never hold a real space (the byte table spells it "Ġ"), but other whitespace
    # characters such as U+0085 could be tokens in a foreign vocab; only "\n" and trailing "\r" separate.
    return [_parse_merge(line.rstrip("\r"), path) for line in lines if line.rstrip("\r")]


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[Merge]]:
    """Vocab (added tokens included) and merges from a transformers fast-tokenizer file."""
    data = _read_object(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        found = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise UserError(f"{path}: expected a BPE model with a vocab, found {found!r}; re-download tokenizer.json")
    vocab = dict(model["vocab"])
    bad = next((f"{t!r}: {i!r}" for t, i in vocab.items() if type(i) is not int or i < 0), None)
    if bad is not None:
        raise UserError(f"{path}: model.vocab maps tokens to non-negative integer ids, but holds {bad[:80]}")
    added_tokens, merges = data.get("added_tokens") or [], model.get("merges") or []
    if not isinstance(added_tokens, list) or not isinstance(merges, list):
        raise UserError(f"{path}: added_tokens and model.merges must be lists; re-download tokenizer.json")
    used_ids = set(vocab.values())
    for added in added_tokens:
        if not (isinstance(added, dict) and isinstance(added.get("content"), str) and type(added.get("id")) is int
                and added["id"] >= 0):  # fmt: skip
            raise UserError(f"{path}: an added token is not {{\"content\": text, \"id\": integer}}: {str(added)[:80]}")
        # Added tokens usually repeat a vocab entry (<|endoftext|> is 50256 in both); add only new ones.
        if added["content"] not in vocab and added["id"] not in used_ids:
            vocab[added["content"]] = added["id"]
            used_ids.add(added["id"])
    return vocab, [_parse_merge(item, path) for item in merges]


def _parse_merge(item: str | list[str], path: Path) -> Merge:
    """One merge: "a b" (merges.txt, older tokenizer.json) or ["a", "b"] (newer tokenizer.json)."""
    parts = item.split(" ") if isinstance(item, str) else item
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise UserError(f"{path}: malformed merge {str(item)[:80]!r}; expected two tokens")
    return parts[0], parts[1]
