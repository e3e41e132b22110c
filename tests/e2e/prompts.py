"""Prompts for the end-to-end tests: the seed's, and a long one over three 256-token chunks (the last partial)."""
from __future__ import annotations

SEED_PROMPT = "Explain the significance of KV cache in language models."

_PARAGRAPHS = [
    "A transformer language model reads its prompt one token at a time, but it does not have to redo "
    "the work for every earlier token when it produces the next one. Each attention layer keeps the keys "
    "and values it computed for the tokens it has already seen, and the new token only attends to them.",
    "This store of keys and values is called the KV cache. For a model with thirty layers, three key-value "
    "heads and a head dimension of sixty-four, every token adds a few tens of kilobytes to it, so a long "
    "document or a conversation with many turns can fill gigabytes of accelerator memory.",
    "Serving systems therefore treat the KV cache as data worth keeping. When two requests share a long "
    "prefix, such as a system prompt, a set of instructions, or the same retrieved documents, the second "
    "request can load the stored keys and values instead of recomputing them, which cuts the time to the "
    "first token from seconds to milliseconds.",
    "Keeping many such caches is expensive, which is why compression matters. CacheGen quantizes the keys "
    "and values layer by layer, giving more bins to the early layers that the output is most sensitive to, "
    "and then codes the quantized symbols with an arithmetic coder whose probabilities are learned per "
    "layer and channel. The result is several times smaller than the original half-precision tensors.",
    "A controller decides when to compress and when to decompress. It tells each instance agent which "
    "chunks to transform, the agents stream back their progress chunk by chunk, and the controller keeps "
    "an event for every operation so that an operator can ask whether it has finished.",
    "The chunks are addressed by a hash that chains the previous chunk's hash with the tokens of the "
    "current chunk. Two sequences share a chunk key exactly when they share every token up to the end of "
    "that chunk, which is what makes prefix reuse safe: a stored chunk is only ever loaded at the same "
    "positions it was computed for.",
    "Quality is measured by comparing what the model writes with a cache that went through the codec "
    "against what it writes with a cache computed from scratch. Greedy decoding makes the comparison "
    "exact: the same keys and values always give the same tokens, so any difference comes from the codec.",
    "Operators watch all of this through metrics: how many chunks were compressed, how many bytes went in "
    "and out, how long the codec took, and how much memory each storage location holds. Alerts fire when a "
    "worker stops sending heartbeats or when operations begin to fail.",
]

LONG_PROMPT = "\n\n".join(_PARAGRAPHS + _PARAGRAPHS[:3]) + "\n\nIn one sentence, the main idea of this text is that"
