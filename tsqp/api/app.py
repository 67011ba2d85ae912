"""The OpenAI-compatible HTTP API, a Starlette app: /v1/models, /v1/chat/completions, /v1/completions,
/health and /metrics.

It runs in the TEE process: prompts are tokenized, and answers sampled and detokenized, here; the GPU
server sees what the split (or private) mode lets it see, nothing more. Each generation runs in a
worker thread on its own slot (`slots.ModelSlots`); tokens reach the event loop through a queue, and a
streaming client that goes away ends its generation at the next token, which frees its session.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tsqp.api.metrics import Metrics
from tsqp.api.requests import ApiError, Job, parse_job
from tsqp.api.slot_process import ClientGone
from tsqp.api.slots import ModelSlots
from tsqp.api.text import TextPieces
from tsqp.errors import ConnectionLost, IntegrityError, TsqpError


@dataclass
class ApiState:
    model: str  # the served model's name
    tokenizer: object  # tee.tokenizer.TextTokenizer
    context: int  # positions a session can hold
    vocab_size: int
    slots: ModelSlots
    api_key: str | None = None
    attestation: dict | None = None  # GET /v1/attestation: attest/evidence.py's document
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.metrics = Metrics(self.model)
        if self.slots.batcher is not None:
            self.metrics.watch_batcher(self.slots.batcher)
        self.executor = ThreadPoolExecutor(max_workers=self.slots.parallel, thread_name_prefix="tsqp-slot")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def build_app(state: ApiState):
    """The ASGI app: the endpoints' routes behind the API key check and the request counter."""
    routes = Endpoints(state).routes()
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
    return Guard(app, state, {route.path for route in routes})


async def api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


class Endpoints:
    """The request handlers, over the one served model's state."""

    def __init__(self, state: ApiState):
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/v1/attestation", self.attestation),
            Route("/v1/models", self.models),
            Route("/v1/models/{name:path}", self.one_model),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        reason = self.state.slots.server_gone()
        if reason:
            return JSONResponse({"status": "error", "message": f"the GPU server exited ({reason})"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(self.state.metrics.exposition(), media_type=self.state.metrics.content_type)

    async def attestation(self, request: Request) -> Response:
        """The evidence a client checks before its first prompt (so it needs no API key)."""
        if self.state.attestation is None:
            raise ApiError(503, "the attestation evidence is not ready yet")
        return JSONResponse(self.state.attestation)

    def model_card(self) -> dict:
        return {
            "id": self.state.model,
            "object": "model",
            "created": self.state.created,
            "owned_by": "tsqp",
            "max_model_len": self.state.context,
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.state.model:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return JSONResponse(self.model_card())

    async def chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    async def complete(self, request: Request, kind: str) -> Response:
        arrival = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
        state = self.state
        try:
            job = parse_job(kind, body, state.model, state.tokenizer, state.context, state.vocab_size)
        except TsqpError as exc:  # the chat template refused the conversation
            raise ApiError(400, str(exc), "messages") from None
        run = Run(state, job, arrival)
        if job.stream:
            return StreamingResponse(
                run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(await run.whole())


class Guard:
    """The API key check on /v1, and the request counter, as plain ASGI around the app (streams pass
    untouched)."""

    def __init__(self, app: Starlette, state: ApiState, paths: set[str]):
        self.app, self.state, self.paths = app, state, paths

    def endpoint(self, path: str) -> str:
        """The counter's label: a route's path, never the raw one, so clients cannot grow the label set."""
        if path in self.paths:
            return path
        return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"

    def refusal(self, scope) -> Response | None:
        """The 401 for a /v1 request without the API key, when one is set."""
        path = scope["path"]
        if self.state.api_key is None or not path.startswith("/v1") or path == "/v1/attestation":
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, f"Bearer {self.state.api_key}".encode()):
            return None
        message = "a valid API key is required (Authorization: Bearer KEY)"
        return error_response(ApiError(401, message, code="invalid_api_key"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = ["500"]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, counted)
            await self.app(scope, receive, counted)
        finally:
            self.state.metrics.requests.labels(self.endpoint(scope["path"]), status[0]).inc()


class Run:
    """One generation: started on a slot in a worker thread, its tokens handed to the event loop."""

    def __init__(self, state: ApiState, job: Job, arrival: float):
        self.state, self.job, self.arrival = state, job, arrival
        self.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.pieces = TextPieces(state.tokenizer, job.stop)
        self.token_times: list[float] = []
        self.gone = threading.Event()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def start(self) -> asyncio.Future:
        metrics, model = self.state.metrics, self.state.model
        metrics.waiting.labels(model).inc()

        def work():
            metrics.waiting.labels(model).dec()
            metrics.running.labels(model).inc()
            try:
                return self.state.slots.run(self.job.prompt_ids, self.job.max_tokens, self.job.sampling, self.on_token)
            finally:
                metrics.running.labels(model).dec()

        future = self.loop.run_in_executor(self.state.executor, work)
        future.add_done_callback(self._done)
        return future

    def on_token(self, token: int) -> bool:
        """In the worker thread, once per generated token: True when a stop string ended the text."""
        if self.gone.is_set():
            raise ClientGone()
        self.token_times.append(time.perf_counter())
        piece = self.pieces.push(token)
        if piece:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)
        return self.pieces.stopped

    def _done(self, future: asyncio.Future) -> None:
        self.queue.put_nowait(None)
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            reason = "stop" if result.stop_reason in ("eos", "stop") else "length"
            self.state.metrics.finished(reason, len(self.job.prompt_ids), self.token_times, self.arrival)

    def outcome(self, future: asyncio.Future) -> tuple[str, dict]:
        """(finish_reason, usage), or the ApiError the generation's failure maps to."""
        try:
            result = future.result()
        except ConnectionLost as exc:
            raise ApiError(503, f"the GPU server is unreachable: {exc}", code="service_unavailable") from None
        except IntegrityError as exc:
            raise ApiError(502, f"a result of the GPU server failed verification: {exc}", code="bad_gateway") from None
        except TsqpError as exc:
            raise ApiError(500, str(exc)) from None
        finish = "stop" if result.stop_reason in ("eos", "stop") else "length"
        completion = len(result.generated_ids)
        prompt = len(result.prompt_ids)
        return finish, {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        future = self.start()
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            self.gone.set()
            raise
        except Exception:
            pass  # mapped by outcome
        finish, usage = self.outcome(future)
        self.pieces.finish()
        text = self.pieces.text
        if self.job.echo:
            text = self.state.tokenizer.decode(self.job.prompt_ids) + text
        if self.job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.job.model,
            "choices": [choice],
            "usage": usage,
        }

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> str:
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return sse(
            {"id": self.id, "object": kind, "created": self.created, "model": self.job.model, "choices": [choice]}
        )

    async def events(self):
        """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
        future = self.start()
        try:
            if self.job.kind == "chat":
                yield self.chunk(None, None, first=True)
            if self.job.echo:
                yield self.chunk(self.state.tokenizer.decode(self.job.prompt_ids), None)
            while (piece := await self.queue.get()) is not None:
                yield self.chunk(piece, None)
            try:
                finish, usage = self.outcome(future)
            except ApiError as error:
                yield sse(error.body())
                yield "data: [DONE]\n\n"
                return
            rest = self.pieces.finish()
            if rest:
                yield self.chunk(rest, None)
            yield self.chunk(None, finish)
            if self.job.include_usage:
                yield sse(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk" if self.job.kind == "chat" else "text_completion",
                        "created": self.created,
                        "model": self.job.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            self.gone.set()  # a client gone mid-stream: the worker stops at its next token


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
