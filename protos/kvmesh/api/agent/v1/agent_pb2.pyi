from kvmesh.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompressRequest(_message.Message):
    __slots__ = ("event_id", "method", "location", "tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    method: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_id: _Optional[str] = ..., method: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class DecompressRequest(_message.Message):
    __slots__ = ("event_id", "method", "location", "tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    method: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_id: _Optional[str] = ..., method: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ProgressResponse(_message.Message):
    __slots__ = ("progress", "final", "num_tokens", "chunks_total", "chunks_done", "bytes_before", "bytes_after", "error", "chunks_failed", "errors")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.ChunkProgress
    final: bool
    num_tokens: int
    chunks_total: int
    chunks_done: int
    bytes_before: int
    bytes_after: int
    error: str
    chunks_failed: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, progress: _Optional[_Union[_common_pb2.ChunkProgress, _Mapping]] = ..., final: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., chunks_total: _Optional[int] = ..., chunks_done: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., error: _Optional[str] = ..., chunks_failed: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tokens", "location")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    location: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., location: _Optional[str] = ...) -> None: ...

class LocationMatch(_message.Message):
    __slots__ = ("location", "num_tokens", "num_chunks")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    location: str
    num_tokens: int
    num_chunks: int
    def __init__(self, location: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[LocationMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[LocationMatch, _Mapping]]] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("location", "tokens")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ClearResponse(_message.Message):
    __slots__ = ("num_tokens", "num_chunks")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    num_chunks: int
    def __init__(self, num_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("location", "tokens")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("num_tokens",)
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    def __init__(self, num_tokens: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("location", "tokens")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("num_tokens",)
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    def __init__(self, num_tokens: _Optional[int] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("event_id", "location", "tokens", "target_url", "target_location", "copy")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_URL_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOCATION_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    target_url: str
    target_location: str
    copy: bool
    def __init__(self, event_id: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., target_url: _Optional[str] = ..., target_location: _Optional[str] = ..., copy: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("error_code", "message", "locations", "model_files")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    error_code: int
    message: str
    locations: _containers.RepeatedCompositeFieldContainer[LocationStats]
    model_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, error_code: _Optional[int] = ..., message: _Optional[str] = ..., locations: _Optional[_Iterable[_Union[LocationStats, _Mapping]]] = ..., model_files: _Optional[_Iterable[str]] = ...) -> None: ...

class PutChunksRequest(_message.Message):
    __slots__ = ("location", "tokens", "kv", "overwrite")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    kv: _common_pb2.Tensor
    overwrite: bool
    def __init__(self, location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., kv: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class PutChunksResponse(_message.Message):
    __slots__ = ("num_tokens", "chunks_stored")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    chunks_stored: int
    def __init__(self, num_tokens: _Optional[int] = ..., chunks_stored: _Optional[int] = ...) -> None: ...

class GetChunksRequest(_message.Message):
    __slots__ = ("location", "tokens")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class GetChunksResponse(_message.Message):
    __slots__ = ("num_tokens", "kv")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    kv: _common_pb2.Tensor
    def __init__(self, num_tokens: _Optional[int] = ..., kv: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StoredChunk(_message.Message):
    __slots__ = ("chunk_key", "token_start", "token_end", "method", "raw", "payload", "parent_key")
    CHUNK_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARENT_KEY_FIELD_NUMBER: _ClassVar[int]
    chunk_key: str
    token_start: int
    token_end: int
    method: str
    raw: _common_pb2.Tensor
    payload: bytes
    parent_key: str
    def __init__(self, chunk_key: _Optional[str] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., method: _Optional[str] = ..., raw: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., payload: _Optional[bytes] = ..., parent_key: _Optional[str] = ...) -> None: ...

class ReceiveChunksRequest(_message.Message):
    __slots__ = ("location", "chunks")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    location: str
    chunks: _containers.RepeatedCompositeFieldContainer[StoredChunk]
    def __init__(self, location: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[StoredChunk, _Mapping]]] = ...) -> None: ...

class ReceiveChunksResponse(_message.Message):
    __slots__ = ("chunks_stored",)
    CHUNKS_STORED_FIELD_NUMBER: _ClassVar[int]
    chunks_stored: int
    def __init__(self, chunks_stored: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocationStats(_message.Message):
    __slots__ = ("name", "used_bytes", "capacity_bytes", "num_chunks", "num_encoded", "num_pinned", "free_bytes", "available", "problem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODED_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    used_bytes: int
    capacity_bytes: int
    num_chunks: int
    num_encoded: int
    num_pinned: int
    free_bytes: int
    available: bool
    problem: str
    def __init__(self, name: _Optional[str] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_encoded: _Optional[int] = ..., num_pinned: _Optional[int] = ..., free_bytes: _Optional[int] = ..., available: _Optional[bool] = ..., problem: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("instance_id", "worker_id", "chunk_size", "methods", "locations", "model_files")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    chunk_size: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    locations: _containers.RepeatedCompositeFieldContainer[LocationStats]
    model_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., chunk_size: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., locations: _Optional[_Iterable[_Union[LocationStats, _Mapping]]] = ..., model_files: _Optional[_Iterable[str]] = ...) -> None: ...
