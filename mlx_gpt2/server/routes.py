"""The server's routes: each reads and checks its body, queues sequences, and answers OpenAI's objects.

Streaming answers are server-sent events (sse-starlette), one chunk per token and `data: [DONE]` at the
end, as OpenAI's clients read them. A client that goes away mid-request abandons its run: its sequences
leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from ..generation.continuous import PromptScores, Token
from .protocol import BadRequest, Completion, parse_chat, parse_completion
from .runs import Choice, ModelFailed, Run, chat_logprobs, legacy_logprobs, openai_finish
from .service import Server, best, error, new_id, now


def add_routes(app: FastAPI, server: Server) -> None:
    """Every route of the server, on `app`."""
    _add_info_routes(app, server)
    _add_token_routes(app, server)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.read_body(request)
        completion = parse_completion(body, server.vocab_size, server.options.max_tokens_limit)
        scoring = completion.echo and completion.logprobs is not None  # what evaluation harnesses send
        ids = await server.tokenize(completion.prompts, completion.max_tokens, scoring=scoring)
        run = server.start(completion, ids, chat=False, stops=[])
        if completion.stream:
            return _events(server, run, stream_completion(server, completion, run, ids))
        choices = await _finish(server, run, request)
        answer = [server.completion_choice(completion, c, i) for i, c in enumerate(best(completion, choices))]
        return _response("text_completion", server, answer, server.usage(run, ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await server.read_body(request)
        messages, completion = parse_chat(body, server.vocab_size, server.options.max_tokens_limit)
        try:
            prompt = server.template.render(messages)
        except Exception as failure:  # the checkpoint's own template raised (jinja2's errors and kin)
            raise BadRequest(f"the chat template failed on these messages: {str(failure)[:200]}", "messages") from None
        ids = await server.tokenize([prompt], completion.max_tokens)
        run = server.start(completion, ids, chat=True, stops=server.template.stops)
        if completion.stream:
            return _events(server, run, stream_chat(server, completion, run, ids))
        choices = await _finish(server, run, request)
        answer = [_chat_choice(server, completion, c, i) for i, c in enumerate(choices)]
        return _response("chat.completion", server, answer, server.usage(run, ids))


def _add_info_routes(app: FastAPI, server: Server) -> None:
    model_id = server.options.model_id
    card = {"id": model_id, "object": "model", "created": now(), "owned_by": "mlx-gpt2"}

    @app.get("/health")
    async def health():
        if not server.scheduler.alive:  # never expected: the model thread guards its own work
            return error(503, "the model thread has stopped; restart the server", kind="server_error")
        return {"status": "ok", **server.scheduler.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            return error(404, f"the model {name[:80]!r} does not exist here; this server runs {model_id!r}",
                         param="model", code="model_not_found")  # fmt: skip
        return card

    @app.get("/tokenizer_info")
    async def tokenizer_info():  # what lm-eval's remote tokenizer reads
        eos = server.tokenizer.decode([server.tokenizer.eos_token_id])
        return {"eos_token": eos, "bos_token": eos, "pad_token": None, "chat_template": server.template.source,
                "model_max_length": server.window, "vocab_size": server.vocab_size}  # fmt: skip


def _add_token_routes(app: FastAPI, server: Server) -> None:
    tokenizer = server.tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await server.read_body(request)
        text = body.get("content", body.get("prompt"))  # llama.cpp's name, vLLM's name
        if not isinstance(text, str):
            raise BadRequest("tokenize needs {\"content\": text}", "content")
        pieces = body.get("with_pieces", False)
        if not isinstance(pieces, bool):
            raise BadRequest("with_pieces must be true or false", "with_pieces")
        ids = await anyio.to_thread.run_sync(tokenizer.encode, text) if len(text) > 20_000 else tokenizer.encode(text)
        tokens = [{"id": t, "piece": tokenizer.decode([t])} for t in ids] if pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": server.window}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await server.read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadRequest("detokenize needs {\"tokens\": [token ids]}", "tokens")
        bad = next((t for t in ids if not 0 <= t < server.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside this model's 0..{server.vocab_size - 1}", "tokens")
        text = tokenizer.decode(ids)
        return {"content": text, "prompt": text}  # llama.cpp's name, vLLM's name


async def _finish(server: Server, run: Run, request: Request) -> list[Choice]:
    """Every choice of a non-streaming run; if the client goes away first, the run is abandoned."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        run.abandon(server.scheduler.cancel)

    watcher = asyncio.create_task(watch())
    try:
        return await run.finish()
    finally:
        watcher.cancel()
        if not all(c.finish for c in run.choices):
            run.abandon(server.scheduler.cancel)


