"""The `cachegen` codec: quantize (quant.py) -> per-stream models (tables.py) -> rANS (rans.py).

Container sections (FORMAT.md has the byte-level specification):
  0 params      key mode, value mode, segment length, table family, levels - 1 per (K/V, layer)
  1 key side    fp16 quantization bounds of K
  2 value side  fp16 quantization bounds of V
  3 stream meta center symbol per stream, then table index per stream (uint8 each)
  4 lengths     words per stream, bit-packed
  5 words       the rANS words, uint16 little-endian, streams concatenated
"""
from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec, check_kv
from kvmesh.codecs.cachegen import quant
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.layout import StreamLayout, stream_layout
from kvmesh.codecs.cachegen.levels import LEVELS, Level
from kvmesh.codecs.cachegen.tables import NUM_TABLES, TABLE_FAMILY_VERSION
from kvmesh.codecs.errors import CodecError

CODEC_ID = 2
N_SECTIONS = 6
_PARAMS = struct.Struct("<BBHB")
_COUNTS = struct.Struct("<HB")


def pack_uints(values: np.ndarray) -> bytes:
    """base uint16, bit width uint8, then each value - base in `width` bits, LSB first."""
    base = int(values.min()) if values.size else 0
    v = (values.astype(np.int64) - base)
    width = int(v.max()).bit_length() if v.size else 0
    bits = ((v[:, None] >> np.arange(width)) & 1).astype(np.uint8)
    return _COUNTS.pack(base, width) + np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_uints(raw: memoryview, n: int) -> np.ndarray:
    if len(raw) < _COUNTS.size:
        raise CodecError("corrupt cachegen container: stream lengths section too short")
    base, width = _COUNTS.unpack_from(raw, 0)
    if width > 16 or len(raw) != _COUNTS.size + (n * width + 7) // 8:
        raise CodecError("corrupt cachegen container: stream lengths section has the wrong size")
    bits = np.unpackbits(np.frombuffer(raw[_COUNTS.size :], np.uint8), bitorder="little")[: n * width]
    v = (bits.reshape(n, width).astype(np.int64) << np.arange(width)).sum(axis=1) if width else np.zeros(n, np.int64)
    return v + base


def side_bytes(mode: int, layers: int, tokens: int, channels: int) -> int:
    return 2 * int(np.prod(quant.side_shape(mode, layers, tokens, channels)))


