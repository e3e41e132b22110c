"""Choosing the next token from logits: greedy, temperature, top-k and top-p, as vLLM does; and the
log-probabilities a request may ask for (of the model's raw distribution, as vLLM's default)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# vLLM treats temperatures below this as greedy.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1  # choices per request; they share one prefill and, with a seed, one generator
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the k most likely ones

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A generator seeded from ``params.seed`` (the same seed gives the same tokens), or None."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator().manual_seed(params.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from the last position's ``logits`` [vocab]."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` might begin a stop string (not safe to stream yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


# What JSON can carry for a log-probability of zero probability (vLLM's choice as well).
MIN_LOGPROB = -9999.0


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` and the ``k`` most likely tokens with theirs, from raw ``logits``.

    One log-softmax over the vocabulary per sampled step: cheap next to the forward pass.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = max(float(logp[token]), MIN_LOGPROB)
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return chosen, [(int(i), max(float(v), MIN_LOGPROB)) for v, i in zip(values.tolist(), ids.tolist())]
