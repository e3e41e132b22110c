"""The connector's reads and writes of vLLM's paged KV tensors, against the way vLLM's own
attention backends split those tensors into K and V (plain tensors: no model, no server)."""
from __future__ import annotations

import pytest
import torch

BLOCKS, HEADS, BLOCK, DIM = 6, 3, 4, 8


def _layout(kind_cpu: bool, shape: tuple[int, ...]):  # noqa: ANN202
    from kvmesh.engine.vllm_connector import _PagedLayout

    return _PagedLayout(torch.zeros(shape), BLOCK, HEADS, DIM, cpu_backend=kind_cpu)


def _kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    return torch.randn(tokens, HEADS, DIM, generator=g), torch.randn(tokens, HEADS, DIM, generator=g)


@pytest.mark.parametrize("cpu", [True, False])
def test_standard_layout_matches_the_backend_split(cpu: bool) -> None:
    from kvmesh.engine.vllm_connector import _slots

    layout = _layout(cpu, (BLOCKS, HEADS, BLOCK, 2 * DIM))
    cache = torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM)
    block_ids = [5, 2, 3]
    slots = _slots(block_ids, BLOCK, 1, 10)  # tokens 1..9 over three blocks, unaligned start
    k, v = _kv(9)
    layout.write(cache, slots, k, v)
    if cpu:  # vllm/v1/attention/backends/cpu_attn.py: view [B, H, 2*bs, D], chunk(2, dim=2)
        key_cache, value_cache = cache.view(BLOCKS, HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
        got_k = torch.stack([key_cache[block_ids[t // BLOCK], :, t % BLOCK] for t in range(1, 10)])
        got_v = torch.stack([value_cache[block_ids[t // BLOCK], :, t % BLOCK] for t in range(1, 10)])
    else:  # vllm/v1/attention/backends/flash_attn.py: transpose(1, 2).split(head_size, dim=-1)
        key_cache, value_cache = cache.transpose(1, 2).split(DIM, dim=-1)
        got_k = torch.stack([key_cache[block_ids[t // BLOCK], t % BLOCK] for t in range(1, 10)])
        got_v = torch.stack([value_cache[block_ids[t // BLOCK], t % BLOCK] for t in range(1, 10)])
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    rk, rv = layout.read(cache, slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    untouched = torch.ones(BLOCKS, dtype=torch.bool)
    untouched[block_ids] = False
    assert not cache[untouched].any(), "blocks not named were written"


def test_stacked_layout_round_trip() -> None:
    from kvmesh.engine.vllm_connector import _slots

    layout = _layout(False, (2, BLOCKS, BLOCK, HEADS, DIM))
    cache = torch.zeros(2, BLOCKS, BLOCK, HEADS, DIM)
    slots = _slots([1, 4], BLOCK, 0, 7)
    k, v = _kv(7)
    layout.write(cache, slots, k, v)
    assert torch.equal(cache[0, 4, 2], k[6]) and torch.equal(cache[1, 1, 0], v[0])
    rk, rv = layout.read(cache, slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def test_unknown_layout_is_refused_with_its_shape() -> None:
    with pytest.raises(ValueError, match=r"\(6, 3, 4, 5\)"):
        _layout(True, (BLOCKS, HEADS, BLOCK, 5))
