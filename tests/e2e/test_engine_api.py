"""``kvmesh-serve``'s HTTP API as a client sees it: vLLM's answer shapes, OpenAI's error shape,
sampling options, streaming, and bad input answered with a 4xx that says what was wrong (never a 5xx)."""
from __future__ import annotations

import json
import socket
import urllib.request
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import MODEL, Mesh, http

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_completion_shape(mesh: Mesh) -> None:
    answer = mesh.complete(PROMPT, max_tokens=5)
    assert answer["object"] == "text_completion" and answer["model"] == MODEL
    assert answer["id"].startswith("cmpl-") and isinstance(answer["created"], int)
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and isinstance(choice["text"], str)
    usage = answer["usage"]
    assert usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 5 else "stop")


def test_prompt_as_token_ids_equals_prompt_as_text(mesh: Mesh) -> None:
    tokens = mesh.tokenize(PROMPT)
    by_text = mesh.complete(PROMPT, max_tokens=6)["choices"][0]["text"]
    assert mesh.complete(tokens, max_tokens=6)["choices"][0]["text"] == by_text
    assert mesh.complete([tokens], max_tokens=6)["choices"][0]["text"] == by_text
    assert mesh.complete([PROMPT], max_tokens=6)["choices"][0]["text"] == by_text


def test_tokenize_answers_as_vllm(mesh: Mesh) -> None:
    answer = mesh.ok("POST", f"{mesh.engine}/tokenize", {"model": MODEL, "prompt": PROMPT, "return_token_strs": True})
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"]) > 0
    assert answer["max_model_len"] == 8192
    plain = mesh.ok("POST", f"{mesh.engine}/tokenize", {"prompt": PROMPT})
    assert plain["tokens"] == answer["tokens"] and plain["token_strs"] is None
    back = mesh.ok("POST", f"{mesh.engine}/detokenize", {"model": MODEL, "tokens": answer["tokens"]})
    assert back["prompt"] == PROMPT


def test_models_and_health(mesh: Mesh) -> None:
    models = mesh.ok("GET", f"{mesh.engine}/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    with urllib.request.urlopen(f"{mesh.engine}/health", timeout=10) as resp:
        assert resp.status == 200


def test_max_tokens_and_stop(mesh: Mesh) -> None:
    long = mesh.complete(PROMPT, max_tokens=12)
    text = long["choices"][0]["text"]
    word = text.split()[1] if len(text.split()) > 1 else text.strip()
    stopped = mesh.complete(PROMPT, max_tokens=12, stop=[word])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[: text.index(word)]


def test_seeded_sampling_repeats(mesh: Mesh) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    a = mesh.ok("POST", f"{mesh.engine}/v1/completions", body)["choices"][0]["text"]
    b = mesh.ok("POST", f"{mesh.engine}/v1/completions", body)["choices"][0]["text"]
    assert a == b
    texts = {mesh.ok("POST", f"{mesh.engine}/v1/completions", {**body, "seed": s, "temperature": 2.0})["choices"][0]["text"]
             for s in range(4)}
    assert len(texts) > 1, "different seeds at temperature 2 should not all give the same text"


def test_streaming_gives_the_same_text(mesh: Mesh) -> None:
    whole = mesh.complete(PROMPT, max_tokens=8)
    req = urllib.request.Request(f"{mesh.engine}/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                  "stream": True, "stream_options": {"include_usage": True}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [ln for ln in resp.read().decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == whole["choices"][0]["text"]
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert any(c["finish_reason"] for e in events for c in e["choices"])


def test_metrics_hold_engine_and_agent_series(mesh: Mesh) -> None:
    mesh.complete(PROMPT, max_tokens=2)
    text = mesh.metrics()
    for name in ("kvmesh_engine_prompt_tokens_total", "kvmesh_engine_time_to_first_token_seconds_bucket",
                 "kvmesh_engine_requests_total", "kvmesh_agent_stored_chunks", "kvmesh_agent_controller_connected"):
        assert name in text, f"{name} missing from /metrics"
    assert "kvmesh_agent_controller_connected 1.0" in text


@pytest.mark.parametrize("body, status, words", [
    ({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "x"}, 404,
     "The model `meta-llama/Llama-3.1-8B-Instruct` does not exist."),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 9000}, 400, "maximum context length is 8192"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n: "),
    ({"prompt": "x", "n": 17}, 400, "n: "),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"prompt": ["a", "b"]}, 400, "batches are not served"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "seed": "a"}, 400, "seed"),
    ({"prompt": [1, -2]}, 400, "out of vocabulary"),
    ({"prompt": [10**9]}, 400, "out of vocabulary"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": {"a": 1}}, 400, "prompt must be"),
    ({"max_tokens": 3}, 400, "prompt is required"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_completion_requests(mesh: Mesh, body: object, status: int, words: str) -> None:
    got, answer = http("POST", f"{mesh.engine}/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert words in error["message"]


def test_malformed_and_misrouted(mesh: Mesh) -> None:
    status, answer = http("POST", f"{mesh.engine}/v1/completions", raw=b'{"prompt": ')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = http("POST", f"{mesh.engine}/v1/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400, answer
    status, answer = http("POST", f"{mesh.engine}/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404 and answer["error"]["message"] == "The model `other` does not exist."
    status, answer = http("POST", f"{mesh.engine}/tokenize", {"prompt": 3})
    assert status == 400 and "prompt" in answer["error"]["message"]
    status, answer = http("POST", f"{mesh.engine}/detokenize", {"tokens": [10**9]})
    assert status == 400 and "out of vocabulary" in answer["error"]["message"]
    status, answer = http("POST", f"{mesh.engine}/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and "messages" in answer["error"]["message"]
    status, answer = http("GET", f"{mesh.engine}/v1/completions")
    assert status == 405 and "use POST" in answer["error"]["message"]
    status, answer = http("GET", f"{mesh.engine}/no/such/route")
    assert status == 404 and answer["error"]["type"] == "NotFoundError"
    # A broken request line gets an error answer, and the server keeps serving.
    parts = urlsplit(mesh.engine)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    mesh.ok("GET", f"{mesh.engine}/v1/models")
