"""``CompletionRunner`` with the real SmolLM2 and a real ``EmbeddedAgent`` (no controller): the
prompt's KV is stored after prefill, reused by the next request sharing the prefix, and a broken
store never fails a completion."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.engine.completion import CompletionRunner
from kvmesh.engine.sampling import SamplingParams
from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.config import config_from_dict

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from kvmesh.engine.model import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(torch.float32)


@pytest.fixture()
def agent(tmp_path: Path) -> Any:
    config = config_from_dict({"chunk_size": 16, "local_cpu": True, "max_local_cpu_size": 0.5,
                               "lmcache_worker_ports": 0, "lmcache_instance_id": "serve-test"}, env={})
    with EmbeddedAgent(config, worker_id=0, metrics_port=-1) as a:
        yield a


def test_prefix_is_stored_then_reused(smollm2: tuple[Any, Any], agent: EmbeddedAgent) -> None:
    model, tokenizer = smollm2
    runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float32, max_model_len=8192)
    plain = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float32, max_model_len=8192)
    prompt = runner.tokenize("Paris is the capital of France. Berlin is the capital of Germany. "
                             "Rome is the capital of")
    assert len(prompt) > 16

    first = runner.complete(prompt, GREEDY)
    assert first.cached_tokens == 0 and first.stored_tokens == len(prompt)
    assert agent.lookup(prompt) == len(prompt)
    n, kv = agent.retrieve(prompt)
    assert n == len(prompt) and kv.shape == (2, 30, len(prompt), 192) and kv.dtype == torch.float32

    second = runner.complete(prompt, GREEDY)
    assert second.cached_tokens == len(prompt) - 1 and second.stored_tokens == 0
    assert second.output_tokens == first.output_tokens == plain.complete(prompt, GREEDY).output_tokens

    # A longer prompt sharing the full 16-token chunks reuses exactly those.
    longer = prompt + runner.tokenize(" Italy. Madrid is the capital of")
    third = runner.complete(longer, GREEDY)
    assert third.cached_tokens == (len(prompt) // 16) * 16
    assert third.output_tokens == plain.complete(longer, GREEDY).output_tokens


class _BrokenStore:
    def store(self, tokens: Any, kv: Any, location: Any = None) -> int:
        raise RuntimeError("disk on fire")

    def retrieve(self, tokens: Any, location: Any = None) -> Any:
        raise RuntimeError("disk on fire")


def test_a_failing_store_does_not_fail_the_completion(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    # A stand-in that only fails: the real agent's own failure paths are tested in tests/agent.
    runner = CompletionRunner(model, tokenizer, _BrokenStore(), kv_dtype=torch.float16, max_model_len=8192)
    plain = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=8192)
    prompt = runner.tokenize("One, two, three, four,")
    got = runner.complete(prompt, GREEDY)
    assert got.cached_tokens == 0 and got.stored_tokens == 0
    assert got.output_tokens == plain.complete(prompt, GREEDY).output_tokens


def test_eos_and_length_limits(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    runner = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=8192)
    prompt = runner.tokenize("Say hi.")
    assert runner.complete(prompt, SamplingParams(max_tokens=1, temperature=0.0)).finish_reason in ("length", "stop")
    capped = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=len(prompt) + 3)
    out = capped.complete(prompt, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(out.output_tokens) == 3 and out.finish_reason == "length"


def test_n_choices_share_one_prefill_and_carry_logprobs(smollm2: tuple[Any, Any], agent: EmbeddedAgent) -> None:
    model, tokenizer = smollm2
    runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float32, max_model_len=8192)
    prompt = runner.tokenize("The three primary colours are red, yellow and")
    single = runner.complete(prompt, GREEDY)
    # Greedy choices are all the same: each decodes from its own copy of the prompt's cache.
    three = runner.complete(prompt, SamplingParams(max_tokens=8, temperature=0.0, n=3, logprobs=2))
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.output_tokens == single.output_tokens for c in three.choices)
    assert three.completion_tokens == 3 * len(single.output_tokens)
    for choice in three.choices:
        entries = choice.logprobs
        assert [e.token_id for e in entries] == choice.output_tokens
        assert all(len(e.top) == 2 and e.top[0][0] == e.token_id and e.top[0][2] == e.logprob <= 0 for e in entries)
        assert [e.text_offset for e in entries] == sorted(e.text_offset for e in entries)
        assert "".join(e.token for e in entries).startswith(choice.text[: entries[-1].text_offset])
    # Seeded sampling: the choices differ from one another, and the same seed repeats them all.
    seeded = SamplingParams(max_tokens=8, temperature=1.5, n=3, seed=11)
    first, again = runner.complete(prompt, seeded), runner.complete(prompt, seeded)
    assert [c.output_tokens for c in first.choices] == [c.output_tokens for c in again.choices]
    assert len({tuple(c.output_tokens) for c in first.choices}) > 1
    assert single.choices[0].logprobs is None
