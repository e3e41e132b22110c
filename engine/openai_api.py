"""The OpenAI/vLLM-style HTTP API of ``kvmesh-serve`` on FastAPI + pydantic (served by uvicorn), as
vLLM's ``entrypoints/openai``: ``/v1/completions``, ``/v1/chat/completions`` (both streaming as
server-sent events), vLLM's ``/tokenize`` and ``/detokenize``, ``/v1/models``, ``/health``,
``/version`` and ``/metrics``.

What keeps it responsive and bounded:
- model work runs on one worker thread (the model is not re-entrant, and two requests at once would
  only share 2 cores); text <-> token work on a second one with its own tokenizer copy, so
  ``/tokenize`` does not wait behind a long generation; nothing slow runs on the event loop;
- at most ``max_pending`` requests wait for or use each worker; the next one gets 429 with
  ``Retry-After`` at once instead of queueing without limit;
- request bodies are capped (413) before or while they are read; a streamed answer goes through a bounded
  queue, so a client that reads slowly slows its own generation instead of growing a buffer.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
(never 422 or 500), 404 for an unknown model or route, 401 without the bearer token when one is
configured (every route but the liveness ``/health``).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvmesh.core.auth import bearer_ok
from kvmesh.core.http_body import BodyLimit
from kvmesh.engine.completion import Completion, CompletionRunner, TokenLogprob, encode, encode_chat
from kvmesh.engine.metrics import EngineMetrics
from kvmesh.engine.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    UsageInfo,
    SamplingFields,
)
from kvmesh.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # an 8k-token prompt is < 100 kB as text or as token ids
DEFAULT_MAX_PENDING = 32  # requests waiting for (or on) each worker before 429
BIG_ANSWER_TOKENS = 4096  # output tokens beyond which an answer is serialised off the loop
STREAM_QUEUE = 64  # pieces of streamed text between the model thread and the HTTP response
OPEN_PATHS = frozenset({"/health"})  # liveness stays open when a token is configured

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge",
                429: "TooManyRequestsError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429)}


class ApiError(Exception):
    """An error answer with OpenAI's body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "Error"), param=param,
                                         code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# --- pydantic's validation errors as one sentence that names the field ---

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"})


def _field_path(loc: Iterable[Any]) -> str:
    """``('body', 'messages', 0, 'content', 'str')`` -> ``messages.0.content`` (union member tags dropped)."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, str) and (item in _TYPE_TAGS or "[" in item or "-" in item):
            break
        parts.append(str(item))
    return ".".join(parts)


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first error as ``(message, param)``."""
    err = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "Field required"}
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None
    field = _field_path(err.get("loc", ()))
    if kind == "value_error":  # our own validators' sentences say what was wrong and what is valid
        return str(ctx.get("error", err.get("msg"))), field.split(".")[0] or None
    if not field:
        if kind == "missing":
            return "the request body is empty: send a JSON object", None
        if isinstance(err.get("input"), bytes):  # FastAPI reads JSON only when the request says it is JSON
            return "the request body was not read as JSON: send it with Content-Type: application/json", None
        return f"the request body must be a JSON object, got {_short(err.get('input'))}", None
    if kind == "missing":
        return f"{field} is required", field.split(".")[0]
    return f"{field}: {err.get('msg', 'invalid value')}, got {_short(err.get('input'))}", field.split(".")[0]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, bytes) else f"{len(value)} bytes of non-JSON"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- bounded admission to a worker ---


class Admission:
    """At most ``limit`` requests in a worker's queue (running one included); the next gets 429."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.pending = 0  # only touched on the event loop: no lock

    def acquire(self) -> None:
        if self.pending >= self.limit:
            raise ApiError(429, f"the engine is busy: {self.pending} {self.what} requests are already queued "
                                f"(limit {self.limit}); retry shortly", headers={"Retry-After": "1"})
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    @contextlib.contextmanager
    def slot(self) -> Any:
        self.acquire()
        try:
            yield
        finally:
            self.release()


class GuardedStream(StreamingResponse):
    """A streamed answer that runs ``on_close`` however it ends (done, client gone, error)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# --- ASGI middleware: the bearer token, and the request counter ---


