"""What the routes share: the served model, its limits, and the request handling that is not HTTP.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (the legacy API in full: echo, logprobs,
n, best_of, token-id prompts), POST /v1/chat/completions, POST /tokenize and /detokenize (llama.cpp's
field names; vLLM's are accepted too), GET /tokenizer_info (what lm-eval's remote tokenizer reads). Every
error is `{"error": {"message", "type", "param", "code"}}` with its status; nothing answers a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import UserError
from ..generation.constrained import Constraint
from ..generation.continuous import PromptScores, Sequence
from ..generation.core import encode_prompt
from ..model import GPT2
from ..tokenizer import Tokenizer
from .chat import ChatTemplate
from .protocol import BadRequest, Completion
from .runs import Choice, Run, legacy_logprobs
from .scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What `mlx-gpt2 serve` was told: the model's name, the key, and the limits on requests."""

    model_id: str
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_tokens_limit: int = 1024
    max_body_bytes: int = 8 * 2**20
    drain_seconds: float = 30.0  # on shutdown, how long requests in flight may take to finish


def error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Server:
    """The model, its tokenizer and scheduler, and what every route needs of them."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, options: ServeOptions, scheduler: Scheduler,
                 template: ChatTemplate) -> None:  # fmt: skip
        self.model, self.tokenizer, self.options, self.scheduler = model, tokenizer, options, scheduler
        self.template, self.window = template, model.config.n_positions
        self.vocab_size = model.config.vocab_size
        # A token is at most this many bytes: a longer text cannot fit the window, whatever it says.
        self.max_prompt_bytes = self.window * max(len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size))

    async def read_body(self, request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        limit = self.options.max_body_bytes
        if size > limit:
            raise BadRequest(f"the request body is {size} bytes; this server takes at most {limit}", status=413)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BadRequest(f"the request body is over {limit} bytes, this server's limit", status=413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except RecursionError:
            raise BadRequest("the request body is nested too deeply") from None
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.options.model_id:
            raise BadRequest(f"the model {str(model)[:80]!r} does not exist here; this server runs {self.options.model_id!r}",
                             "model", status=404, code="model_not_found")  # fmt: skip
        return body

    async def tokenize(self, prompts: list[str | list[int]], max_tokens: int | None, *, scoring: bool = False) -> list[list[int]]:
        """Token ids of every prompt (text tokenized off the event loop), each checked against the window."""
        texts = [p for p in prompts if isinstance(p, str)]
        if any(len(t.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes for t in texts):
            raise BadRequest(f"the prompt is longer than this model's window of {self.window} tokens", "prompt",
                             code="context_length_exceeded")  # fmt: skip
        encode = lambda: [encode_prompt(self.tokenizer, p) for p in prompts]
        ids = await anyio.to_thread.run_sync(encode) if sum(map(len, texts)) > 20_000 else encode()
        for prompt in ids:
            room = self.window - len(prompt)
            if scoring and room >= 0:  # echo + logprobs: the prompt's scores are the answer; generate what fits
                continue
            if room < 0 or (max_tokens is not None and max_tokens > room):
                raise BadRequest(
                    f"the prompt is {len(prompt)} tokens and max_tokens {max_tokens}; this model's window holds "
                    f"{self.window} tokens in all", "prompt", code="context_length_exceeded",
                )
        return ids

    def start(self, request: Completion, ids: list[list[int]], *, chat: bool, stops: list[str]) -> Run:
        """Queue the request's sequences: `best_of` per prompt (each seeded apart when a seed is given)."""
        plan = [(index * request.n + k, prompt) for index, prompt in enumerate(ids) for k in range(request.best_of)]
        if len(plan) > self.scheduler.max_queue + self.scheduler.max_concurrency:
            raise BadRequest(f"this request needs {len(plan)} sequences (prompts x best_of); this server queues at most "
                             f"{self.scheduler.max_queue + self.scheduler.max_concurrency}", "prompt")  # fmt: skip
        seed = request.sampling.seed
        base = request.sampling
        if request.json_schema is not None:  # compiled once per request; each sequence gets its own matcher
            try:
                constraint = Constraint.of(self.tokenizer, json_schema=request.json_schema)
            except UserError as failure:
                raise BadRequest(str(failure), "response_format") from None
            base = dataclasses.replace(base, constraint=constraint)

        def make(position: int, prompt: list[int], emit) -> Sequence:
            # n samples of one seed would be n copies of one sample: sample k of a request draws from seed + k
            sampling = base if seed is None else dataclasses.replace(base, seed=(seed + position) % 2**64)
            return Sequence(prompt, self.tokenizer, max_tokens=self._max_tokens(request, prompt), sampling=sampling,
                            stop=request.stop + stops, top_logprobs=request.logprobs or 0,
                            prompt_logprobs=request.echo and request.logprobs is not None and not chat, emit=emit)  # fmt: skip

        run = Run(plan, make, per_prompt=request.best_of)
        self.scheduler.submit(run.sequences)
        return run

    def _max_tokens(self, request: Completion, prompt: list[int]) -> int:
        room = min(self.window - len(prompt), self.options.max_tokens_limit)
        return room if request.max_tokens is None else min(request.max_tokens, room)

    def usage(self, run: Run, ids: list[list[int]]) -> dict[str, Any]:
        prompt = sum(map(len, ids))
        completion = sum(len(c.tokens) for c in run.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": run.cached_tokens}}  # fmt: skip

    def completion_choice(self, request: Completion, choice: Choice, index: int) -> dict[str, Any]:
        prompt_text = self.tokenizer.decode(choice.prompt_ids) if request.echo else ""
        return {"text": prompt_text + choice.text, "index": index, "finish_reason": choice.finish,
                "logprobs": self.completion_logprobs(request, choice)}  # fmt: skip

    def completion_logprobs(self, request: Completion, choice: Choice) -> dict[str, list] | None:
        if request.logprobs is None:
            return None
        ids, logprobs, tops = choice.tokens, list(choice.logprobs), list(choice.tops)
        if request.echo:  # the prompt's tokens first; text_offset counts characters from the prompt's start
            prompt = choice.prompt or PromptScores([None] * len(choice.prompt_ids), [None] * len(choice.prompt_ids))
            return legacy_logprobs(self.tokenizer, choice.prompt_ids + ids, prompt.logprobs + logprobs, prompt.top + tops)
        start = len(self.tokenizer.decode(choice.prompt_ids))
        return legacy_logprobs(self.tokenizer, ids, logprobs, tops, start)


def best(request: Completion, choices: list[Choice]) -> list[Choice]:
    """Of each prompt's best_of completions, the n with the highest log-probability per token."""
    if request.best_of == request.n:
        return choices
    chosen = []
    for start in range(0, len(choices), request.best_of):
        group = sorted(choices[start : start + request.best_of], key=lambda c: -c.mean_logprob())
        chosen += group[: request.n]
    return chosen


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


__all__ = ["Server", "ServeOptions", "best", "error", "new_id", "now"]
