"""The OpenAI-compatible HTTP app (FastAPI on Starlette): the key check, errors as OpenAI's error object.

Every error is `{"error": {"message", "type", "param", "code"}}` with its status (400 bad input, 401 bad
key, 404 unknown model or route, 413 a body over the limit, 429 a full queue); nothing answers a
traceback, and nothing a client sends stops the server.
"""

from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.speculative import Draft
from .chat import ChatTemplate
from .protocol import BadRequest
from .routes import add_routes
from .runs import ModelFailed
from .scheduler import QueueFull, Scheduler
from .service import ServeOptions, Server, error

OPEN_PATHS = ("/health",)  # answered without an API key: a load balancer's probe carries none


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over `server`: its routes, the API key check and the error handlers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.scheduler.stop()  # after uvicorn has drained the requests in flight

    app = FastAPI(title="mlx-gpt2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        key = server.options.api_key
        if key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
                return error(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                             kind="authentication_error", code="invalid_api_key")  # fmt: skip
        return await call_next(request)

    _add_error_handlers(app)
    add_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            message = f"{request.method} {request.url.path[:200]} is not a route of this server"
            return error(exc.status_code, message, code="not_found" if exc.status_code == 404 else "method_not_allowed")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, f"the request is malformed: {str(exc)[:200]}")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error(429, "the server is busy: too many requests are waiting; retry later", kind="rate_limit_error",
                     code="server_busy")  # fmt: skip

    @app.exception_handler(ModelFailed)
    async def model_failed(request: Request, exc: ModelFailed):
        return error(500, f"the model failed on this request ({exc}); the server goes on", kind="server_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}); please report it", kind="server_error")


def make_app(model, tokenizer, options: ServeOptions, *, template: ChatTemplate | None = None,
             draft: Draft | None = None) -> FastAPI:  # fmt: skip
    """The app serving `model`: its scheduler thread starts now and stops when the app shuts down.

    `uvicorn.run(make_app(*mlx_gpt2.load("gpt2"), ServeOptions(model_id="gpt2")))` serves it; the chat
    template defaults to the plain transcript (`ChatTemplate.from_dir` reads a checkpoint's own).
    """
    template = template or ChatTemplate(None, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    scheduler = Scheduler(model, max_concurrency=options.max_concurrency, max_queue=options.max_queue, draft=draft)
    return create_app(Server(model, tokenizer, options, scheduler, template))
