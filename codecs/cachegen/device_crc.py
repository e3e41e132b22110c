"""CRC-32 (zlib's, FORMAT.md §1) of bytes on the device, and the algebra that joins CRCs of pieces.

A container's CRC covers every byte before it. The device pipeline assembles most of a container on
the device; this module lets it check-sum those bytes there instead of on the host after the copy:

* each lane computes the *raw* CRC (register starting at 0, no final inversion) of one block of
  ``BS`` bytes, blocks aligned to the END of the message (bytes before its start count as zeros, which
  leave a raw CRC unchanged: so the message length may be known only on the device);
* the lane multiplies its CRC by x^(8·BS·d) mod P (d = blocks between it and the end), which is what
  the block's CRC becomes after the bytes that follow it; the lanes' results are XORed together.

raw(M) and zlib's crc32(M) differ by a term that depends only on len(M) (:func:`crc32_zeros`), and
:func:`crc32_combine` joins crc32(A) and crc32(B) into crc32(A + B) (zlib's crc32_combine, which
Python's zlib module does not expose). All three are exact GF(2) arithmetic: the result is zlib's
CRC of the same bytes, bit for bit.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

POLY = 0xEDB88320  # reflected CRC-32 polynomial (zlib, PNG)
_ONE = 1 << 31  # the polynomial 1 in the reflected representation


def multmodp(a: int, b: int) -> int:
    """a(x)·b(x) mod P, both reflected 32-bit polynomials (zlib's multmodp)."""
    m, p = _ONE, 0
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
        m >>= 1
    return p


@functools.lru_cache(maxsize=1)
def _x2n() -> tuple[int, ...]:
    """x^(2^k) mod P for k = 0..63."""
    t = [1 << 30]  # x^1
    for _ in range(63):
        t.append(multmodp(t[-1], t[-1]))
    return tuple(t)


def xpow8n(n: int) -> int:
    """x^(8n) mod P: the factor a CRC is multiplied by when n zero bytes follow its message."""
    p, k, t = _ONE, 3, _x2n()
    while n:
        if n & 1:
            p = multmodp(t[k], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(A + B) from crc1 = zlib.crc32(A), crc2 = zlib.crc32(B) and len2 = len(B)."""
    return multmodp(xpow8n(len2), crc1) ^ crc2


def crc32_zeros(n: int) -> int:
    """zlib.crc32(bytes(n)); zlib.crc32(M) == raw CRC of M ^ crc32_zeros(len(M))."""
    return multmodp(xpow8n(n), 0xFFFFFFFF) ^ 0xFFFFFFFF if n else 0


@functools.lru_cache(maxsize=1)
def _table_np() -> np.ndarray:
    t = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        t[i] = c
    return t


@functools.lru_cache(maxsize=16)
def _device_tables(device: str, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the byte table int32 [256], x^(8·bs·2^k) mod P for k < 64 as int32 [64]) on the device."""
    table = torch.from_numpy(_table_np().view(np.int32).copy()).to(device)
    pows, p = [], xpow8n(bs)
    for _ in range(64):
        pows.append(p)
        p = multmodp(p, p)
    powt = torch.from_numpy(np.array(pows, np.uint32).view(np.int32).copy()).to(device)
    return table, powt


@triton.jit
def _multmodp(a, b):
    """Lane-wise a·b mod P (reflected uint32 polynomials), 32 fixed steps."""
    p = tl.zeros_like(b)
    for k in range(32):
        bit = (a >> (31 - k)) & 1
        p = p ^ tl.where(bit != 0, b, tl.zeros_like(b))
        # POLY as int32 bits: a literal above 2^31 is not an int32 constant on every Triton
        poly = tl.full(b.shape, -306674912, tl.int32).to(tl.uint32, bitcast=True)
        b = (b >> 1) ^ tl.where((b & 1) != 0, poly, tl.zeros_like(b))
    return p


@triton.jit
def _crc_blocks_kernel(buf_ptr, base, len_ptr, nb, tab_ptr, pow_ptr, out_ptr,
                       BS: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr):
    """Lane i: raw CRC of bytes [n - (d + 1)·BS, n - d·BS) of buf[base:] (d = nb - 1 - i, bytes before
    0 read as zeros), times x^(8·BS·d); the program XORs its lanes' into out[0]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < nb
    n = tl.load(len_ptr).to(tl.int64)
    d = (nb - 1 - i).to(tl.int64)
    start = n - (d + 1) * BS
    c = tl.zeros([BLOCK], tl.uint32)
    for j in range(BS):
        pos = start + j
        b = tl.load(buf_ptr + base + pos, mask=valid & (pos >= 0), other=0).to(tl.uint32)
        idx = ((c ^ b) & 255).to(tl.int32)
        c = tl.load(tab_ptr + idx).to(tl.uint32, bitcast=True) ^ (c >> 8)
    for k in range(NBITS):
        f = tl.load(pow_ptr + k).to(tl.uint32, bitcast=True)
        shifted = _multmodp(tl.full([BLOCK], 0, tl.uint32) | f, c)
        c = tl.where(((d >> k) & 1) != 0, shifted, c)
    c = tl.where(valid, c, tl.zeros_like(c))
    tl.atomic_xor(out_ptr, tl.xor_sum(c, axis=0).to(tl.int32, bitcast=True))


def raw_crc(buf: torch.Tensor, base: int, length: torch.Tensor, max_length: int, interpret: bool = False
            ) -> torch.Tensor:
    """Raw CRC-32 (init 0, no final inversion) of buf[base : base + length] (uint8 on the device; length
    int64 [1] on the device, at most max_length): int32 [1] on the device holding the CRC's bits.
    Nothing synchronises; add crc32_zeros(length) on the host (XOR) for zlib's CRC."""
    out = torch.zeros(1, dtype=torch.int32, device=buf.device)
    bs = 64 if interpret else 256
    nb = triton.cdiv(max(max_length, 1), bs)
    table, pows = _device_tables(str(buf.device), bs)
    block = min(4096 if interpret else 128, triton.next_power_of_2(nb))
    _crc_blocks_kernel[(triton.cdiv(nb, block),)](buf, base, length, nb, table, pows, out,
                                                 BS=bs, NBITS=max(1, nb.bit_length()), BLOCK=block)
    return out
