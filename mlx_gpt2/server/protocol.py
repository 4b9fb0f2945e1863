"""OpenAI's request bodies, checked field by field into what the generator takes.

Every problem is a `BadRequest` naming the field (`param`) and its allowed range, which the app answers with
a 400 and OpenAI's error object. The ranges are the command line's where both have the option; the limits
on sizes (stop strings, choices, max_tokens) are the server's own, so one request cannot hold it hostage.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from ..generation.sampling import SamplingOptions

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_CHOICES = 16  # n and best_of
MAX_LOGPROBS = 20
MAX_PROMPTS = 4096  # prompts in one request (the server's --max-queue bounds its sequences further)
GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing float32 logits by it overflows to -inf
ROLES = ("system", "developer", "user", "assistant")


class BadRequest(ValueError):
    """A request the server will not run: the message says what was wrong; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked /v1/completions (or chat) request, prompts not yet tokenized."""

    prompts: list[str | list[int]]
    max_tokens: int | None  # None: as many as the window holds (chat's default), capped by the server
    sampling: SamplingOptions
    stop: list[str]
    n: int
    best_of: int
    stream: bool
    echo: bool
    logprobs: int | None  # legacy completions: how many top tokens per position (0-20); chat: top_logprobs
    include_usage: bool
    json_schema: dict | None = None  # response_format's schema ({"type": "object"} for json_object)


def _shown(value: Any) -> str:
    """A client's value as the error message quotes it: its JSON-ish repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float | None, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high  # NaN fails too
    if not ok or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{name} must be a number in {interval}, got {_shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}], got {_shown(value)}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {_shown(value)}", name)
    return value


def parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters", "stop")
    return stops


def parse_logit_bias(value: Any, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id as a string": bias in [-100, 100]}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must map token ids (as strings) to biases", "logit_bias")
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias keys must be token ids, got {str(key)[:40]!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise BadRequest(f"logit_bias token ids must be in [0, {vocab_size}), got {token}", "logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise BadRequest(f"logit_bias values must be numbers in [-100, 100], got {_shown(amount)}", "logit_bias")
        bias[token] = float(amount)
    return bias


def parse_sampling(body: dict, vocab_size: int) -> SamplingOptions:
    """The sampling fields of a request: OpenAI's, and our extensions top_k, min_p, repetition_penalty."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    options = dict(
        temp=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0, vocab_size),
        min_p=_number(body, "min_p", 0.0, 0.0, 0.999999),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.01, 100.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=parse_logit_bias(body.get("logit_bias"), vocab_size),
        seed=_integer(body, "seed", None, 0, 2**64 - 1),
    )
    try:
        return SamplingOptions(**options)
    except UserError as error:
        raise BadRequest(str(error)) from None


def parse_prompt(value: Any, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of lists of ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and len(value) > MAX_PROMPTS and not all(_is_int(t) for t in value):
        raise BadRequest(f"prompt holds {len(value)} prompts; one request takes at most {MAX_PROMPTS}", "prompt")
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return [_checked_ids(value, vocab_size)]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
        return [_checked_ids(p, vocab_size) for p in value]
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of lists of ids", "prompt")


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"prompt holds token id {bad}; this model's token ids are 0..{vocab_size - 1}", "prompt")
    return ids


def parse_completion(body: dict, vocab_size: int, max_tokens_limit: int) -> Completion:
    """A /v1/completions body, checked."""
    if body.get("suffix") is not None:
        raise BadRequest("suffix is not supported: GPT-2 has no insertion mode", "suffix")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    best_of = _integer(body, "best_of", n, 1, MAX_CHOICES)
    stream = _flag(body, "stream")
    if best_of < n:
        raise BadRequest(f"best_of ({best_of}) must be at least n ({n})", "best_of")
    if stream and best_of > n:
        raise BadRequest("best_of cannot be streamed: the best completions are known only at the end", "best_of")
    return Completion(
        prompts=parse_prompt(body.get("prompt"), vocab_size),
        max_tokens=_integer(body, "max_tokens", 16, 0, max_tokens_limit), sampling=parse_sampling(body, vocab_size),
        stop=parse_stop(body.get("stop")), n=n, best_of=best_of, stream=stream, echo=_flag(body, "echo"),
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS), include_usage=_include_usage(body),
        json_schema=parse_response_format(body.get("response_format")),
    )


def parse_response_format(value: Any) -> dict | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}} -> the schema the output must follow."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                             "response_format")  # fmt: skip
        return schema
    raise BadRequest("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                     "{\"type\": \"json_schema\", \"json_schema\": {...}}", "response_format")  # fmt: skip


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return _flag(options, "include_usage")


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages: [{"role": system|developer|user|assistant, "content": text or [{"type": "text", ...}]}]."""
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must have a role among {', '.join(ROLES)}", "messages")
        content = message.get("content")
        if content is None and message["role"] == "assistant":  # a turn that only called tools: no text
            content = ""
        if isinstance(content, list):  # content parts: only text exists for GPT-2
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}].content parts must be text parts", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        messages.append({"role": message["role"], "content": content})
    return messages


def parse_chat(body: dict, vocab_size: int, max_tokens_limit: int) -> tuple[list[dict[str, str]], Completion]:
    """A /v1/chat/completions body, checked: the messages, and the request as a completion of them."""
    messages = parse_messages(body.get("messages"))
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit  # the newer name first; null means not given
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    wants_logprobs = _flag(body, "logprobs")
    if top is not None and not wants_logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    completion = Completion(
        prompts=[], max_tokens=_integer({"max_tokens": limit}, "max_tokens", None, 0, max_tokens_limit),
        sampling=parse_sampling(body, vocab_size), stop=parse_stop(body.get("stop")),
        n=(n := _integer(body, "n", 1, 1, MAX_CHOICES)), best_of=n, stream=_flag(body, "stream"), echo=False,
        logprobs=(top or 0) if wants_logprobs else None, include_usage=_include_usage(body),
        json_schema=parse_response_format(body.get("response_format")),
    )
    return messages, completion
