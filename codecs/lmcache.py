"""`lmcache-cachegen`: LMCache's CacheGen scheme, reproduced so its numbers come from this project.

As LMCache does it: K layers 0-9 get 32 bins, later layers 16; V layers 0-1 get 32, later 16. One
scale per (K/V, layer, token) = max |x| over the channels (stored fp16, rounded up);
q = round(x * MAX / scale + MAX) with MAX = bins / 2 - 1. Per (K/V, layer, channel) a histogram over
the chunk's tokens becomes a 33-entry 16-bit CDF stored with the chunk (2 * L * C * 66 bytes), and
each (K/V, layer, channel) is one arithmetic-coded stream over all tokens. LMCache's arithmetic coder
(torchac) reads the 16-bit CDF directly; here the symbols go through our rANS with 12-bit
frequencies derived from the stored CDF by integer arithmetic, which costs a hair more than
torchac's 16-bit precision but stores exactly LMCache's bytes for the model.
"""
from __future__ import annotations

import numpy as np
import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec, check_kv
from kvmesh.codecs.cachegen import rans
from kvmesh.codecs.cachegen.codec import pack_uints, unpack_uints
from kvmesh.codecs.cachegen.quant import FP16_MAX, fp16_round_up
from kvmesh.codecs.errors import CodecError

CDF_ENTRIES = 33
_BLOCK = 1024  # streams per rANS call (each stream has its own table)


def lmcache_bins(layers: int) -> np.ndarray:
    """int [2, L]: LMCache's bins per (K/V, layer)."""
    layer = np.arange(layers)
    return np.stack([np.where(layer < 10, 32, 16), np.where(layer < 2, 32, 16)]).astype(np.int64)