class CacheGenCodec(Codec):
    codec_id = CODEC_ID

    def __init__(self, level: Level, backend: object | None = None) -> None:
        self.level = level
        self.level_id = level.level_id
        self.name = "cachegen" if level.name == "default" else f"cachegen-{level.name}"
        self.backend = backend if backend is not None else CpuBackend()

    # -- encode ----------------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor) -> bytes:
        kv = check_kv(kv)
        if float(kv.abs().amax()) > quant.FP16_MAX:
            raise CodecError("cachegen stores fp16 bounds: values beyond +-65504 cannot be encoded (use 'lossless')")
        _, L, T, C = kv.shape
        levels = self.level.levels_for(L)
        modes = (self.level.key_mode, self.level.value_mode)
        layout = stream_layout(L, T, C, levels)
        x = kv.detach().to(self.backend.device, torch.float32)
        q, sides = self.backend.quantize(x, levels, modes)
        hist = self.backend.histogram(q, layout)
        center, table = self.backend.choose_tables(hist, layout)
        words, counts = self.backend.rans_encode(q, center, table, layout)
        sections = self._sections(levels, modes, sides, center, table, words, counts)
        return container.pack(self.codec_id, self.level_id, kv.dtype, tuple(kv.shape), sections)

    def encode_parts(self, kv: torch.Tensor) -> dict[str, int]:
        """Where the bytes of encode(kv) go, by section (for the benchmark)."""
        blob = self.encode(kv)
        header, sections = container.unpack(blob)
        names = ("params", "key_side", "value_side", "stream_meta", "stream_lengths", "symbols")
        parts = {n: len(s) for n, s in zip(names, sections)}
        parts["header"] = len(blob) - sum(parts.values())
        return parts

    @staticmethod
    def _sections(levels: np.ndarray, modes: tuple[int, int], sides: list[torch.Tensor], center: np.ndarray,
                  table: np.ndarray, words: np.ndarray, counts: np.ndarray) -> list[bytes]:
        params = _PARAMS.pack(modes[0], modes[1], quant.SEGMENT, TABLE_FAMILY_VERSION) + (levels - 1).astype(np.uint8).tobytes()
        side = [s.detach().cpu().contiguous().view(torch.int16).numpy().tobytes() for s in sides]
        meta = np.asarray(center, np.uint8).tobytes() + np.asarray(table, np.uint8).tobytes()
        return [params, side[0], side[1], meta, pack_uints(np.asarray(counts)),
                np.asarray(words, dtype="<u2").tobytes()]

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        header, (params, kside, vside, meta, lens, words) = self._unpack(blob, N_SECTIONS)
        _, L, T, C = header.shape
        if len(params) != _PARAMS.size + 2 * L:
            raise CodecError("corrupt cachegen container: params section has the wrong size")
        kmode, vmode, segment, family = _PARAMS.unpack_from(params, 0)
        if kmode not in quant.MODES or vmode not in quant.MODES:
            raise CodecError(f"corrupt cachegen container: unknown quantization modes {kmode}, {vmode}")
        if segment != quant.SEGMENT or family != TABLE_FAMILY_VERSION:
            raise CodecError(f"cachegen container uses segment {segment} / table family {family}; "
                             f"this build reads {quant.SEGMENT} / {TABLE_FAMILY_VERSION}")
        levels = np.frombuffer(params[_PARAMS.size :], np.uint8).astype(np.int64).reshape(2, L) + 1
        if levels.min() < 2:
            raise CodecError("corrupt cachegen container: a layer has fewer than 2 levels")
        layout = stream_layout(L, T, C, levels)
        S = layout.num_streams
        sides = []
        for raw, mode in ((kside, kmode), (vside, vmode)):
            if len(raw) != side_bytes(mode, L, T, C):
                raise CodecError("corrupt cachegen container: side information has the wrong size")
            t = torch.from_numpy(np.frombuffer(raw, np.int16).copy()).view(torch.float16)
            if not bool(torch.isfinite(t).all()):
                raise CodecError("corrupt cachegen container: non-finite quantization bound")
            sides.append(t.reshape(quant.side_shape(mode, L, T, C)))
        if len(meta) != 2 * S:
            raise CodecError("corrupt cachegen container: stream meta section has the wrong size")
        m = np.frombuffer(meta, np.uint8)
        center, table = m[:S], m[S:]
        if np.any(center.astype(np.int64) >= layout.stream_levels) or np.any(table >= NUM_TABLES):
            raise CodecError("corrupt cachegen container: stream center or table index out of range")
        counts = unpack_uints(lens, S)
        if np.any(counts < 2) or np.any(counts > layout.lengths + 2) or 2 * int(counts.sum()) != len(words):
            raise CodecError("corrupt cachegen container: stream word counts do not match the stored words")
        w = np.frombuffer(words, dtype="<u2")
        q = self.backend.rans_decode(w, counts.astype(np.int32), center, table, layout)
        x = self.backend.dequantize(q, [s.to(self.backend.device) for s in sides], levels, (kmode, vmode))
        out = x.to(header.dtype)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        _, L, T, C = shape
        layout_streams = 2 * L * C * quant.num_segments(T)
        words = 2 * (2 * L * C * T + 2 * layout_streams)  # rANS emits at most one word per symbol
        counts = _COUNTS.size + (layout_streams * 9 + 7) // 8  # counts - base <= 258 - 2 needs 9 bits
        return (container.container_overhead(N_SECTIONS) + _PARAMS.size + 2 * L
                + side_bytes(self.level.key_mode, L, T, C) + side_bytes(self.level.value_mode, L, T, C)
                + 2 * layout_streams + counts + words)


def make_codec(level_name: str, backend: str) -> CacheGenCodec:
    level = LEVELS[level_name]
    if backend == "triton":
        try:
            from kvmesh.codecs.cachegen.triton_backend import TritonBackend
        except ImportError as e:
            raise CodecError(f"the triton backend is not available: {e}") from None
        return CacheGenCodec(level, TritonBackend())
    return CacheGenCodec(level)
