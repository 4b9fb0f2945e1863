"""Constrained generation: a JSON Schema, a regular expression or a Lark grammar that the output must follow.

A `Constraint` is compiled once by llguidance (a grammar engine made for this; the `structured` extra),
against a tokenizer built from our own vocabulary and merges (the same tiktoken ranks, byte for byte). Its
`processor()` is a logits processor: before each token it sets every token the grammar cannot take next to
-inf, so any sampler, greedy or not, only ever picks a token that keeps the output valid. When the grammar
is complete only <|endoftext|> is left, so generation ends with finish reason "stop"; ending at max_tokens
("length") means the output may be incomplete.

The processor reads the history it is given (prompt + generated tokens) and brings its matcher there:
it consumes what is new and rolls back what is not its own (a rejected speculative draft, another beam's
history), so it works in every generator that takes logits processors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "grammar")
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}  # a small model's spaces never end


def _engine():
    try:
        import llguidance
    except ImportError:
        raise UserError("constrained generation needs llguidance: pip install 'mlx-gpt2[structured]'") from None
    return llguidance


@functools.lru_cache(maxsize=8)
def engine_tokenizer(tokenizer: Tokenizer):
    """llguidance's tokenizer over our tiktoken encoding (built once per tokenizer: about 0.3 s)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    _engine()
    return lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id)


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
    """What the output must be: `kind` is json_schema, regex or grammar (Lark); `grammar` the compiled form."""

    kind: str
    source: str
    grammar: str
    tokenizer: Tokenizer

    @classmethod
    def of(cls, tokenizer: Tokenizer, *, json_schema: str | Mapping[str, Any] | None = None, regex: str | None = None,
           grammar: str | None = None) -> Constraint | None:  # fmt: skip
        """The one constraint given (None if none); two at once, or one that does not compile, is a UserError."""
        given = {k: v for k, v in zip(KINDS, (json_schema, regex, grammar)) if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise UserError(f"give one constraint at a time, not {' and '.join(given)}")
        (kind, value), = given.items()
        ll = _engine()
        if kind == "json_schema":
            value = _schema(value)
            compiled = ll.LLMatcher.grammar_from_json_schema(value, defaults=COMPACT)
        elif kind == "regex":
            compiled = ll.LLMatcher.grammar_from_regex(_text(value, "regex"))
        else:
            compiled = ll.LLMatcher.grammar_from_lark(_text(value, "grammar"))
        error = ll.LLMatcher.validate_grammar(compiled, engine_tokenizer(tokenizer))
        if error:
            said = " ".join(line.strip() for line in error.strip().splitlines() if line.strip()) or "invalid"
            raise UserError(f"the {kind.replace('_', ' ')} does not compile: {said[:300]}")
        source = value if isinstance(value, str) else json.dumps(value)
        return cls(kind, source, compiled, tokenizer)

    def processor(self) -> ConstraintProcessor:
        """A fresh processor (one per sequence: it holds that sequence's place in the grammar)."""
        return ConstraintProcessor(self)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"the {what} must be a non-empty string")
    return value


def _schema(value: object) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise UserError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(value, Mapping):
        raise UserError("the JSON schema must be a JSON object")
    return dict(value)


class ConstraintProcessor:
    """(history ids, logits `[1, vocab]`) -> logits with every token the grammar forbids next at -inf."""

    def __init__(self, constraint: Constraint) -> None:
        ll = _engine()
        self.vocab_size = constraint.tokenizer.vocab_size
        self.matcher = ll.LLMatcher(engine_tokenizer(constraint.tokenizer), constraint.grammar, log_level=0)
        self.prompt: int | None = None  # the prompt's length: the first history it sees
        self.consumed: list[int] = []  # the generated tokens the matcher has taken

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        ids = history.tolist() if isinstance(history, mx.array) else list(history)
        if self.prompt is None:
            self.prompt = len(ids)
        if not self._follow(ids[self.prompt :]):
            return logits  # a history the grammar cannot produce (a draft about to be rejected): no mask
        allowed = self._allowed()
        return mx.where(mx.array(allowed)[None, : logits.shape[-1]], logits, mx.array(-mx.inf, logits.dtype))

    def _follow(self, generated: list[int]) -> bool:
        """Bring the matcher to `generated`: roll back what differs, take what is new; False if invalid."""
        same = len(self.consumed)
        if generated[:same] != self.consumed:  # only a rejected draft rewrites what was taken (rare)
            same = next(i for i, (a, b) in enumerate(zip(self.consumed, generated + [None] * same)) if a != b)
        if same < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - same)
            del self.consumed[same:]
        new = generated[same:]
        valid = self.matcher.validate_tokens(new) if new else 0
        if valid < len(new):
            if valid:
                self.matcher.consume_tokens(new[:valid])
                self.consumed += new[:valid]
            return False
        if new:
            self.matcher.consume_tokens(new)
            self.consumed += new
        return True

    def _allowed(self) -> np.ndarray:
        """`[vocab]` bools: the tokens the grammar takes next (only <|endoftext|> once it is complete)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()
