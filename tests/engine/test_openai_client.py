"""The official ``openai`` Python client against a real ``kvmesh-serve`` process: chat (plain and
streamed), completions with ``n`` and ``logprobs``, ``usage.prompt_tokens_details.cached_tokens`` from
the embedded agent on a repeated prompt, errors as the client's exception classes; and the server's
bounds (a full queue answers 429 at once, an oversized body 413), which the client would retry, so
those go over plain HTTP."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.engine.serving import CHUNK_SIZE, MODEL, kvmesh_serve

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_BODY = 100_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One request at a time in the model's queue, so the 429 test can fill it with one stream.
    with kvmesh_serve(tmp_path_factory.mktemp("openai"),
                      ["--max-queued", "1", "--max-request-bytes", str(MAX_BODY), "--kv-dtype", "float32"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(engine: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{engine}/v1", api_key="unused-without-a-token", max_retries=0, timeout=120,
                       http_client=httpx.Client(trust_env=False)) as c:
        yield c


def post(url: str, body: Any, timeout: float = 120) -> tuple[int, dict[str, Any], Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def test_chat_completion(client: openai.OpenAI, engine: str) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == MODEL
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # The prompt is the chat template's rendering, as /tokenize with messages counts it.
    _, tokenized, _ = post(f"{engine}/tokenize", {"model": MODEL, "messages": QUESTION})
    assert answer.usage.prompt_tokens == tokenized["count"]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_gives_the_same_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_n_and_logprobs(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=1.0,
                                  seed=7, n=2, logprobs=3)
    answer = client.completions.create(**kwargs)
    assert sorted(c.index for c in answer.choices) == [0, 1]
    total = 0
    for choice in answer.choices:
        lp = choice.logprobs
        n = len(lp.tokens)
        total += n
        assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert answer.usage.completion_tokens == total
    # The seed repeats every choice.
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in answer.choices]


def test_chat_logprobs_of_greedy_tokens_are_the_top_ones(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_n_choices_in_a_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=1.0,
                                                 seed=3, n=2, stream=True))
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=1.0, seed=3, n=2)
    assert texts == {c.index: c.message.content for c in plain.choices}


def test_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You answer in one short sentence. " * 6},
                {"role": "user", "content": f"Name a colour that starts with the letter B. ({time.time_ns()})"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 4 * CHUNK_SIZE
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    # Everything but the last prompt token comes from the agent (the last one gives the first logits).
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    prompt = "A long shared context about the weather in Paris. " * 8
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    cached = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert cached.usage.prompt_tokens_details.cached_tokens == cached.usage.prompt_tokens - 1


def test_errors_are_the_clients_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.status_code == 404 and "The model `gpt-4o` does not exist." in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert "max_tokens" in bad.value.message and bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.completions.create(model=MODEL, prompt="x", n=99)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=9000)
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]}])


def test_a_full_queue_answers_429_at_once_and_frees_when_the_stream_ends(engine: str) -> None:
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 8000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{engine}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as stream:
        assert stream.readline().startswith(b"data: ")  # generating: the one slot is taken
        started = time.monotonic()
        status, answer, headers = post(f"{engine}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert status == 429 and time.monotonic() - started < 5
        assert answer["error"]["type"] == "TooManyRequestsError" and "busy" in answer["error"]["message"]
        assert headers["Retry-After"] == "1"
    # The client left: the server stops that generation and frees the slot.
    wait_served(engine)


def wait_served(engine: str, within: float = 60.0) -> None:
    """A 1-token completion answers 200 within ``within`` s (429s while the one slot is still taken)."""
    deadline = time.monotonic() + within
    while True:
        status, answer, _ = post(f"{engine}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 429, answer
        time.sleep(0.1)
    assert status == 200, answer


def test_a_client_that_leaves_stops_its_generation(engine: str) -> None:
    # 8000 tokens take minutes here; abandoned after a second, the slot frees at the next token.
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 8000, "ignore_eos": True, "temperature": 0}
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(60, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{engine}/v1/completions", json=body)
    wait_served(engine)


def test_oversized_body_is_413(engine: str) -> None:
    status, answer, _ = post(f"{engine}/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_BODY + 1)})
    assert status == 413 and answer["error"]["code"] == 413 and str(MAX_BODY) in answer["error"]["message"]
    status, _, _ = post(f"{engine}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200


def test_stream_of_completions_with_logprobs(engine: str) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    _, whole, _ = post(f"{engine}/v1/completions", body)
    req = urllib.request.Request(f"{engine}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = [ln for ln in resp.read().decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    tokens = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]


def test_oversized_body_without_a_length_is_413(engine: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(MAX_BODY // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    with httpx.Client(trust_env=False, timeout=60) as http:
        resp = http.post(f"{engine}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and str(MAX_BODY) in resp.json()["error"]["message"]


# Odd values for request fields: wrong types, out of range, huge, nested. The output budget is drawn
# from values that are invalid or tiny, so a body that happens to be valid still answers fast.
ODD = [None, True, -1, 0, 1, 2**70, 1.5, float("nan"), "", "x", "10", [], [1, "a"], [[[[[]]]]], {}, {"a": {"b": 1}},
       [-5], [10**9], [{"role": "user"}], [{"role": "user", "content": [{"type": "text"}]}]]
BUDGET = [0, -1, "3", 1.5, True, 1, 2, 10**12, [1]]
FIELDS = ["prompt", "messages", "tokens", "model", "n", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "logprobs", "top_logprobs", "echo", "best_of", "ignore_eos", "tools",
          "response_format", "presence_penalty", "logit_bias", "add_generation_prompt", "return_token_strs"]
VALID = {"/v1/completions": {"prompt": "Hi", "max_tokens": 1},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
         "/tokenize": {"prompt": "Hi"}, "/detokenize": {"tokens": [1]}}


def test_no_body_is_answered_with_a_server_error(engine: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def field(name: str) -> st.SearchStrategy[Any]:
        return st.sampled_from(BUDGET if name.startswith("max_") else ODD)

    changes = st.lists(st.sampled_from([*FIELDS, "max_tokens", "max_completion_tokens"]), max_size=2, unique=True
                       ).flatmap(lambda names: st.fixed_dictionaries({n: field(n) for n in names}))
    seen: set[int] = set()

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(sorted(VALID)), changes=changes)
    def check(route: str, changes: dict[str, Any]) -> None:
        body = {**VALID[route], **changes}
        with httpx.Client(trust_env=False, timeout=120) as http:
            resp = http.post(engine + route, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert resp.status_code < 500, (route, body, resp.text)
        if resp.status_code != 200:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        seen.add(resp.status_code)

    check()
    assert {200, 400} <= seen