def cdf_from_hist(hist: np.ndarray) -> np.ndarray:
    """uint16 [S, 33]: cdf[s] = floor(cum[s] * 65535 / n) of each row's histogram over 32 symbols."""
    cum = np.zeros((hist.shape[0], CDF_ENTRIES), np.int64)
    np.cumsum(hist, axis=1, out=cum[:, 1:])
    n = np.maximum(cum[:, -1:], 1)
    return (cum * 65535 // n).astype(np.uint16)


def freq_from_cdf(cdf: np.ndarray, bins: int) -> np.ndarray:
    """int32 [S, bins] 12-bit rANS frequencies (each >= 1, sum 4096) from stored 16-bit CDFs."""
    p = np.diff(cdf.astype(np.int64), axis=1)[:, :bins]
    freq = 1 + p * (rans.M - bins) // 65536
    top = np.argmax(freq, axis=1)
    freq[np.arange(freq.shape[0]), top] += rans.M - freq.sum(axis=1)
    return freq.astype(np.int32)


class LMCacheCodec(Codec):
    name = "lmcache-cachegen"
    codec_id = 6

    def encode(self, kv: torch.Tensor) -> bytes:
        kv = check_kv(kv)
        if float(kv.abs().amax()) > FP16_MAX:
            raise CodecError("lmcache-cachegen stores fp16 scales: values beyond +-65504 cannot be encoded")
        x = kv.detach().cpu().to(torch.float32)
        _, L, T, C = x.shape
        bins = lmcache_bins(L)
        mx = torch.from_numpy(bins / 2 - 1).to(torch.float32)[:, :, None, None]  # MAX per (K/V, layer)
        scale = fp16_round_up(torch.amax(x.abs(), dim=3, keepdim=True))
        s32 = scale.to(torch.float32)
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.floor(x * mx / safe + mx + 0.5).clamp(min=0).to(torch.uint8)
        q = torch.minimum(q, (2 * mx).to(torch.uint8))
        # streams: (K/V, layer, channel) over all tokens
        sym = q.permute(0, 1, 3, 2).reshape(-1, T).numpy()
        S = sym.shape[0]
        hist = np.bincount((np.arange(S)[:, None] * 32 + sym).reshape(-1), minlength=S * 32).reshape(S, 32)
        cdf = cdf_from_hist(hist)
        words, counts = self._code(sym, cdf, bins, C)
        sections = [scale.contiguous().view(torch.int16).numpy().tobytes(), cdf.astype("<u2").tobytes(),
                    pack_uints(counts), words.astype("<u2").tobytes()]
        return container.pack(self.codec_id, 0, kv.dtype, tuple(kv.shape), sections)

    @staticmethod
    def _blocks(bins: np.ndarray, C: int):
        """(bins, stream indices) in blocks of at most _BLOCK streams sharing a bin count."""
        stream_bins = np.repeat(bins.reshape(-1), C)
        for b in np.unique(stream_bins):
            rows = np.flatnonzero(stream_bins == b)
            for i in range(0, rows.size, _BLOCK):
                yield int(b), rows[i : i + _BLOCK]

    def _code(self, sym: np.ndarray, cdf: np.ndarray, bins: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
        S, T = sym.shape
        parts = []
        for b, rows in self._blocks(bins, C):
            freq = freq_from_cdf(cdf[rows], b)
            cum, _ = rans.build_tables(freq)
            w, cnt = rans.encode(sym[rows], np.full(rows.size, T, np.int32), np.arange(rows.size), freq, cum)
            parts.append((rows, w, cnt))
        return rans.merge_groups(S, parts)

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        header, (scale_raw, cdf_raw, lens, words_raw) = self._unpack(blob, 4)
        _, L, T, C = header.shape
        S = 2 * L * C
        if len(scale_raw) != 2 * 2 * L * T or len(cdf_raw) != 2 * S * CDF_ENTRIES:
            raise CodecError("corrupt lmcache-cachegen container: section sizes do not match the shape")
        scale = torch.from_numpy(np.frombuffer(scale_raw, np.int16).copy()).view(torch.float16).reshape(2, L, T, 1)
        if not bool(torch.isfinite(scale).all()):
            raise CodecError("corrupt lmcache-cachegen container: non-finite scale")
        cdf = np.frombuffer(cdf_raw, "<u2").reshape(S, CDF_ENTRIES)
        if np.any(np.diff(cdf.astype(np.int64), axis=1) < 0):
            raise CodecError("corrupt lmcache-cachegen container: CDF not monotone")
        counts = unpack_uints(lens, S)
        words = np.frombuffer(words_raw, "<u2")
        if np.any(counts < 2) or np.any(counts > T + 2) or 2 * int(counts.sum()) != len(words_raw):
            raise CodecError("corrupt lmcache-cachegen container: stream word counts do not match the words")
        bins = lmcache_bins(L)
        starts = np.zeros(S, np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        sym = np.zeros((S, T), np.uint8)
        for b, rows in self._blocks(bins, C):
            freq = freq_from_cdf(cdf[rows], b)
            cum, s2s = rans.build_tables(freq)
            cnt = counts[rows]
            local = np.zeros(rows.size, np.int64)
            np.cumsum(cnt[:-1], out=local[1:])
            w = words[np.repeat(starts[rows] - local, cnt) + np.arange(int(cnt.sum()))]
            sym[rows] = rans.decode(w, cnt, np.full(rows.size, T, np.int32), np.arange(rows.size), freq, cum, s2s, T)
        q = torch.from_numpy(sym).reshape(2, L, C, T).permute(0, 1, 3, 2).to(torch.float32)
        mx = torch.from_numpy(bins / 2 - 1).to(torch.float32)[:, :, None, None]
        out = ((q - mx) * scale.to(torch.float32) / mx).to(header.dtype)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        _, L, T, C = shape
        S = 2 * L * C
        counts = 3 + (S * (T + 2).bit_length() + 7) // 8
        return container.container_overhead(4) + 4 * L * T + 2 * S * CDF_ENTRIES + counts + 2 * S * (T + 2)
