"""Token ids against two independent references (tiktoken's own `gpt2`, transformers' GPT-2 tokenizer),
both built offline from the real GPT-2 BPE files; and the streaming detokenizer's exactness."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
from pydoc_data.topics import topics

from mlx_gpt2.errors import UserError
from mlx_gpt2.tokenizer import ENDOFTEXT, MERGES_HEADER, Tokenizer, bytes_to_token, bytes_to_unicode

from checkpoints import TOKENIZER_DIR as BPE_DIR  # the BPE files shipped in the package
# tiktoken caches its downloads under the sha1 of these URLs (tiktoken/load.py: read_file_cached).
TIKTOKEN_URLS = {
    "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
PYDOC_TEXT = "\n\n".join(topics[key] for key in sorted(topics))

HARD_CASES = {
    "empty": "",
    "plain": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "contractions": "I'm sure you're right: we'll see, they've won, he'd go, it's 'S 'LL don't O'Neil's",
    "numbers": "1234567890 3.14159 -42 1,000,000 0x1F 2024-01-01T12:00 1e-9 ١٢٣ ½",
    "emoji": "👍 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 🏳️‍🌈 ❤️ 🧑🏿‍🚀!",
    "cjk": "日本語のテキスト。中文，繁體字 한국어 テスト",
    "accents": "café naïve Zoë Ångström façade Æsir",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 \u0915\u094d\u0937",
    "scripts": "Привет мир שלום مرحبا नमस्ते ไทย Ελληνικά",
    "spaces": "a  b   c    d",
    "space_newlines": "   \n\n  ",
    "tabs_newlines": "\t\tindented\n\tcode\n\n\n  \n",
    "leading_trailing": "   leading and trailing   ",
    "crlf": "line one\r\nline two\r\n\r\n",
    "only_spaces": " " * 50,
    "odd_whitespace": "a\u00a0b\u3000c\u2028d\x0b\x0ce\u2003f\u0085g",
    "control": "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "code": "def f(x):\n    return x**2  # square\n\nprint(f(3))  # → 9\n",
    "endoftext": f"before{ENDOFTEXT}after",
    "endoftext_twice": f"{ENDOFTEXT}{ENDOFTEXT} {ENDOFTEXT} \n{ENDOFTEXT}\n",
    "endoftext_partial": "<|endoftext| <|endoftext <endoftext|>",
    "symbols": "!@#$%^&*()_+-=[]{}|;':\",./<>?`~ ... —–‐ ‘’ “” «»",
    "long_word": "Donaudampfschifffahrtsgesellschaftskapitänskajüte" * 3,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding the real vocab.json and merges.txt, as a Hub snapshot does."""
    assert (BPE_DIR / "vocab.json").is_file(), f"GPT-2 BPE files not found in {BPE_DIR}"
    directory = tmp_path_factory.mktemp("gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(BPE_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def tiktoken_gpt2(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tiktoken.Encoding:
    """tiktoken's own `gpt2` encoding, served from a prefilled download cache instead of the network."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in TIKTOKEN_URLS.items():
        shutil.copy(model_dir / name, cache / hashlib.sha1(url.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """transformers' GPT-2 tokenizer from a directory (v5's GPT2TokenizerFast(vocab_file=...) gives no ids)."""
    import transformers
    directory = tmp_path_factory.mktemp("hf-gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(model_dir / name, directory / name)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return transformers.AutoTokenizer.from_pretrained(directory)


def hf_ids(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_same_ids(ours: list[int], reference: list[int], name: str) -> None:
    """Equal id lists, or a message with the first difference and the counts."""
    if ours == reference:
        return
    at = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    raise AssertionError(
        f"ids differ from {name} at position {at}: ours {ours[at:at + 8]} vs {reference[at:at + 8]} "
        f"({len(ours)} vs {len(reference)} tokens)"
    )


def test_pydoc_matches_both_references(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, hf_tokenizer
) -> None:
    ids = tok.encode(PYDOC_TEXT)
    assert_same_ids(ids, tiktoken_gpt2.encode(PYDOC_TEXT, allowed_special="all"), "tiktoken gpt2")
    assert_same_ids(ids, hf_ids(hf_tokenizer, PYDOC_TEXT), "transformers")
    assert len(ids) > 100_000
    assert tok.decode(ids) == PYDOC_TEXT
    print(f"OK, {len(ids)} tokens of Python's docs identical to tiktoken and transformers")


@pytest.mark.parametrize("text", HARD_CASES.values(), ids=HARD_CASES.keys())
def test_hard_cases_match_both_references(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, hf_tokenizer, text: str
) -> None:
    ids = tok.encode(text)
    assert_same_ids(ids, tiktoken_gpt2.encode(text, allowed_special="all"), "tiktoken gpt2")
    assert_same_ids(ids, hf_ids(hf_tokenizer, text), "transformers")
    assert tok.decode(ids) == text


def test_special_tokens_and_sizes(tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding) -> None:
    assert tok.vocab_size == 50257
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert tok.encode(f"a{ENDOFTEXT}b") == [64, 50256, 65]
    assert tok.encode(f"a{ENDOFTEXT}b", allowed_special={ENDOFTEXT}) == [64, 50256, 65]
    # Not allowed: the marker is ordinary text, as tiktoken's encode_ordinary has it.
    as_text = tok.encode(f"a{ENDOFTEXT}b", allowed_special=set())
    assert as_text == tiktoken_gpt2.encode_ordinary(f"a{ENDOFTEXT}b")
    assert 50256 not in as_text
    assert tok.decode([50256]) == ENDOFTEXT
    assert tok.id_to_bytes(50256) == ENDOFTEXT.encode()
    assert tok.id_to_bytes(220) == b" "
    assert isinstance(tok.encoding, tiktoken.Encoding)


def test_bad_arguments_say_what_is_allowed(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="allowed_special must be"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        tok.encode("x", allowed_special="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0\.\.50256"):
        tok.decode([50257])
    with pytest.raises(ValueError, match=r"0\.\.50256"):
        tok.id_to_bytes(50300)


def test_bytes_to_unicode_is_gpt2s_table() -> None:
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert bytes_to_token(" hello".encode()) == "Ġhello"


def tokenizer_json_dir(hf_tokenizer, tmp_path: Path, *, merges_as_strings: bool) -> Path:
    """A directory like mlx-lm's converted ones: tokenizer.json, no vocab.json or merges.txt."""
    hf_tokenizer.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = [" ".join(pair) for pair in pairs] if merges_as_strings else pairs
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("merges_as_strings", [False, True], ids=["pairs", "strings"])
def test_tokenizer_json_only_dir(
    tok: Tokenizer, hf_tokenizer, tmp_path: Path, merges_as_strings: bool
) -> None:
    directory = tokenizer_json_dir(hf_tokenizer, tmp_path / "model", merges_as_strings=merges_as_strings)
    from_json = Tokenizer.from_dir(directory)
    text = PYDOC_TEXT[:50_000] + "".join(HARD_CASES.values())
    assert_same_ids(from_json.encode(text), tok.encode(text), "the vocab.json tokenizer")
    assert from_json.vocab_size == tok.vocab_size and from_json.eos_token_id == tok.eos_token_id


