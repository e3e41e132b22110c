"""`lossless`: byte-plane shuffle + zlib, bit-exact for fp16/bf16/fp32.

The bytes of each element are split into planes (all low bytes, then all high bytes, ...): the
exponent/sign planes of KV values are highly repetitive and deflate well, the mantissa planes less so.
If deflate does not shrink the data, the planes are stored as they are, so the output never exceeds
raw size + a fixed overhead (which is what max_encoded_size returns).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec, check_kv, shape_numel
from kvmesh.codecs.errors import CodecError

_STORED, _DEFLATED = 0, 1
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class LosslessCodec(Codec):
    name = "lossless"
    codec_id = 1

    def __init__(self, zlib_level: int = 6) -> None:
        self.zlib_level = zlib_level

    def encode(self, kv: torch.Tensor) -> bytes:
        kv = check_kv(kv)
        width = kv.element_size()
        raw = kv.detach().contiguous().cpu().view(_INT_VIEW[kv.dtype]).numpy().view(np.uint8)
        planes = np.ascontiguousarray(raw.reshape(-1, width).T).tobytes()
        packed = zlib.compress(planes, self.zlib_level)
        if len(packed) < len(planes):
            mode, payload = _DEFLATED, packed
        else:
            mode, payload = _STORED, planes
        return container.pack(self.codec_id, 0, kv.dtype, tuple(kv.shape), [bytes([mode]), payload])

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        header, (mode_sec, payload) = self._unpack(blob, 2)
        width = element_bytes(header.dtype)
        n = shape_numel(header.shape) * width
        if len(mode_sec) != 1 or mode_sec[0] not in (_STORED, _DEFLATED):
            raise CodecError("corrupt lossless container: bad mode byte")
        if mode_sec[0] == _DEFLATED:
            try:
                dec = zlib.decompressobj()
                planes = dec.decompress(payload, n + 1)
                if not dec.eof or dec.unused_data or dec.unconsumed_tail:
                    raise CodecError("corrupt lossless container: deflate stream does not end where it should")
            except zlib.error as e:
                raise CodecError(f"corrupt lossless container: {e}") from None
        else:
            planes = bytes(payload)
        if len(planes) != n:
            raise CodecError(f"corrupt lossless container: {len(planes)} bytes of data, expected {n}")
        raw = np.frombuffer(planes, dtype=np.uint8).reshape(width, -1).T.copy()
        out = torch.from_numpy(raw.reshape(-1)).view(_INT_VIEW[header.dtype]).view(header.dtype).reshape(header.shape)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return container.container_overhead(2) + 1 + shape_numel(shape) * element_bytes(dtype)
