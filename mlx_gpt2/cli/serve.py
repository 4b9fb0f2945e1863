"""`serve`: the OpenAI-compatible server (the `server` extra: FastAPI, uvicorn, sse-starlette, jinja2)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import (
    DECODING,
    MODEL,
    command,
    dtype_option,
    model_option,
    revision_option,
)

SERVER, LIMITS, QUANTIZATION = "Server", "Limits", "Quantization"


def register(app: typer.Typer) -> None:
    command(app, "serve")(serve)


def serve(
    model: Optional[str] = model_option("Hub repo id or directory (default: gpt2, or the base --adapter-path was trained on).", default=None),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA adapters saved by `mlx-gpt2 lora`.", rich_help_panel=MODEL),
    model_id: Optional[str] = typer.Option(None, "--model-id", metavar="NAME", help="The model's name in the API (default: --model as given).", rich_help_panel=MODEL),
    dtype: Optional[str] = dtype_option(),
    revision: Optional[str] = revision_option(),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize on load (4 bits, group 64 unless told).", rich_help_panel=QUANTIZATION),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight: 2, 3, 4, 6 or 8 (implies --quantize).", rich_help_panel=QUANTIZATION),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Weights per scale: 32, 64 or 128 (implies --quantize).", rich_help_panel=QUANTIZATION),
    keep_embeddings: bool = typer.Option(False, "--keep-embeddings", help="Leave the token embedding / head in float.", rich_help_panel=QUANTIZATION),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Speculative decoding (requests then run one at a time).", rich_help_panel=DECODING),
    num_draft: int = typer.Option(3, "--num-draft", help="Tokens the draft model proposes per step (>= 1).", rich_help_panel=DECODING),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback wants --api-key.", rich_help_panel=SERVER),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port, printed at start).", rich_help_panel=SERVER),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLX_GPT2_API_KEY", help="Require Authorization: Bearer KEY (or set MLX_GPT2_API_KEY).", rich_help_panel=SERVER),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="On Ctrl-C, seconds requests in flight may take to finish.", rich_help_panel=SERVER),
    quiet: bool = typer.Option(False, "--quiet", help="No access log.", rich_help_panel=SERVER),
    max_concurrency: int = typer.Option(16, "--max-concurrency", help="Sequences decoded together in one batch.", rich_help_panel=LIMITS),
    max_queue: int = typer.Option(256, "--max-queue", help="Sequences that may wait for a slot; more get a 429.", rich_help_panel=LIMITS),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="The largest max_tokens a request may ask for.", rich_help_panel=LIMITS),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="The largest request body, in MB; more gets a 413.", rich_help_panel=LIMITS),
) -> None:
    """Serve the OpenAI API (completions, chat, tokenize) with continuous batching.

    Needs the server extra: pip install 'mlx-gpt2[server]'. Ctrl-C lets requests in flight finish.
    """
    _check(port, max_concurrency, max_queue, max_tokens_limit, max_body_mb, drain_timeout)
    uvicorn = _server_extra()
    from ..lora.layers import recorded_base
    from ..server.app import make_app
    from ..server.service import ServeOptions

    source = recorded_base(model, adapter_path)
    options = ServeOptions(model_id=model_id or source, api_key=api_key or None,
                           max_concurrency=max_concurrency, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                           max_body_bytes=int(max_body_mb * 2**20), drain_seconds=drain_timeout)  # fmt: skip
    quantize_spec = None
    if quantize or bits is not None or group_size is not None or keep_embeddings:
        quantize_spec = dict(bits=bits or 4, group_size=group_size or 64, keep_embeddings=keep_embeddings)
    lm, tokenizer, template, draft = _load(source, adapter_path, revision, dtype, quantize_spec, (draft_model, num_draft))
    if not _is_loopback(host) and not api_key:
        print(f"warning: --host {host} serves anyone who can reach this machine, and no --api-key is set",
              file=sys.stderr)  # fmt: skip
    sock = _bind(host, port)
    app = make_app(lm, tokenizer, options, template=template, draft=draft)
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout, access_log=not quiet,
                            log_level="warning" if quiet else "info")  # fmt: skip
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"mlx-gpt2: serving {options.model_id!r} on http://{shown}:{bound}; Ctrl-C stops after requests in flight "
          "finish", file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it drained for: a drained stop is a clean exit
        pass
    # Drained and shut down: leave now. MLX's native teardown after a second thread has used it can abort
    # the interpreter's exit ("terminate called without an active exception", exit -6), seen here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so `--port 0` can print the port it got
    (connections that come before uvicorn accepts wait in the backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
    try:
        sock.bind((host, port))
    except (socket.gaierror, UnicodeError) as failure:
        sock.close()
        raise UserError(f"--host {host!r} is not an address of this machine ({failure})") from None
    except OSError as failure:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({failure.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check(port: int, max_concurrency: int, max_queue: int, max_tokens_limit: int, max_body_mb: float,
           drain_timeout: float) -> None:  # fmt: skip
    checks = [
        (0 <= port <= 65535, f"--port must be in [0, 65535], got {port}"),
        (1 <= max_concurrency <= 256, f"--max-concurrency must be in [1, 256], got {max_concurrency}"),
        (0 <= max_queue <= 100_000, f"--max-queue must be in [0, 100000], got {max_queue}"),
        (1 <= max_tokens_limit <= 1_000_000, f"--max-tokens-limit must be in [1, 1000000], got {max_tokens_limit}"),
        (0.001 <= max_body_mb <= 1024, f"--max-body-mb must be in [0.001, 1024], got {max_body_mb:g}"),
        (0 <= drain_timeout <= 3600, f"--drain-timeout must be in [0, 3600] seconds, got {drain_timeout:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _server_extra():
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError as missing:
        raise UserError(f"serve needs the server extra ({missing.name} is missing): pip install 'mlx-gpt2[server]'") from None
    return uvicorn


def _load(model: str, adapter_path: Path | None, revision: str | None, dtype: str | None, quantize: dict | None,
          draft_spec: tuple[str | None, int]) -> tuple:  # fmt: skip
    """The model (with adapters, quantized if asked), its tokenizer, its chat template, and the draft."""
    from .. import Draft, load
    from ..convert import resolve_source
    from ..server.chat import ChatTemplate

    source = model
    lm, tokenizer = load(source, revision=revision, dtype=dtype, quantize=quantize, adapter_path=adapter_path)
    eos = tokenizer.decode([tokenizer.eos_token_id])
    template = ChatTemplate.from_dir(resolve_source(str(source), revision=revision), eos_token=eos)
    draft_model, num_draft = draft_spec
    draft = Draft(load(draft_model, dtype=dtype)[0], num_draft=num_draft) if draft_model else None
    return lm, tokenizer, template, draft


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