def _response(kind: str, server: Server, choices: list[dict], usage: dict) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": new_id(prefix), "object": kind, "created": now(), "model": server.options.model_id,
            "choices": choices, "usage": usage}  # fmt: skip


def _chat_choice(server: Server, completion: Completion, choice: Choice, index: int) -> dict[str, Any]:
    logprobs = chat_logprobs(server.tokenizer, choice) if completion.logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": choice.text}, "logprobs": logprobs,
            "finish_reason": choice.finish}  # fmt: skip


def _events(server: Server, run: Run, chunks: AsyncIterator[dict]) -> EventSourceResponse:
    """Stream `chunks` as server-sent events; the run is abandoned if the client goes away."""
    async def send() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk)}
        except ModelFailed as failure:
            message = f"the model failed on this request ({failure}); the server goes on"
            yield {"data": json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})}
        finally:  # finished, failed, or cancelled because the client disconnected
            if not all(c.finish for c in run.choices):
                run.abandon(server.scheduler.cancel)
        yield {"data": "[DONE]"}

    # In-flight streams finish on shutdown (Ctrl-C) rather than being cut: uvicorn bounds the wait.
    return EventSourceResponse(send(), shutdown_grace_period=server.options.drain_seconds)


async def stream_completion(server: Server, completion: Completion, run: Run, ids: list[list[int]]) -> AsyncIterator[dict]:
    """The chunks of a streamed /v1/completions: the echoed prompt first (if asked), then each token's text."""
    model, created, cid = server.options.model_id, now(), new_id("cmpl")
    chunk = lambda choices: {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    offsets = {}  # choice index -> characters of prompt and completion so far (legacy text_offset)
    async for choice, event in run.events():
        if choice.index not in offsets:
            offsets[choice.index] = len(server.tokenizer.decode(choice.prompt_ids))
            if completion.echo:
                yield chunk([_echo_chunk(server, completion, choice)])
        if isinstance(event, PromptScores):
            continue
        start = offsets[choice.index]
        offsets[choice.index] = start + len(event.text)
        yield chunk([_token_chunk(server, completion, choice.index, event, start)])
    if completion.include_usage:
        yield {**chunk([]), "usage": server.usage(run, ids)}


def _echo_chunk(server: Server, completion: Completion, choice: Choice) -> dict[str, Any]:
    logprobs = None
    if completion.logprobs is not None:
        scores = choice.prompt or PromptScores([None] * len(choice.prompt_ids), [None] * len(choice.prompt_ids))
        logprobs = legacy_logprobs(server.tokenizer, choice.prompt_ids, scores.logprobs, scores.top)
    text = server.tokenizer.decode(choice.prompt_ids)
    return {"text": text, "index": choice.index, "logprobs": logprobs, "finish_reason": None}


def _token_chunk(server: Server, completion: Completion, index: int, event: Token, start: int) -> dict[str, Any]:
    logprobs = None
    if completion.logprobs is not None and event.token >= 0:
        logprobs = legacy_logprobs(server.tokenizer, [event.token], [event.logprob], [event.top], start)
    elif completion.logprobs is not None:
        logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    finish = openai_finish(event.finish)
    return {"text": event.text, "index": index, "logprobs": logprobs, "finish_reason": finish}


async def stream_chat(server: Server, completion: Completion, run: Run, ids: list[list[int]]) -> AsyncIterator[dict]:
    """The chunks of a streamed chat completion: the role, then content deltas, then the finish reason."""
    model, created, cid = server.options.model_id, now(), new_id("chatcmpl")
    chunk = lambda choices: {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": choices}  # fmt: skip
    for choice in run.choices:
        yield chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    async for choice, event in run.events():
        if not isinstance(event, Token):
            continue
        delta = {"content": event.text} if event.text else {}
        logprobs = None
        if completion.logprobs is not None and event.token >= 0:
            one = Choice(choice.index, [], tokens=[event.token], logprobs=[event.logprob], tops=[event.top])
            logprobs = chat_logprobs(server.tokenizer, one)
        finish = openai_finish(event.finish)
        yield chunk([{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
    if completion.include_usage:
        yield {**chunk([]), "usage": server.usage(run, ids)}

