"""KV tensors on the wire (``kvmesh.api.common.v1.Tensor``) and as bytes: dtype name, shape, raw bytes.

Bytes are the tensor's memory in little-endian order (every platform torch ships on is
little-endian); bfloat16 travels through a uint8 view because numpy has no bfloat16. No pickle.
"""
from __future__ import annotations

import sys

import torch

from kvmesh.api.common.v1 import common_pb2
from kvmesh.errors import InvalidArgument

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - no such platform in use
    raise ImportError("kvmesh's tensor wire format assumes a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} is not supported; supported: {', '.join(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (moved to the CPU and made contiguous first)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor owning a copy of ``data``; InvalidArgument when the sizes disagree."""
    numel = 1
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise InvalidArgument(f"tensor of shape {list(shape)} and dtype {DTYPE_NAMES.get(dtype, dtype)} needs "
                              f"{numel * itemsize} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=tensor_bytes(t))


def from_proto(msg: common_pb2.Tensor) -> torch.Tensor:
    return tensor_from_bytes(msg.data, dtype_from_name(msg.dtype), list(msg.shape))
