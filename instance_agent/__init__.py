"""kvmesh's instance agent: one per engine worker, owning its storage locations and codecs.

- ``config``: LMCache's yaml keys and ``LMCACHE_<KEY>`` overrides -> ``AgentConfig``
- ``keys``: prefix-chained chunk keys (torch-free; shared with the controller)
- ``storage``: ``LocalCPUBackend`` and ``LocalDiskBackend``
- ``agent``: ``InstanceAgent`` (async) and ``EmbeddedAgent`` (for engines)
- ``service``: the ``InstanceAgent`` gRPC service; ``controller_link``: registration and heartbeats
- ``metrics``: the agent's Prometheus metrics; ``__main__``: ``kvmesh-agent``

Importing this package loads nothing heavy: ``keys`` must stay importable without torch.
"""