def read_saved(directory: Path) -> tuple[dict[str, int], list[list[str]]]:
    lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == MERGES_HEADER
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    return vocab, [line.split(" ") for line in lines[1:] if line]


def test_save_round_trips(tok: Tokenizer, model_dir: Path, hf_tokenizer, tmp_path: Path) -> None:
    original = read_saved(model_dir)
    assert len(original[0]) == 50257 and len(original[1]) == 50000
    tok.save(tmp_path / "from_vocab")
    assert read_saved(tmp_path / "from_vocab") == original
    # The converted-directory case: vocab.json and merges.txt are rebuilt from tokenizer.json.
    Tokenizer.from_dir(tokenizer_json_dir(hf_tokenizer, tmp_path / "json", merges_as_strings=False)).save(
        tmp_path / "from_json"
    )
    assert read_saved(tmp_path / "from_json") == original
    assert sorted(p.name for p in (tmp_path / "from_json").iterdir()) == ["merges.txt", "vocab.json"]
    reloaded = Tokenizer.from_dir(tmp_path / "from_json")
    assert reloaded.encode(PYDOC_TEXT[:5000]) == tok.encode(PYDOC_TEXT[:5000])


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Every piece the streaming detokenizer returns for ids, finalize() last."""
    detokenizer = tok.detokenizer()
    pieces = [detokenizer.add_token(i) for i in ids] + [detokenizer.finalize()]
    assert detokenizer.text == "".join(pieces)
    return pieces


def assert_streams_exactly(tok: Tokenizer, ids: list[int]) -> None:
    pieces = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full, f"ids {ids}"
    if "\ufffd" not in full:
        # A piece holding U+FFFD would mean a character was split between two calls.
        assert not any("\ufffd" in piece for piece in pieces), f"ids {ids}: {pieces}"


@pytest.mark.parametrize("name", ["pydoc", "emoji", "cjk", "combining"])
def test_streaming_real_text(tok: Tokenizer, name: str) -> None:
    text = PYDOC_TEXT[:30_000] if name == "pydoc" else HARD_CASES[name]
    ids = tok.encode(text)
    assert_streams_exactly(tok, ids)
    assert "".join(stream(tok, ids)) == text


def test_streaming_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("👍")  # 3 tokens: the 4 UTF-8 bytes do not form a single token
    assert len(ids) > 1
    detokenizer = tok.detokenizer()
    assert [detokenizer.add_token(i) for i in ids] == [""] * (len(ids) - 1) + ["👍"]
    assert detokenizer.finalize() == "" and detokenizer.text == "👍"
    detokenizer.reset()
    assert detokenizer.text == ""
    detokenizer.add_token(ids[0])
    assert detokenizer.finalize() == "\ufffd" == tok.decode(ids[:1])


def test_streaming_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    # Single-byte tokens for every byte (0x80-0xFF are continuation and lead bytes: invalid alone), and
    # multi-byte tokens that are not valid UTF-8 by themselves (pieces of characters).
    byte_ids = [tok.encoding.encode_single_token(bytes([b])) for b in range(256)]
    high_byte_ids = byte_ids[0x80:]
    partial_ids = [i for i in range(tok.eos_token_id) if not is_utf8(tok.id_to_bytes(i))]
    assert len(partial_ids) > 100
    pools = [range(tok.vocab_size), byte_ids, high_byte_ids, partial_ids]
    for _ in range(3000):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randrange(0, 12))]
        assert_streams_exactly(tok, ids)
    for text in HARD_CASES.values():  # valid text, cut at a random token
        ids = tok.encode(text)
        assert_streams_exactly(tok, ids[: rng.randrange(0, len(ids) + 1)])


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_missing_files_raise_user_error(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")  # half of a pair is not enough
    with pytest.raises(UserError, match="vocab.json and merges.txt, or tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def tiny_vocab() -> dict[str, int]:
    """256 byte tokens in GPT-2's order, then merges "a b" -> 256, "ab c" -> 257, then <|endoftext|>."""
    vocab = {bytes_to_unicode()[b]: b for b in range(256)}
    return {**vocab, "ab": 256, "abc": 257, ENDOFTEXT: 258}


