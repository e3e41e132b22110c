"""`int8`, `int4` and `fp8`: plain quantization without entropy coding, for comparison and for speed.

int8/int4 use uniform asymmetric quantization, KIVI-style: keys per (layer, channel) over each
256-token segment (keys have outlier channels whose range would swamp a per-token scale), values per
(layer, token) over the channels (value errors matter per token, in the attention-weighted sum).
Group bounds are fp16, rounded outwards, so every element is within half a step of its group's grid.

fp8 stores e4m3 (torch.float8_e4m3fn) values with one fp16 scale per (K/V, layer, token), the
smallest fp16 >= absmax / 448; e4m3's exponent already gives per-element relative precision, so
outlier channels cost no precision elsewhere.
"""
from __future__ import annotations

import numpy as np
import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec, check_kv
from kvmesh.codecs.cachegen.quant import (
    FP16_MAX,
    dequantize_uniform,
    fp16_round_up,
    group_bounds,
    quantize_uniform,
)
from kvmesh.codecs.errors import CodecError

SEGMENT = 256  # tokens per key group


def _check_fp16_range(kv: torch.Tensor, name: str) -> None:
    if float(kv.abs().amax()) > FP16_MAX:
        raise CodecError(f"{name} stores fp16 scales: values beyond +-65504 cannot be encoded (use 'lossless')")


def _segments(tokens: int) -> int:
    return -(-tokens // SEGMENT)


def _pad_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pads dim -2 to n tokens by repeating the last token (does not change a group's min/max)."""
    t = x.shape[-2]
    if t == n:
        return x
    return torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], n - t, x.shape[-1])], dim=-2)


def key_bounds(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k fp32 [L, T, C] -> lo, hi fp16 [L, nseg, 1, C] over each 256-token segment."""
    L, T, C = k.shape
    nseg = _segments(T)
    kp = _pad_tokens(k, nseg * SEGMENT).reshape(L, nseg, SEGMENT, C)
    return group_bounds(kp, dim=2)


def _expand_key(side: torch.Tensor, T: int) -> torch.Tensor:
    """[L, nseg, 1, C] -> [L, T, C] (each token gets its segment's bound)."""
    L, nseg, _, C = side.shape
    return side.expand(L, nseg, SEGMENT, C).reshape(L, nseg * SEGMENT, C)[:, :T]


def _pack_nibbles(q: np.ndarray) -> bytes:
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_nibbles(b: memoryview, n: int) -> np.ndarray:
    raw = np.frombuffer(b, dtype=np.uint8)
    out = np.empty(raw.size * 2, np.uint8)
    out[0::2] = raw & 15
    out[1::2] = raw >> 4
    return out[:n]


def _fp16_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()


def _fp16_from(b: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    a = np.frombuffer(b, dtype=np.int16).copy()
    t = torch.from_numpy(a).view(torch.float16).reshape(shape)
    if not bool(torch.isfinite(t).all()):
        raise CodecError("corrupt container: non-finite scale")
    return t


class UniformCodec(Codec):
    """int8 / int4: keys per (layer, channel, segment), values per (layer, token)."""

    def __init__(self, name: str, codec_id: int, bits: int) -> None:
        self.name, self.codec_id, self.bits = name, codec_id, bits
        self.levels = torch.tensor(float(2**bits))

    def _sym_bytes(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    def encode(self, kv: torch.Tensor) -> bytes:
        kv = check_kv(kv)
        _check_fp16_range(kv, self.name)
        x = kv.detach().cpu().to(torch.float32)
        L, T, C = x.shape[1:]
        k, v = x[0], x[1]
        klo, khi = key_bounds(k)
        qk = quantize_uniform(k, _expand_key(klo, T), _expand_key(khi, T), self.levels)
        vlo, vhi = group_bounds(v, dim=2)
        qv = quantize_uniform(v, vlo, vhi, self.levels)
        syms = torch.stack([qk, qv]).numpy()
        payload = syms.tobytes() if self.bits == 8 else _pack_nibbles(syms)
        side = _fp16_bytes(torch.stack([klo, khi])) + _fp16_bytes(torch.stack([vlo, vhi]))
        return container.pack(self.codec_id, 0, kv.dtype, tuple(kv.shape), [side, payload])

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        header, (side, payload) = self._unpack(blob, 2)
        _, L, T, C = header.shape
        nseg = _segments(T)
        nk, nv = 2 * L * nseg * C, 2 * L * T
        if len(side) != 2 * (nk + nv) or len(payload) != self._sym_bytes(2 * L * T * C):
            raise CodecError(f"corrupt {self.name} container: section sizes do not match shape {header.shape}")
        kb = _fp16_from(side[: 2 * nk], (2, L, nseg, 1, C))
        vb = _fp16_from(side[2 * nk :], (2, L, T, 1))
        n = 2 * L * T * C
        syms = np.frombuffer(payload, np.uint8) if self.bits == 8 else _unpack_nibbles(payload, n)
        q = torch.from_numpy(syms.copy()).reshape(2, L, T, C)
        k = dequantize_uniform(q[0], _expand_key(kb[0], T), _expand_key(kb[1], T), self.levels)
        v = dequantize_uniform(q[1], vb[0], vb[1], self.levels)
        out = torch.stack([k, v]).to(header.dtype)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        _, L, T, C = shape
        side = 2 * (2 * L * _segments(T) * C + 2 * L * T)
        return container.container_overhead(2) + side + self._sym_bytes(2 * L * T * C)


FP8_MAX = 448.0


class Fp8Codec(Codec):
    """e4m3 values with one fp16 scale per (K/V, layer, token)."""

    name = "fp8"
    codec_id = 5

    def encode(self, kv: torch.Tensor) -> bytes:
        kv = check_kv(kv)
        _check_fp16_range(kv, self.name)
        x = kv.detach().cpu().to(torch.float32)
        amax = torch.amax(x.abs(), dim=3, keepdim=True)
        # smallest fp16 scale with amax / scale <= 448; an all-zero token gets scale 1
        scale = fp16_round_up(amax / FP8_MAX)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = torch.clamp(x / scale.to(torch.float32), -FP8_MAX, FP8_MAX)
        q = y.to(torch.float8_e4m3fn).view(torch.uint8)
        return container.pack(self.codec_id, 0, kv.dtype, tuple(kv.shape), [_fp16_bytes(scale), q.numpy().tobytes()])

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        header, (side, payload) = self._unpack(blob, 2)
        _, L, T, C = header.shape
        if len(side) != 2 * 2 * L * T or len(payload) != 2 * L * T * C:
            raise CodecError(f"corrupt fp8 container: section sizes do not match shape {header.shape}")
        scale = _fp16_from(side, (2, L, T, 1))
        q = torch.from_numpy(np.frombuffer(payload, np.uint8).copy()).reshape(2, L, T, C)
        y = q.view(torch.float8_e4m3fn).to(torch.float32)
        if not bool(torch.isfinite(y).all()):
            raise CodecError("corrupt fp8 container: NaN code")
        out = (y * scale.to(torch.float32)).to(header.dtype)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        _, L, T, C = shape
        return container.container_overhead(2) + 4 * L * T + 2 * L * T * C
