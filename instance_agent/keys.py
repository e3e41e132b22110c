"""Chunk keys, re-exported from :mod:`kvmesh.core.keys` (the one implementation, shared with the
controller); kept so ``kvmesh.instance_agent.keys`` imports keep working."""
from kvmesh.core.keys import (KEY_BYTES, MAX_TOKEN, ROOT_KEY, ChunkSpan, chain_key,  # noqa: F401
                              chunk_ref_error, chunk_spans, validate_tokens)