def test_tiny_vocab_with_added_token() -> None:
    vocab = {**tiny_vocab(), "<|pad|>": 259}
    tok = Tokenizer(vocab, [("a", "b"), ("ab", "c")])
    assert tok.encode("abc ab<|pad|>") == [257, ord(" "), 256, 259]
    assert tok.encode("<|pad|>", allowed_special={ENDOFTEXT}) == [ord(c) for c in "<|pad|>"]
    assert tok.vocab_size == 260 and tok.eos_token_id == 258


@pytest.mark.parametrize(
    ("vocab_change", "merges", "message"),
    [
        ({}, [("a", "b"), ("ab", "x")], r"merge 1 \('ab' 'x'\): \['abx'\] not in the vocab"),
        ({"ab": 257, "abc": 256}, [("a", "b"), ("ab", "c")], "not above the last merge's 257"),
        ({"ab": 258}, [("a", "b")], "share id 258"),
        ({ENDOFTEXT: None}, [], "'<|endoftext|>' is missing"),
    ],
    ids=["result-missing", "ids-out-of-merge-order", "shared-id", "no-endoftext"],
)
def test_inconsistent_files_raise_user_error(vocab_change: dict, merges: list, message: str) -> None:
    vocab = {t: i for t, i in {**tiny_vocab(), **vocab_change}.items() if i is not None}
    with pytest.raises(UserError, match=message):
        Tokenizer(vocab, merges, name="tiny")
