"""Next-token choice and stop strings of the embedded engine (plain tensors, no model)."""
from __future__ import annotations

import torch

from kvmesh.engine.sampling import SamplingParams, find_stop, held_back, make_generator, sample_next

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def test_greedy_takes_the_argmax_and_ignores_the_seed() -> None:
    params = SamplingParams(temperature=0.0, seed=7)
    assert make_generator(params) is None
    assert sample_next(LOGITS, params, None) == 1


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        gen = make_generator(SamplingParams(seed=0))
        assert {sample_next(LOGITS, params, gen) for _ in range(50)} == {1}


def test_top_k_and_top_p_limit_the_candidates() -> None:
    gen = torch.Generator().manual_seed(0)
    seen_k = {sample_next(LOGITS, SamplingParams(temperature=2.0, top_k=2), gen) for _ in range(300)}
    assert seen_k == {1, 2}
    # Tokens 1 and 2 hold ~0.8 of the mass at temperature 1: top_p 0.75 keeps exactly those two.
    seen_p = {sample_next(LOGITS, SamplingParams(temperature=1.0, top_p=0.75), gen) for _ in range(300)}
    assert seen_p == {1, 2}
    seen_all = {sample_next(LOGITS, SamplingParams(temperature=5.0), gen) for _ in range(500)}
    assert seen_all == {0, 1, 2, 3, 4}


def test_same_seed_same_tokens() -> None:
    params = SamplingParams(temperature=1.5, seed=42)
    runs = [[sample_next(LOGITS, params, g) for _ in range(30)]
            for g in (make_generator(params), make_generator(params))]
    assert runs[0] == runs[1]
    other = make_generator(SamplingParams(temperature=1.5, seed=43))
    assert [sample_next(LOGITS, params, other) for _ in range(30)] != runs[0]


def test_stop_strings() -> None:
    assert find_stop("hello world. Next", ("Next", ".")) == 11
    assert find_stop("hello", ("x",)) == -1
    assert find_stop("hello", ()) == -1
    # The tail that could start a stop string is held back while streaming.
    assert held_back("the end of th", ("the end.", "three")) == 2
    assert held_back("the end", ("the end.",)) == 7
    assert held_back("abc", ("xyz",)) == 0


def test_token_logprobs_are_the_raw_log_softmax() -> None:
    from kvmesh.engine.sampling import token_logprobs

    logp = torch.log_softmax(LOGITS, dim=-1)
    chosen, top = token_logprobs(LOGITS, 4, 3)
    assert abs(chosen - float(logp[4])) < 1e-6
    assert [t for t, _ in top] == [1, 2, 4] and all(abs(v - float(logp[t])) < 1e-6 for t, v in top)
    assert token_logprobs(LOGITS, 1, 0) == (float(logp[1]), [])
    # A token of zero probability still gives a number JSON can carry.
    assert token_logprobs(torch.tensor([0.0, float("-inf")]), 1, 1)[0] == -9999.0
