from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from kvmesh.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_EVENT_TYPE_UNSPECIFIED: _ClassVar[KVEventType]
    ADMIT: _ClassVar[KVEventType]
    EVICT: _ClassVar[KVEventType]
KV_EVENT_TYPE_UNSPECIFIED: KVEventType
ADMIT: KVEventType
EVICT: KVEventType

class CompressRequest(_message.Message):
    __slots__ = ("instance_id", "method", "location", "tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    method: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., method: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class CompressResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class DecompressRequest(_message.Message):
    __slots__ = ("instance_id", "method", "location", "tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    method: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., method: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class DecompressResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupMatch(_message.Message):
    __slots__ = ("instance_id", "location", "num_tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    location: str
    num_tokens: int
    def __init__(self, instance_id: _Optional[str] = ..., location: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("event_id", "layout_info", "matches")
    class LayoutInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.ListValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.ListValue, _Mapping]] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_INFO_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    layout_info: _containers.MessageMap[str, _struct_pb2.ListValue]
    matches: _containers.RepeatedCompositeFieldContainer[LookupMatch]
    def __init__(self, event_id: _Optional[str] = ..., layout_info: _Optional[_Mapping[str, _struct_pb2.ListValue]] = ..., matches: _Optional[_Iterable[_Union[LookupMatch, _Mapping]]] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("instance_id", "location", "tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ClearResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("instance_id", "location", "tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("instance_id", "location", "tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    location: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., location: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("old_position", "new_position", "tokens", "copy")
    OLD_POSITION_FIELD_NUMBER: _ClassVar[int]
    NEW_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    old_position: _containers.RepeatedScalarFieldContainer[str]
    new_position: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    copy: bool
    def __init__(self, old_position: _Optional[_Iterable[str]] = ..., new_position: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[int]] = ..., copy: _Optional[bool] = ...) -> None: ...

class MoveResponse(_message.Message):
    __slots__ = ("event_id", "num_tokens")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    num_tokens: int
    def __init__(self, event_id: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("event_id", "error_codes", "healthy", "errors")
    class ErrorCodesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    error_codes: _containers.ScalarMap[int, int]
    healthy: bool
    errors: _containers.ScalarMap[int, str]
    def __init__(self, event_id: _Optional[str] = ..., error_codes: _Optional[_Mapping[int, int]] = ..., healthy: _Optional[bool] = ..., errors: _Optional[_Mapping[int, str]] = ...) -> None: ...

class CheckFinishRequest(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class CheckFinishResponse(_message.Message):
    __slots__ = ("status", "chunks_done", "chunks_total", "error", "chunks_failed")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.EventStatus
    chunks_done: int
    chunks_total: int
    error: str
    chunks_failed: int
    def __init__(self, status: _Optional[_Union[_common_pb2.EventStatus, str]] = ..., chunks_done: _Optional[int] = ..., chunks_total: _Optional[int] = ..., error: _Optional[str] = ..., chunks_failed: _Optional[int] = ...) -> None: ...

class QueryWorkerInfoRequest(_message.Message):
    __slots__ = ("instance_id", "worker_ids")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., worker_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("instance_id", "worker_id", "ip", "port", "peer_init_url", "registration_time", "last_heartbeat_time", "state", "methods", "locations", "chunk_size", "model_files")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PEER_INIT_URL_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str
    registration_time: float
    last_heartbeat_time: float
    state: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    locations: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    model_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ..., peer_init_url: _Optional[str] = ..., registration_time: _Optional[float] = ..., last_heartbeat_time: _Optional[float] = ..., state: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., locations: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ..., model_files: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryWorkerInfoResponse(_message.Message):
    __slots__ = ("event_id", "worker_infos")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INFOS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    worker_infos: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, event_id: _Optional[str] = ..., worker_infos: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class QueryInstanceRequest(_message.Message):
    __slots__ = ("event_id", "ip")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    ip: str
    def __init__(self, event_id: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class QueryInstanceResponse(_message.Message):
    __slots__ = ("event_id", "res")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    res: str
    def __init__(self, event_id: _Optional[str] = ..., res: _Optional[str] = ...) -> None: ...

class GetEventRequest(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class GetEventResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.Event
    def __init__(self, event: _Optional[_Union[_common_pb2.Event, _Mapping]] = ...) -> None: ...

class WatchEventRequest(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class WatchEventResponse(_message.Message):
    __slots__ = ("event", "progress")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.Event
    progress: _common_pb2.ChunkProgress
    def __init__(self, event: _Optional[_Union[_common_pb2.Event, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.ChunkProgress, _Mapping]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("limit", "instance_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    instance_id: str
    def __init__(self, limit: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_common_pb2.Event, _Mapping]]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("instance_id", "worker_id", "ip", "port", "peer_init_url", "methods", "locations", "chunk_size", "heartbeat_interval_seconds", "secret", "model_files")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PEER_INIT_URL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    locations: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    heartbeat_interval_seconds: float
    secret: str
    model_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ..., peer_init_url: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., locations: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ..., secret: _Optional[str] = ..., model_files: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_timeout_seconds", "secret", "heartbeat_port")
    WORKER_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PORT_FIELD_NUMBER: _ClassVar[int]
    worker_timeout_seconds: float
    secret: str
    heartbeat_port: int
    def __init__(self, worker_timeout_seconds: _Optional[float] = ..., secret: _Optional[str] = ..., heartbeat_port: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("instance_id", "worker_id", "secret")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    secret: str
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("registered",)
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    registered: bool
    def __init__(self, registered: _Optional[bool] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("instance_id", "worker_id", "secret")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    secret: str
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("type", "location", "chunk_key", "token_end")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    type: KVEventType
    location: str
    chunk_key: str
    token_end: int
    def __init__(self, type: _Optional[_Union[KVEventType, str]] = ..., location: _Optional[str] = ..., chunk_key: _Optional[str] = ..., token_end: _Optional[int] = ...) -> None: ...

class ReportKVEventsRequest(_message.Message):
    __slots__ = ("instance_id", "worker_id", "events", "full_resync", "secret", "more")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FULL_RESYNC_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    worker_id: int
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    full_resync: bool
    secret: str
    more: bool
    def __init__(self, instance_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ..., full_resync: _Optional[bool] = ..., secret: _Optional[str] = ..., more: _Optional[bool] = ...) -> None: ...

class ReportKVEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
