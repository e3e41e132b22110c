"""``KVMeshConnector``: a vLLM v1 KV connector that stores and loads prompt KV through a kvmesh agent.

    LMCACHE_CONFIG_FILE=example.yaml vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"KVMeshConnector","kv_connector_module_path":"kvmesh.engine.vllm_connector","kv_role":"kv_both"}'

vLLM builds the connector twice: once for its scheduler, once in each worker.
- The worker side runs an ``EmbeddedAgent`` (config from ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_<KEY>``
  overrides, worker id = tensor-parallel rank), so the controller sees the configured instance and
  can compress, decompress, pin or move its chunks while vLLM serves. After a request's prompt is
  fully prefilled, the prompt's KV is gathered from vLLM's paged cache and stored as kvmesh chunks
  (the partial last one too); when a later request shares a stored prefix, that KV is read back
  (decoded if compressed) and written into the request's newly allocated blocks before the forward.
- The scheduler side asks rank 0's agent, over its gRPC ``Lookup``, how long a prefix it holds,
  and tells vLLM how many tokens it will load (never the last prompt token: its logits are needed).

The agent's cachegen methods use the served model's codec files (kvmesh.codecs.model_files), looked
up by vLLM's model name (``vllm serve MODEL``'s MODEL as given) unless the agent config's ``model``,
or ``kvmesh_model`` / ``kvmesh_model_files`` in ``kv_connector_extra_config``, name others; make them
once with ``kvmesh-model-files MODEL``. Without them the agent warns at start and codes without them.

Loads and saves are synchronous (inside ``start_load_kv`` and ``wait_for_save``): simple and
correct; the agent's chunks are decoded on the agent's codec threads either way.

Paged layouts (``_PagedLayout``): vLLM 0.32's ``[blocks, kv_heads, block_size, 2*head_size]`` as the
CPU backend splits it (K rows, then V rows) and as flash attention splits it (K and V halves of the
last dimension; written from vLLM's source, not run on a GPU here), and the older ``[2, blocks,
block_size, kv_heads, head_size]``. Another layout is refused at start with a clear error.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass
class Transfer:
    """One request's KV move between vLLM's paged cache and the agent."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int  # first token to write (load) — tokens before it are vLLM's own prefix-cache hit
    end: int  # tokens [start, end) are loaded; a store covers [0, end)


@dataclass
class KVMeshConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    stores: list[Transfer] = field(default_factory=list)


@dataclass
class _Tracked:
    """What the scheduler side remembers of a running request."""

    token_ids: list[int]
    block_ids: list[int]
    stored: bool = False


