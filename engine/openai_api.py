"""The engine's OpenAI/vLLM-style HTTP routes: request checking, answer shapes and errors as vLLM
gives them. Model work goes to one worker thread, so requests run one at a time, off the loop.

The HTTP/1.1 transport is the controller's (``kvmesh.controller.httpd``); this module only routes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvmesh.controller.httpd import Request, Response
from kvmesh.engine.completion import Completion, CompletionRunner
from kvmesh.engine.metrics import EngineMetrics
from kvmesh.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed", 411: "LengthRequired",
                413: "RequestEntityTooLarge", 431: "RequestHeaderFieldsTooLarge", 500: "InternalServerError",
                505: "HTTPVersionNotSupported"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """vLLM's error answer."""
    return {"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None,
            "code": status}


class HTTPError(Exception):
    """An error answer: ``status`` with the JSON ``body``."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status=status, body=json.dumps(obj).encode())


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, error_body(400, message))


class EngineAPI:
    """The routes of ``kvmesh-serve`` over a ``CompletionRunner``."""

    def __init__(self, runner: CompletionRunner, *, served_model_name: str, model_root: str,
                 registries: list[CollectorRegistry], metrics: EngineMetrics) -> None:
        self.runner = runner
        self.model_name = served_model_name
        self.model_root = model_root
        self.registries = registries
        self.metrics = metrics
        self.created = int(time.time())
        # One thread: the model is not re-entrant and two requests at once would only share 2 cores.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-engine")

        self._routes: dict[str, dict[str, Callable[[Request], Any]]] = {}
        for method, path, handler in (
            ("POST", "/v1/completions", self.completions),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize),
            ("GET", "/v1/models", self.models),
            ("GET", "/health", self.health),
            ("GET", "/version", self.version),
            ("GET", "/metrics", self.metrics_route),
        ):
            self._routes.setdefault(path, {})[method] = handler

    async def handle(self, request: Request) -> Response:
        """The HTTP server's handler: route, answer, count."""
        methods = self._routes.get(request.path)
        if methods is None:
            response = json_response(error_body(404, f"Not Found: {request.path}"), 404)
        elif request.method not in methods:
            allowed = ", ".join(sorted(methods))
            response = json_response(error_body(405, f"Method {request.method} not allowed on {request.path}: "
                                                     f"use {allowed}"), 405)
            response.headers["Allow"] = allowed
        else:
            try:
                response = await methods[request.method](request)
            except HTTPError as err:
                response = json_response(err.body, err.status)
        route = request.path if methods is not None else "other"
        self.metrics.requests.labels(route, str(response.status)).inc()
        return response

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # --- routes ---

    async def health(self, request: Request) -> Response:
        return Response(status=200, body=b"")

    async def version(self, request: Request) -> Response:
        from importlib.metadata import version
        return json_response({"version": version("kvmesh")})

    async def metrics_route(self, request: Request) -> Response:
        body = b"".join(generate_latest(r) for r in self.registries)
        return Response(status=200, body=body, content_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvmesh",
            "root": self.model_root, "parent": None, "max_model_len": self.runner.max_model_len,
        }]})

    async def tokenize(self, request: Request) -> Response:
        body = self._body(request)
        add_special = _opt_bool(body, "add_special_tokens", True)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise bad_request("messages must be a list of {role, content} objects")
            add_gen = _opt_bool(body, "add_generation_prompt", True)
            try:
                tokens = await self._run(self.runner.tokenize_chat, messages, add_gen)
            except (ValueError, TypeError, KeyError) as err:
                raise bad_request(f"messages could not be formatted with the chat template: {err}") from None
        elif isinstance(body.get("prompt"), str):
            tokens = await self._run(self.runner.tokenize, body["prompt"], add_special)
        else:
            raise bad_request("prompt must be a string (or send messages)")
        token_strs = None
        if _opt_bool(body, "return_token_strs", False):
            token_strs = self.runner.token_strs(tokens)
        return json_response({"count": len(tokens), "max_model_len": self.runner.max_model_len, "tokens": tokens,
                              "token_strs": token_strs})

    async def detokenize(self, request: Request) -> Response:
        body = self._body(request)
        tokens = self._token_ids(body.get("tokens"), "tokens")
        return json_response({"prompt": await self._run(self.runner.detokenize, tokens)})

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = self._body(request)
        prompt = await self._prompt_tokens(body)
        params = self._sampling(body, len(prompt))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if _opt_bool(body, "stream", False):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
            return Response(status=200, content_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                            stream=self._stream(prompt, params, request_id, created, include_usage, started))
        result: Completion = await self._run(self.runner.complete, prompt, params)
        self._account(result, started)
        return json_response({
            "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason,
                         "stop_reason": None}],
            "usage": _usage(result),
        })

    async def _stream(self, prompt: list[int], params: SamplingParams, request_id: str, created: int,
                      include_usage: bool, started: float) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
            obj: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                   "model": self.model_name,
                                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                                "stop_reason": None}]}
            if usage is not None:
                obj = {**obj, "choices": [], "usage": usage}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        future = loop.run_in_executor(self._worker, self.runner.complete, prompt, params, on_text, cancelled)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (piece := await queue.get()) is not None:
                yield chunk(piece, None)
            result: Completion = await future
            self._account(result, started)
            yield chunk("", result.finish_reason)
            if include_usage:
                yield chunk("", None, _usage(result))
            yield b"data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client left (or we are done): stop decoding for nobody

    def _account(self, result: Completion, started: float) -> None:
        m = self.metrics
        m.prompt_tokens.inc(len(result.prompt_tokens))
        m.cached_tokens.inc(result.cached_tokens)
        m.stored_tokens.inc(result.stored_tokens)
        m.generation_tokens.inc(len(result.output_tokens))
        m.ttft.labels("true" if result.cached_tokens else "false").observe(result.ttft_s)
        m.duration.observe(time.perf_counter() - started)
        logger.info("completion: %d prompt tokens (%d from the cache), %d generated, ttft %.3fs, %s",
                    len(result.prompt_tokens), result.cached_tokens, len(result.output_tokens), result.ttft_s,
                    result.finish_reason)

    # --- request checking ---

    def _body(self, request: Request) -> dict[str, Any]:
        if not request.body:
            raise bad_request("the request body is empty: send a JSON object")
        try:
            body = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise HTTPError(404, error_body(404, f"The model `{model}` does not exist."))
        return body

    def _token_ids(self, value: Any, name: str) -> list[int]:
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise bad_request(f"{name} must be a list of token ids (integers)")
        bad = [t for t in value if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of vocabulary (0 <= id < {self.runner.vocab_size})")
        return list(value)

    async def _prompt_tokens(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        # A list of one prompt is one prompt; batches are not served (n=1, one prompt per request).
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await self._run(self.runner.tokenize, prompt, True)
        elif isinstance(prompt, list) and prompt:
            tokens = self._token_ids(prompt, "prompt")
        elif prompt is None:
            raise bad_request("prompt is required")
        else:
            raise bad_request("prompt must be a string, a list of token ids, or a list of one of those")
        if not tokens:
            raise bad_request("the prompt is empty")
        return tokens

    def _sampling(self, body: dict[str, Any], prompt_len: int) -> SamplingParams:
        for name in ("n", "best_of"):
            if body.get(name) not in (None, 1):
                raise bad_request(f"{name} must be 1: this engine returns one choice per request")
        if body.get("logprobs") is not None:
            raise bad_request("logprobs are not supported by this engine")
        if body.get("echo"):
            raise bad_request("echo is not supported by this engine")
        max_len = self.runner.max_model_len
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None:
            max_tokens = max_len - prompt_len
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad_request(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if prompt_len + max_tokens > max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.")
        temperature = _number(body, "temperature", 1.0, lo=0.0, hi=2.0)
        top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
        if top_p <= 0.0:
            raise bad_request(f"top_p must be in (0, 1], got {top_p}")
        top_k = body.get("top_k", -1)
        if top_k is None:
            top_k = -1
        if isinstance(top_k, bool) or not isinstance(top_k, int) or (top_k < 1 and top_k != -1):
            raise bad_request(f"top_k must be -1 (disabled) or an integer >= 1, got {top_k!r}")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad_request(f"seed must be an integer, got {seed!r}")
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise bad_request("stop must be a string or a list of strings")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop=tuple(s for s in stops if s),
                              ignore_eos=_opt_bool(body, "ignore_eos", False))


def _usage(result: Completion) -> dict[str, Any]:
    prompt, completion = len(result.prompt_tokens), len(result.output_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _number(body: dict[str, Any], name: str, default: float, *, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _opt_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}")
    return value
