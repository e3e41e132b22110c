from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_STATUS_UNSPECIFIED: _ClassVar[EventStatus]
    PENDING: _ClassVar[EventStatus]
    RUNNING: _ClassVar[EventStatus]
    COMPLETED: _ClassVar[EventStatus]
    FAILED: _ClassVar[EventStatus]
    CANCELLED: _ClassVar[EventStatus]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    COMPRESS: _ClassVar[Operation]
    DECOMPRESS: _ClassVar[Operation]
    MOVE: _ClassVar[Operation]
    CLEAR: _ClassVar[Operation]
    PIN: _ClassVar[Operation]
    UNPIN: _ClassVar[Operation]
EVENT_STATUS_UNSPECIFIED: EventStatus
PENDING: EventStatus
RUNNING: EventStatus
COMPLETED: EventStatus
FAILED: EventStatus
CANCELLED: EventStatus
OPERATION_UNSPECIFIED: Operation
COMPRESS: Operation
DECOMPRESS: Operation
MOVE: Operation
CLEAR: Operation
PIN: Operation
UNPIN: Operation

class ChunkProgress(_message.Message):
    __slots__ = ("worker_id", "chunk_index", "chunk_key", "token_start", "token_end", "bytes_before", "bytes_after", "codec_seconds", "skipped", "error")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    CODEC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    chunk_index: int
    chunk_key: str
    token_start: int
    token_end: int
    bytes_before: int
    bytes_after: int
    codec_seconds: float
    skipped: bool
    error: str
    def __init__(self, worker_id: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_key: _Optional[str] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., codec_seconds: _Optional[float] = ..., skipped: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class WorkerResult(_message.Message):
    __slots__ = ("worker_id", "status", "chunks_total", "chunks_done", "bytes_before", "bytes_after", "error", "chunks_failed", "chunk_errors")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ERRORS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    status: EventStatus
    chunks_total: int
    chunks_done: int
    bytes_before: int
    bytes_after: int
    error: str
    chunks_failed: int
    chunk_errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[int] = ..., status: _Optional[_Union[EventStatus, str]] = ..., chunks_total: _Optional[int] = ..., chunks_done: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., error: _Optional[str] = ..., chunks_failed: _Optional[int] = ..., chunk_errors: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "operation", "status", "instance_id", "method", "location", "num_tokens", "chunks_total", "chunks_done", "bytes_before", "bytes_after", "compression_ratio", "error", "created_time", "started_time", "finished_time", "workers", "target_instance_id", "target_location", "chunks_failed")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    STARTED_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISHED_TIME_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOCATION_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    operation: Operation
    status: EventStatus
    instance_id: str
    method: str
    location: str
    num_tokens: int
    chunks_total: int
    chunks_done: int
    bytes_before: int
    bytes_after: int
    compression_ratio: float
    error: str
    created_time: float
    started_time: float
    finished_time: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerResult]
    target_instance_id: str
    target_location: str
    chunks_failed: int
    def __init__(self, event_id: _Optional[str] = ..., operation: _Optional[_Union[Operation, str]] = ..., status: _Optional[_Union[EventStatus, str]] = ..., instance_id: _Optional[str] = ..., method: _Optional[str] = ..., location: _Optional[str] = ..., num_tokens: _Optional[int] = ..., chunks_total: _Optional[int] = ..., chunks_done: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., error: _Optional[str] = ..., created_time: _Optional[float] = ..., started_time: _Optional[float] = ..., finished_time: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerResult, _Mapping]]] = ..., target_instance_id: _Optional[str] = ..., target_location: _Optional[str] = ..., chunks_failed: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...
