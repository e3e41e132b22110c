"""Storage locations of an instance agent, named as in LMCache."""
from .base import ADMIT, EVICT, IndexEntry, LocationStats, StorageBackend
from .chunk import RAW, StoredChunk
from .cpu import LocalCPUBackend
from .disk import LocalDiskBackend
from .remote import RemoteBackend, RemoteSettings

__all__ = ["ADMIT", "EVICT", "RAW", "IndexEntry", "LocalCPUBackend", "LocalDiskBackend", "LocationStats",
           "RemoteBackend", "RemoteSettings", "StorageBackend", "StoredChunk"]
