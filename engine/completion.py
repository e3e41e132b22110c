"""One completion with KV reuse through the instance agent: load the stored prefix, prefill the
rest, store the prompt's chunks, then decode token by token.

Runs on the engine's single worker thread (never on the event loop); requests are serialised.
"""
from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvmesh.engine.kv import cache_from_kv, kv_from_cache
from kvmesh.engine.sampling import (SamplingParams, find_stop, held_back, make_generator, sample_next,
                                    token_logprobs)

logger = logging.getLogger(__name__)


class KVStore(Protocol):
    """What the engine needs of an instance agent (``EmbeddedAgent`` has it)."""

    def store(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None) -> int: ...

    def retrieve(self, tokens: Sequence[int], location: str | None = None) -> tuple[int, torch.Tensor | None]: ...


@dataclass
class TokenLogprob:
    """One sampled token's log-probability (of the raw model distribution) and the most likely alternatives."""

    token_id: int
    token: str  # the token's text
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first
    text_offset: int  # where the token's text starts in its choice's text


@dataclass
class Choice:
    """One of the ``n`` continuations of a prompt."""

    index: int
    output_tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None  # one per output token when asked for


@dataclass
class Completion:
    prompt_tokens: list[int]
    choices: list[Choice]
    cached_tokens: int  # prompt tokens whose KV came from the agent instead of a prefill
    ttft_s: float  # from the start of the request to the first sampled token
    stored_tokens: int  # prompt tokens newly stored through the agent by this request

    # The first choice's fields: what a single-choice caller reads.
    @property
    def output_tokens(self) -> list[int]:
        return self.choices[0].output_tokens

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.output_tokens) for c in self.choices)


# Streaming callback: (choice index, new text, log-probabilities of the tokens behind it (empty unless asked)).
OnDelta = Callable[[int, str, list[TokenLogprob]], None]


class Cancelled(Exception):
    """The client went away; the completion stopped early."""


class CompletionRunner:
    """The model, its tokenizer and the agent the KV goes through."""

    def __init__(self, model: Any, tokenizer: Any, agent: KVStore | None, *, kv_dtype: torch.dtype,
                 max_model_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.agent = agent
        self.kv_dtype = kv_dtype
        self.max_model_len = max_model_len
        self.vocab_size = int(model.config.vocab_size)
        self.eos_ids = _eos_ids(model, tokenizer)
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes away).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, input_ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        """One model call; returns the last position's logits and the grown cache."""
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_kw: past})
        return out.logits[0, -1], getattr(out, self._cache_kw)

    # --- tokens and text ---

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return encode(self.tokenizer, text, add_special_tokens)

    def tokenize_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(self.tokenizer, messages, add_generation_prompt)

    def token_strs(self, tokens: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(tokens)))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    # --- the completion ---

    def complete(self, prompt: Sequence[int], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: threading.Event | None = None) -> Completion:
        """Runs prefill once (reusing stored KV), then decodes ``params.n`` choices from it one after
        the other; ``on_delta`` gets each new piece of text as it becomes safe to show."""
        started = time.perf_counter()
        tokens = list(prompt)
        choices: list[Choice] = []
        with torch.inference_mode():
            cached, past = self._load_prefix(tokens)
            input_ids = torch.tensor([tokens[cached:]], dtype=torch.long)
            logits, past = self._forward(input_ids, past)
            stored = self._store_prompt(tokens, past)
            ttft: float | None = None
            generator = make_generator(params)  # one for all choices: they differ, and a seed repeats them all
            for index in range(params.n):
                # Every choice but the last decodes from its own copy of the prompt's cache.
                own_past = copy.deepcopy(past) if index < params.n - 1 else past
                choice, first_at = self._decode(index, tokens, logits, own_past, params, generator, on_delta,
                                                cancelled)
                choices.append(choice)
                if ttft is None:
                    ttft = (first_at or time.perf_counter()) - started
        return Completion(prompt_tokens=tokens, choices=choices, cached_tokens=cached, ttft_s=ttft or 0.0,
                          stored_tokens=stored)

    def _decode(self, index: int, tokens: list[int], logits: torch.Tensor, past: Any, params: SamplingParams,
                generator: torch.Generator | None, on_delta: OnDelta | None,
                cancelled: threading.Event | None) -> tuple[Choice, float | None]:
        """One choice, token by token from the prompt's last logits; returns it and when its first token came."""
        output: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        unsent: list[TokenLogprob] = []  # log-probabilities not yet streamed with their text
        text, sent, finish = "", 0, "length"
        first_at: float | None = None
        while len(output) < params.max_tokens:
            if cancelled is not None and cancelled.is_set():
                finish = "abort"
                break
            token = sample_next(logits, params, generator)
            if first_at is None:
                first_at = time.perf_counter()
            if token in self.eos_ids and not params.ignore_eos:
                finish = "stop"
                break
            if logprobs is not None:
                entry = self._logprob(logits, token, params.logprobs or 0, len(text))
                logprobs.append(entry)
                unsent.append(entry)
            output.append(token)
            text = self.tokenizer.decode(output, skip_special_tokens=True)
            cut = find_stop(text, params.stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if on_delta is not None:
                # Hold back a trailing partial UTF-8 character and anything that may start a stop string.
                safe = len(text.rstrip("\ufffd")) - held_back(text, params.stop)
                if safe > sent:
                    on_delta(index, text[sent:safe], unsent)
                    sent, unsent = safe, []
            if len(output) >= params.max_tokens or len(tokens) + len(output) >= self.max_model_len:
                break
            logits, past = self._forward(torch.tensor([[token]], dtype=torch.long), past)
        if on_delta is not None and (len(text) > sent or unsent):
            on_delta(index, text[sent:], unsent)
        return Choice(index=index, output_tokens=output, text=text, finish_reason=finish,
                      logprobs=logprobs), first_at

    def _logprob(self, logits: torch.Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        chosen, top = token_logprobs(logits, token, k)
        return TokenLogprob(token_id=token, token=self.token_text(token), logprob=chosen,
                            top=[(t, self.token_text(t), lp) for t, lp in top], text_offset=offset)

    def _load_prefix(self, tokens: list[int]) -> tuple[int, Any]:
        """The stored prefix's KV as a cache, and its length (at most all but the last prompt token:
        the last one is always computed, since its logits give the first output token)."""
        if self.agent is None or len(tokens) < 2:
            return 0, None
        try:
            found, kv = self.agent.retrieve(tokens)
        except Exception:  # a broken store must not fail serving: prefill from scratch instead
            logger.warning("loading stored KV failed; prefilling all %d tokens", len(tokens), exc_info=True)
            return 0, None
        usable = min(found, len(tokens) - 1)
        if usable <= 0 or kv is None:
            return 0, None
        kv = kv[:, :, :usable].to(self.model.dtype)
        return usable, cache_from_kv(kv, self.model.config)

    def _store_prompt(self, tokens: list[int], past: Any) -> int:
        if self.agent is None:
            return 0
        try:
            kv = kv_from_cache(past)[:, :, : len(tokens)].to(self.kv_dtype)
            return self.agent.store(tokens, kv)
        except Exception:  # serving goes on without storing; the next request prefills again
            logger.warning("storing the prompt's KV failed", exc_info=True)
            return 0


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` formatted with the model's chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may answer a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