class BearerAuth:
    """Every route needs ``Authorization: Bearer <token>`` except ``OPEN_PATHS`` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token is not None and scope["path"] not in OPEN_PATHS:
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(values) != 1 or not bearer_ok(values[0], self.token):
                message = ("missing bearer token: send Authorization: Bearer <token> (the OpenAI client sends its "
                           "api_key)" if not values else "invalid bearer token")
                response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413)


def too_large(max_body_bytes: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes")


class CountRequests:
    """``kvmesh_engine_requests_total{route, code}`` for every answer, refusals included."""

    def __init__(self, app: ASGIApp, metrics: EngineMetrics, routes: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = scope["path"] if scope["path"] in self.routes() else "other"
            self.metrics.requests.labels(route, str(status)).inc()


# --- the engine's API ---


class EngineAPI:
    """The routes of ``kvmesh-serve`` over a ``CompletionRunner``; ``app`` is the ASGI application."""

    def __init__(self, runner: CompletionRunner, *, served_model_name: str, model_root: str,
                 registries: list[CollectorRegistry], metrics: EngineMetrics, token: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.runner = runner
        self.model_name = served_model_name
        self.model_root = model_root
        self.registries = registries
        self.metrics = metrics
        self.created = int(time.time())
        self._model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-engine")
        self._text_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-tokenizer")
        # Hugging Face's fast tokenizers must not be used from two threads at once ("Already borrowed"):
        # the text worker has its own copy; the model thread keeps the runner's for decoding.
        self._tokenizer = copy.deepcopy(runner.tokenizer)
        self._model_admission = Admission(max_pending, "generation")
        self._text_admission = Admission(max_pending, "tokenizer")
        self.app = self._build_app(token, max_body_bytes)

    def close(self) -> None:
        self._model_worker.shutdown(wait=True, cancel_futures=True)
        self._text_worker.shutdown(wait=True, cancel_futures=True)

    # --- the app ---

    def _build_app(self, token: str | None, max_body_bytes: int) -> FastAPI:
        app = FastAPI(title="kvmesh-serve", summary="OpenAI-compatible API of kvmesh's embedded CPU engine",
                      docs_url=None, redoc_url=None)
        app.add_exception_handler(RequestValidationError, _on_validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error_handler(max_body_bytes))
        app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _on_unexpected)

        def json_model(obj: BaseModel) -> Response:
            return Response(obj.model_dump_json(), media_type="application/json")

        @app.get("/health", summary="Liveness (open even with a token configured)")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/version")
        async def version() -> dict[str, str]:
            from importlib.metadata import version as dist_version
            return {"version": dist_version("kvmesh")}

        @app.get("/metrics", summary="Prometheus: the engine's kvmesh_engine_* and the agent's kvmesh_agent_*")
        async def metrics() -> Response:
            body = b"".join(generate_latest(r) for r in self.registries)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
        async def models() -> Response:
            return json_model(ModelList(data=[ModelCard(
                id=self.model_name, created=self.created, owned_by="kvmesh", root=self.model_root,
                max_model_len=self.runner.max_model_len)]))

        @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
        async def tokenize(req: TokenizeRequest) -> Response:
            return json_model(await self.tokenize(req))

        @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
        async def detokenize(req: DetokenizeRequest) -> Response:
            self._check_model(req.model)
            tokens = self._check_token_ids(req.tokens, "tokens")
            with self._text_admission.slot():
                text = await self._on(self._text_worker, self._tokenizer.decode, tokens)
            return json_model(DetokenizeResponse(prompt=text))

        @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
        async def completions(req: CompletionRequest, request: Request) -> Response:
            return await self.completions(req, request.receive)

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
        async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
            return await self.chat(req, request.receive)

        paths = frozenset(getattr(r, "path", "") for r in app.routes)
        # The body bound is kvmesh's one mechanism (kvmesh.core.http_body), answering in OpenAI's shape.
        app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, refuse=too_large, over=BodyTooLarge)
        app.add_middleware(BearerAuth, token=token)
        app.add_middleware(CountRequests, metrics=self.metrics, routes=lambda: paths)
        return app

    # --- helpers ---

    async def _on(self, worker: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")

    def _check_token_ids(self, tokens: list[int], name: str) -> list[int]:
        bad = [t for t in tokens if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of vocabulary (0 <= id < {self.runner.vocab_size})", name)
        return tokens

    async def _encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        try:
            return await self._on(self._text_worker, encode_chat, self._tokenizer, messages, add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - the template is code run on the caller's input
            raise bad_request(f"messages could not be formatted with the chat template: {err}", "messages") from None

    def _check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The output budget; 400 when the prompt and it do not fit the context."""
        max_len = self.runner.max_model_len
        if max_tokens is None:
            max_tokens = max_len - prompt_len
        if prompt_len + max_tokens > max_len or max_tokens < 1:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.", "max_tokens")
        return max_tokens

    @staticmethod
    def _sampling(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p,
                              top_k=-1 if req.top_k is None else req.top_k, seed=req.seed, stop=req.stops(),
                              ignore_eos=req.ignore_eos, n=req.n, logprobs=logprobs)

    def _usage(self, result: Completion) -> UsageInfo:
        prompt, completion = len(result.prompt_tokens), result.completion_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens))

    def _account(self, result: Completion, started: float) -> None:
        m = self.metrics
        m.prompt_tokens.inc(len(result.prompt_tokens))
        m.cached_tokens.inc(result.cached_tokens)
        m.stored_tokens.inc(result.stored_tokens)
        m.generation_tokens.inc(result.completion_tokens)
        m.ttft.labels("true" if result.cached_tokens else "false").observe(result.ttft_s)
        m.duration.observe(time.perf_counter() - started)
        logger.info("completion: %d prompt tokens (%d from the cache), %d generated in %d choice(s), ttft %.3fs, %s",
                    len(result.prompt_tokens), result.cached_tokens, result.completion_tokens, len(result.choices),
                    result.ttft_s, ",".join(c.finish_reason for c in result.choices))

    # --- /tokenize ---

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self._check_model(req.model)
        with self._text_admission.slot():
            if req.messages is not None:
                tokens = await self._encode_chat([m.for_template() for m in req.messages], req.add_generation_prompt)
            else:
                tokens = await self._on(self._text_worker, encode, self._tokenizer, req.prompt, req.add_special_tokens)
            strs = (await self._on(self._text_worker, self._tokenizer.convert_ids_to_tokens, tokens)
                    if req.return_token_strs else None)
        return TokenizeResponse(count=len(tokens), max_model_len=self.runner.max_model_len, tokens=tokens,
                                token_strs=list(strs) if strs is not None else None)

    # --- /v1/completions ---

    async def completions(self, req: CompletionRequest, receive: Receive | None = None) -> Response:
        started = time.perf_counter()
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            with self._text_admission.slot():
                prompt = await self._on(self._text_worker, encode, self._tokenizer, req.prompt, True)
        else:
            prompt = self._check_token_ids(list(req.prompt), "prompt")
        if not prompt:
            raise bad_request("the prompt is empty: send at least one token", "prompt")
        params = self._sampling(req, self._check_length(len(prompt), req.max_tokens), req.logprobs)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
            body = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                      usage=usage)
            return b"data: " + body.model_dump_json(exclude={"usage"} if usage is None else None).encode() + b"\n\n"

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            async def events(result: list[Completion], deltas: AsyncIterator[tuple[int, str, list[TokenLogprob]]]
                             ) -> AsyncIterator[bytes]:
                async for index, text, lps in deltas:
                    yield chunk([CompletionChoice(index=index, text=text, logprobs=_completion_logprobs(lps)
                                                  if params.logprobs is not None else None)])
                done = result[0]
                yield chunk([CompletionChoice(index=c.index, text="", finish_reason=c.finish_reason)
                             for c in done.choices])
                if include_usage:
                    yield chunk([], self._usage(done))

            return self._stream(prompt, params, started, events)

        result = await self._generate(prompt, params, started, receive)
        return await self._answer(result, lambda: CompletionResponse(
            id=request_id, created=created, model=self.model_name, usage=self._usage(result),
            choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                      logprobs=_completion_logprobs(c.logprobs) if c.logprobs is not None else None)
                     for c in result.choices]))

    # --- /v1/chat/completions ---

    async def chat(self, req: ChatCompletionRequest, receive: Receive | None = None) -> Response:
        started = time.perf_counter()
        self._check_model(req.model)
        with self._text_admission.slot():
            prompt = await self._encode_chat([m.for_template() for m in req.messages], req.add_generation_prompt)
        if not prompt:
            raise bad_request("the chat template gave an empty prompt", "messages")
        params = self._sampling(req, self._check_length(len(prompt), req.output_limit()), req.top_logprob_count())
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> bytes:
            body = ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                       model=self.model_name, choices=choices)
            if usage is not None:
                body.usage = usage
            # exclude_unset: a delta carries only what it has (no "role": null), as OpenAI's and vLLM's do.
            return b"data: " + body.model_dump_json(exclude_unset=True).encode() + b"\n\n"

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            async def events(result: list[Completion], deltas: AsyncIterator[tuple[int, str, list[TokenLogprob]]]
                             ) -> AsyncIterator[bytes]:
                yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
                                              finish_reason=None) for i in range(params.n)])
                async for index, text, lps in deltas:
                    yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=text),
                                                  logprobs=_chat_logprobs(lps) if params.logprobs is not None
                                                  else None, finish_reason=None)])
                done = result[0]
                yield chunk([ChatStreamChoice(index=c.index, delta=DeltaMessage(), logprobs=None,
                                              finish_reason=c.finish_reason) for c in done.choices])
                if include_usage:
                    yield chunk([], self._usage(done))

            return self._stream(prompt, params, started, events)

        result = await self._generate(prompt, params, started, receive)
        return await self._answer(result, lambda: ChatCompletionResponse(
            id=request_id, created=created, model=self.model_name, usage=self._usage(result),
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                                logprobs=_chat_logprobs(c.logprobs) if c.logprobs is not None else None)
                     for c in result.choices]))

    @staticmethod
    async def _answer(result: Completion, build: Callable[[], BaseModel]) -> Response:
        """The JSON answer; one that may be big (logprobs: 16 choices of thousands of tokens with 20
        alternatives each is megabytes) is built off the event loop."""
        def render() -> bytes:
            return build().model_dump_json().encode()

        big = result.completion_tokens > BIG_ANSWER_TOKENS or any(c.logprobs for c in result.choices)
        body = await asyncio.to_thread(render) if big else render()
        return Response(body, media_type="application/json")

    # --- running the model ---

    async def _generate(self, prompt: list[int], params: SamplingParams, started: float,
                        receive: Receive | None) -> Completion:
        """The whole completion; a client that disconnects meanwhile stops it (its slot frees at once)."""
        cancelled = threading.Event()
        with self._model_admission.slot():
            job = asyncio.ensure_future(self._on(self._model_worker, self.runner.complete, prompt, params, None,
                                                 cancelled))
            watcher = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
            try:
                await asyncio.wait({job} | ({watcher} if watcher else set()), return_when=asyncio.FIRST_COMPLETED)
                if not job.done():
                    cancelled.set()  # nobody is waiting for this answer any more
                result = await job
            finally:
                cancelled.set()
                if watcher is not None:
                    watcher.cancel()
        self._account(result, started)
        return result

    def _stream(self, prompt: list[int], params: SamplingParams, started: float,
                events: Callable[[list[Completion], AsyncIterator[tuple[int, str, list[TokenLogprob]]]],
                                 AsyncIterator[bytes]]) -> Response:
        """A server-sent-event answer: ``events`` turns the deltas into chunks (and reads the finished
        completion from its first argument once the deltas end); ``[DONE]`` closes it."""
        self._model_admission.acquire()  # 429 now, before the 200 is sent; released when the stream closes
        cancelled = threading.Event()
        result: list[Completion] = []

        def close() -> None:
            cancelled.set()  # the client left (or we are done): stop decoding for nobody
            self._model_admission.release()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in events(result, self._deltas(prompt, params, cancelled, result, started)):
                    yield data
            except Exception:  # a bug: the 200 is sent, so the error goes into the stream
                logger.exception("streamed completion failed")
                error = ErrorResponse(error=ErrorInfo(message="internal error while generating; see the engine's log",
                                                      type=_ERROR_TYPES[500], code=500))
                yield b"data: " + error.model_dump_json().encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        try:
            return GuardedStream(body(), on_close=close)
        except BaseException:
            close()
            raise

    async def _deltas(self, prompt: list[int], params: SamplingParams, cancelled: threading.Event,
                      result: list[Completion], started: float
                      ) -> AsyncIterator[tuple[int, str, list[TokenLogprob]]]:
        """The model thread's pieces of text as they come, through a bounded queue; when they end, the
        finished ``Completion`` is appended to ``result``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str, list[TokenLogprob]]] = asyncio.Queue(maxsize=STREAM_QUEUE)

        def on_delta(index: int, text: str, lps: list[TokenLogprob]) -> None:
            # Runs on the model thread: wait for room (a slow reader slows its own generation), but
            # give up once the stream is closed, so the thread is never stuck on a reader that left.
            put = asyncio.run_coroutine_threadsafe(queue.put((index, text, lps)), loop)
            while True:
                try:
                    put.result(timeout=0.25)
                    return
                except FutureTimeout:
                    if cancelled.is_set():
                        put.cancel()
                        return

        job = loop.run_in_executor(self._model_worker, self.runner.complete, prompt, params, on_delta, cancelled)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                break
            while not queue.empty():  # every put finished before the job did
                yield queue.get_nowait()
            result.append(await job)
            self._account(result[0], started)
        finally:
            if not job.done():
                cancelled.set()
                job.add_done_callback(_log_failure)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body is already read: only the end can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _log_failure(job: asyncio.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is not None:
        logger.warning("an abandoned streamed completion failed: %s", job.exception())


# --- logprobs in the two OpenAI shapes ---


def _completion_logprobs(entries: list[TokenLogprob]) -> CompletionLogProbs:
    return CompletionLogProbs(text_offset=[e.text_offset for e in entries],
                              token_logprobs=[e.logprob for e in entries], tokens=[e.token for e in entries],
                              top_logprobs=[{text: lp for _, text, lp in e.top} for e in entries])


def _chat_logprobs(entries: list[TokenLogprob]) -> ChatLogProbs:
    return ChatLogProbs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                         top_logprobs=[TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))
                                       for _, text, lp in e.top])
        for e in entries])


# --- exception handlers: every error in OpenAI's shape ---


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_error(list(exc.errors()))
    return error_response(400, message, param)


async def _on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.headers)


def _http_error_handler(max_body_bytes: int) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status, headers = exc.status_code, dict(exc.headers or {})
        if status == 404:
            message = f"Not Found: {request.url.path}"
        elif status == 405:
            allowed = headers.get("Allow") or headers.get("allow", "")
            message = f"Method {request.method} not allowed on {request.url.path}: use {allowed}"
        elif status == 413:
            return too_large(max_body_bytes)
        elif status == 400:
            message = f"the request body could not be parsed as JSON (nested too deeply?): {exc.detail}"
        else:
            message = str(exc.detail)
        return error_response(status, message, headers=headers or None)
    return handler


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; see the engine's log")