def _layer_index(name: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    if not numbers:
        raise ValueError(f"cannot tell the layer number of attention layer {name!r}")
    return int(numbers[0])


class _PagedLayout:
    """Reads and writes the K/V of token slots in one layer's paged cache tensor.

    vLLM 0.32 gives every backend the same per-layer shape ``[blocks, kv_heads, block_size,
    2*head_size]``, but the backends split it differently: the CPU backend views a block as
    ``2*block_size`` rows (K rows, then V rows); flash attention splits the last dimension (K, then
    V, within each row). Older vLLM releases used ``[2, blocks, block_size, kv_heads, head_size]``.
    """

    def __init__(self, example: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int,
                 *, cpu_backend: bool) -> None:
        self.block_size = block_size
        self.head_size = head_size
        shape = tuple(example.shape)
        if example.dim() == 4 and shape[1] == num_kv_heads and shape[2] == block_size and shape[3] == 2 * head_size:
            self.kind = "rows" if cpu_backend else "halves"
        elif example.dim() == 5 and shape[0] == 2 and shape[2] == block_size and shape[3] == num_kv_heads \
                and shape[4] == head_size:
            self.kind = "stacked"
        else:
            raise ValueError(f"KVMeshConnector does not know the paged KV layout {shape} (block_size {block_size}, "
                             f"{num_kv_heads} kv heads of {head_size}); supported: [blocks, heads, block_size, "
                             "2*head_size] and [2, blocks, block_size, heads, head_size]")

    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` as ``[tokens, heads, head_size]`` each."""
        slots = slots.to(cache.device)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        if self.kind == "rows":
            view = cache.view(cache.shape[0], cache.shape[1], 2 * self.block_size, -1)
            return view[blocks, :, offsets], view[blocks, :, offsets + self.block_size]
        if self.kind == "halves":
            rows = cache[blocks, :, offsets]  # [tokens, heads, 2*head_size]
            return rows[..., : self.head_size], rows[..., self.head_size:]
        return cache[0, blocks, offsets], cache[1, blocks, offsets]

    def write(self, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = slots.to(cache.device)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        k, v = k.to(cache.device, cache.dtype), v.to(cache.device, cache.dtype)
        if self.kind == "rows":
            view = cache.view(cache.shape[0], cache.shape[1], 2 * self.block_size, -1)
            view[blocks, :, offsets] = k
            view[blocks, :, offsets + self.block_size] = v
        elif self.kind == "halves":
            cache[blocks, :, offsets] = torch.cat([k, v], dim=-1)
        else:
            cache[0, blocks, offsets] = k
            cache[1, blocks, offsets] = v


def _slots(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    positions = torch.arange(start, end)
    return torch.tensor(block_ids, dtype=torch.long)[positions // block_size] * block_size + positions % block_size


class KVMeshConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from kvmesh.instance_agent.config import ENGINE_MODEL_KEYS, engine_agent_config, load_config

        self._block_size = vllm_config.cache_config.block_size
        self._location = self._kv_transfer_config.get_from_extra_config("kvmesh_location", None) or None
        model_config = vllm_config.model_config
        # The served model's name looks its codec files up (the agent config's `model:` or the
        # connector's extra config kvmesh_model / kvmesh_model_files override it).
        self._config = engine_agent_config(
            load_config(), getattr(model_config, "model", None),
            {k: self._kv_transfer_config.get_from_extra_config(k, None) for k in ENGINE_MODEL_KEYS})
        self._num_kv_heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
        self._head_size = model_config.get_head_size()
        # Scheduler side
        self._tracked: dict[str, _Tracked] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # request id -> (vLLM's local hit, kvmesh hit)
        self._pending_loads: dict[str, tuple[int, int]] = {}
        self._lookup_stub: Any = None
        # Worker side
        self._agent: Any = None
        self._caches: list[torch.Tensor] = []
        self._layout: _PagedLayout | None = None
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.WORKER:
            self._start_agent(vllm_config)

    # ---------------- worker side ----------------

    def _start_agent(self, vllm_config: VllmConfig) -> None:
        from kvmesh.instance_agent.agent import EmbeddedAgent

        rank = int(getattr(vllm_config.parallel_config, "rank", 0) or 0)
        self._agent = EmbeddedAgent(self._config, worker_id=rank)
        self._agent.start()
        logger.info("KVMeshConnector: agent of instance %s worker %d on gRPC port %s",
                    self._config.lmcache_instance_id, rank, self._agent.grpc_port)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
        self._caches = [t for _, t in ordered]
        from vllm.platforms import current_platform

        self._layout = _PagedLayout(self._caches[0], self._block_size, self._num_kv_heads, self._head_size,
                                    cpu_backend=current_platform.is_cpu())
        logger.info("KVMeshConnector: %d layers, paged layout %s %s", len(self._caches), self._layout.kind,
                    tuple(self._caches[0].shape))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVMeshConnectorMetadata) or self._layout is None:
            return
        for load in meta.loads:
            self._load(load)

    def _load(self, load: Transfer) -> None:
        # The whole prompt, not its first `end` tokens: the last stored chunk may be a partial one
        # keyed by every prompt token, while `end` stops one short of the prompt.
        try:
            found, kv = self._agent.retrieve(load.token_ids, self._location)
        except Exception:  # the blocks are reported failed below and vLLM recomputes them
            logger.warning("KVMeshConnector: loading %d tokens of %s failed", load.end, load.request_id,
                           exc_info=True)
            found, kv = 0, None
        got = min(found, load.end)
        if got < load.end:
            # Evicted (or failed) since the scheduler's lookup: vLLM must recompute these blocks.
            first_bad = max(got, load.start) // self._block_size
            last = (load.end - 1) // self._block_size
            self._load_errors.update(load.block_ids[first_bad: last + 1])
        if kv is None or got <= load.start:
            return
        slots = _slots(load.block_ids, self._block_size, load.start, got)
        heads, size = self._num_kv_heads, self._head_size
        for layer, cache in enumerate(self._caches):
            k = kv[0, layer, load.start: got].reshape(-1, heads, size)
            v = kv[1, layer, load.start: got].reshape(-1, heads, size)
            self._layout.write(cache, slots, k, v)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are complete when start_load_kv returns

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # the whole prompt is gathered once, after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVMeshConnectorMetadata) or self._layout is None:
            return
        for store in meta.stores:
            try:
                self._store(store)
            except Exception:  # a failed store only costs a later cache miss
                logger.warning("KVMeshConnector: storing %s failed", store.request_id, exc_info=True)

    def _store(self, store: Transfer) -> None:
        slots = _slots(store.block_ids, self._block_size, 0, store.end)
        keys, values = [], []
        for cache in self._caches:
            k, v = self._layout.read(cache, slots)
            keys.append(k.reshape(store.end, -1))
            values.append(v.reshape(store.end, -1))
        kv = torch.stack([torch.stack(keys), torch.stack(values)]).cpu()
        stored = self._agent.store(store.token_ids[: store.end], kv, self._location)
        logger.debug("KVMeshConnector: %s stored %d new tokens", store.request_id, stored)

    def shutdown(self) -> None:
        if self._agent is not None:
            self._agent.stop()
            self._agent = None

    # ---------------- scheduler side ----------------

    def _lookup(self, tokens: list[int]) -> int:
        import grpc

        from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
        from kvmesh.core.channels import channel

        if self._lookup_stub is None:
            target = f"{self._config.host}:{self._config.worker_port(0)}"
            # The token and TLS files of the config's extra_config (or KVMESH_AUTH_TOKEN_FILE, KVMESH_TLS_*).
            self._lookup_stub = agent_pb2_grpc.InstanceAgentStub(channel(target, self._config.security))
        try:
            resp = self._lookup_stub.Lookup(agent_pb2.LookupRequest(tokens=tokens, location=self._location or ""),
                                            timeout=10)
        except grpc.RpcError as err:  # no agent answer: serve without the cache
            logger.warning("KVMeshConnector: lookup failed (%s); computing the prompt", err.code())
            return 0
        return max((m.num_tokens for m in resp.matches), default=0)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        if len(tokens) < 2:
            return 0, False
        hit = min(self._lookup(tokens), len(tokens) - 1)
        if hit <= num_computed_tokens:
            return 0, False
        self._hits[request.request_id] = (num_computed_tokens, hit)
        return hit - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        hit = self._hits.pop(request.request_id, None)
        if num_external_tokens > 0 and hit is not None:
            local, end = hit
            self._pending_loads[request.request_id] = (local, local + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVMeshConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            tracked = _Tracked(token_ids=list(req.prompt_token_ids or []), block_ids=list(req.block_ids[0]))
            self._tracked[req.req_id] = tracked
            load = self._pending_loads.pop(req.req_id, None)
            if load is not None:
                meta.loads.append(Transfer(req.req_id, tracked.token_ids, tracked.block_ids, load[0], load[1]))
            done = req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req.req_id, 0)
            self._maybe_store(meta, req.req_id, tracked, done)

        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:  # after preemption: the full new block list
                    tracked.block_ids = list(new_blocks[0])
                    tracked.stored = False
                else:
                    tracked.block_ids.extend(new_blocks[0])
            # A request resumed after preemption asks for its prefix again: load it into the new blocks.
            load = self._pending_loads.pop(req_id, None)
            if load is not None:
                meta.loads.append(Transfer(req_id, tracked.token_ids, list(tracked.block_ids), load[0], load[1]))
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._maybe_store(meta, req_id, tracked, done)

        for req_id in scheduler_output.finished_req_ids:
            self._tracked.pop(req_id, None)
        return meta

    def _maybe_store(self, meta: KVMeshConnectorMetadata, req_id: str, tracked: _Tracked, done: int) -> None:
        """Stores the prompt once the step that computes its last token runs."""
        if not tracked.stored and tracked.token_ids and done >= len(tracked.token_ids):
            tracked.stored = True
            meta.stores.append(Transfer(req_id, tracked.token_ids, list(tracked.block_ids), 0, len(tracked.token_ids)))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        self._hits.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None
