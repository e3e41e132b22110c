"""kvmesh-rans32x16: static-model rANS over many independent streams (numpy reference).

The bit-exact format (fixed for the CPU and Triton paths alike):

- ``PROB_BITS = 12``, ``M = 4096``. Table ``t`` has ``freq[t][s] >= 1`` for every symbol ``s < A``
  (``A <= 256``), summing to ``M``; ``cum[t][s]`` is the exclusive prefix sum (``cum[t][A] = M``).
- State ``x`` is a uint32, ``L = 2**16``, initially ``x = L``.
- Encode a stream's symbols in reverse (``i = n-1 .. 0``): if ``x >= f << 20`` emit ``x & 0xFFFF``
  and ``x >>= 16``; then ``x = ((x // f) << 12) + x % f + c``. Finally emit ``x & 0xFFFF`` then
  ``x >> 16``. A stream's words are the emitted words in reverse emission order (>= 2 words).
- Decode: ``x = w[0] << 16 | w[1]``; per symbol ``slot = x & 4095``, ``s = slot_to_symbol[slot]``,
  ``x = f * (x >> 12) + slot - c``; if ``x < L`` read the next word: ``x = x << 16 | w[pos]``.
  A valid stream ends with ``x == L`` having read exactly all of its words.

A stream may interleave P per-symbol tables: with ``table_idx`` of shape (S, P), symbol ``i`` of stream
``k`` is coded with table ``table_idx[k, i % P]`` (cachegen puts P adjacent channels in one stream, token
by token, so that P channels share one state's start and flush). A 1-D ``table_idx`` is P = 1.

Streams are independent, so every function here runs all streams at once: one Python-level step per
symbol position, each step a handful of numpy operations over thousands of streams. Positions past a
stream's length use an identity entry (encode: ``f = M, c = 0``; decode: a table whose slots map to
``f = M``, bias = slot), which leaves the state untouched and never renormalises, so ragged lengths
cost no masking in the loop.
"""
from __future__ import annotations

import numpy as np

from kvmesh.codecs.errors import CodecError

PROB_BITS = 12
M = 1 << PROB_BITS
L = 1 << 16
MAX_ALPHABET = 256

# floor(x / f) for x < 2**32, f <= 4096 is exact in float64 with IEEE division: the quotient's
# fractional part is 0 or >= 1/f >= 2**-12, far above the 2**-21 rounding error at 2**32.
_TWO_20 = float(1 << 20)
_INV_L = 1.0 / L


def validate_freq(freq: np.ndarray) -> np.ndarray:
    """Checks a (NT, A) frequency table against the spec and returns it as int64.

    A frequency of 0 is accepted (beyond the spec, whose tables have f >= 1 for all s < A) so that
    tables of several alphabet sizes can share one call, each padded with zeros to the largest A;
    coding a symbol whose frequency is 0 raises CodecError.
    """
    freq = np.asarray(freq)
    if freq.ndim != 2 or freq.shape[0] < 1 or not 1 <= freq.shape[1] <= MAX_ALPHABET:
        raise CodecError(f"rANS frequency table must be (tables, 1..{MAX_ALPHABET}), got {freq.shape}")
    if not np.issubdtype(freq.dtype, np.integer):
        raise CodecError(f"rANS frequency table must be integers, got {freq.dtype}")
    f = freq.astype(np.int64)
    if f.min() < 0:
        raise CodecError("rANS frequency table has a negative frequency")
    sums = f.sum(axis=1)
    if not np.all(sums == M):
        bad = int(np.flatnonzero(sums != M)[0])
        raise CodecError(f"rANS table {bad} sums to {int(sums[bad])}, not {M}")
    return f


def build_tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cum int32 (NT, A+1), slot_to_symbol uint8 (NT, 4096)) for a validated frequency table."""
    f = validate_freq(freq)
    nt, a = f.shape
    cum = np.zeros((nt, a + 1), dtype=np.int32)
    np.cumsum(f, axis=1, out=cum[:, 1:])
    symbols = np.arange(a, dtype=np.uint8)
    slot_to_symbol = np.stack([np.repeat(symbols, f[t]) for t in range(nt)])
    return cum, slot_to_symbol


def _check_cum(freq: np.ndarray, cum: np.ndarray) -> np.ndarray:
    cum = np.asarray(cum)
    nt, a = freq.shape
    if cum.shape != (nt, a + 1):
        raise CodecError(f"rANS cum table must be {(nt, a + 1)}, got {cum.shape}")
    expect = np.zeros((nt, a + 1), dtype=np.int64)
    np.cumsum(freq, axis=1, out=expect[:, 1:])
    if not np.array_equal(cum, expect):
        raise CodecError("rANS cum table is not the prefix sum of the frequency table")
    return expect


def _check_streams(lengths: np.ndarray, table_idx: np.ndarray, nt: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64 [S], table_idx int64 [S, P])."""
    lengths = np.asarray(lengths)
    table_idx = np.asarray(table_idx)
    if table_idx.ndim == 1:
        table_idx = table_idx[:, None]
    if lengths.ndim != 1 or table_idx.ndim != 2 or table_idx.shape[0] != lengths.shape[0] or table_idx.shape[1] < 1:
        raise CodecError(f"rANS lengths {lengths.shape} and table_idx {table_idx.shape} must be [S] and [S] or [S, P]")
    if lengths.size and (lengths.min() < 0 or lengths.max() > n):
        raise CodecError(f"rANS stream lengths must lie in [0, {n}]")
    if table_idx.size and (table_idx.min() < 0 or table_idx.max() >= nt):
        raise CodecError(f"rANS table index out of range [0, {nt})")
    return lengths.astype(np.int64), table_idx.astype(np.int64)


def encode(
    symbols: np.ndarray,
    lengths: np.ndarray,
    table_idx: np.ndarray,
    freq: np.ndarray,
    cum: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes stream k = symbols[k, :lengths[k]], symbol i with table table_idx[k] ([S]) or
    table_idx[k, i % P] ([S, P]).

    Returns (all words uint16, concatenated in stream order; words per stream int32).
    """
    symbols = np.asarray(symbols)
    if symbols.ndim != 2 or symbols.dtype != np.uint8:
        raise CodecError(f"rANS symbols must be a 2-D uint8 array, got {symbols.dtype} {symbols.shape}")
    f64 = validate_freq(freq)
    c64 = _check_cum(f64, cum)
    nt, a = f64.shape
    s, n = symbols.shape
    lengths, table_idx = _check_streams(lengths, table_idx, nt, n)
    if s == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.int32)

    ragged = bool(np.any(lengths != n))
    if n:
        if ragged:
            valid = np.arange(n)[None, :] < lengths[:, None]
            top = int(symbols[valid].max()) if valid.any() else 0
        else:
            top = int(symbols.max())
        if top >= a:
            raise CodecError(f"rANS symbol {top} outside the alphabet of {a}")

    # One gather per symbol fetches (f, c) together: a complex128 table holds f in .real and c in
    # .imag. Entry nt*a is the identity entry for positions past a stream's end.
    pair = np.empty(nt * a + 1, dtype=np.complex128)
    pair.real[:-1] = f64.ravel()
    pair.imag[:-1] = c64[:, :a].ravel()
    pair[-1] = complex(M, 0)
    pad = nt * a
    bases = np.ascontiguousarray((table_idx * a).T)  # [P, S]
    period = bases.shape[0]

    sym_t = np.ascontiguousarray(symbols.T)  # step-major: each step reads one contiguous row
    x = np.full(s, float(L))
    idx = np.empty(s, dtype=np.intp)
    fc = np.empty(s, dtype=np.complex128)
    f, c = fc.real, fc.imag
    q = np.empty(s)
    g = np.empty(s)
    m = np.empty(s, dtype=np.bool_)
    # Renormalisation hits a minority of streams per step, so it works on their indices only:
    # emitted words are collected per step with their stream and their rank within the stream.
    done = np.zeros(s, dtype=np.int64)  # words emitted so far (processing order) per stream
    got_stream, got_rank, got_word = [], [], []
    # A zero-frequency symbol divides by zero: the state turns inf/NaN and is caught after the loop.
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n - 1, -1, -1):
            np.add(bases[i % period], sym_t[i], out=idx)
            if ragged:
                np.copyto(idx, pad, where=lengths <= i)
            np.take(pair, idx, out=fc, mode="clip")
            # x >= f << 20  <=>  x // f >= 2**20 (exact: see the note at _TWO_20).
            np.divide(x, f, out=q)
            np.floor(q, out=q)
            np.greater_equal(q, _TWO_20, out=m)
            ids = np.flatnonzero(m)
            if ids.size:
                xv = x[ids]
                hv = np.floor(xv * _INV_L)
                got_word.append(xv - hv * float(L))
                x[ids] = hv
                q[ids] = np.floor(hv / f[ids])
                r = done[ids]
                got_rank.append(r)
                done[ids] = r + 1
                got_stream.append(ids)
            # x = (x // f) * M + x % f + c  ==  x + (x // f) * (M - f) + c
            np.subtract(M, f, out=g)
            q *= g
            x += q
            x += c

    if not np.all(np.isfinite(x)):
        k = int(np.flatnonzero(~np.isfinite(x))[0])
        raise CodecError(f"rANS stream {k} holds a symbol whose frequency in its table is 0")
    xi = x.astype(np.int64)
    counts = done + 2
    ends = np.cumsum(counts)
    starts = ends - counts
    words = np.empty(int(ends[-1]), dtype=np.uint16)
    words[starts] = xi >> 16
    words[starts + 1] = xi & 0xFFFF
    if got_stream:
        # Stream k's words end with its first emission (i = n-1 side), so the word emitted r-th
        # in processing order sits r places from the stream's end.
        k = np.concatenate(got_stream)
        words[ends[k] - 1 - np.concatenate(got_rank)] = np.concatenate(got_word)
    return words, counts.astype(np.int32)


_LUT_CACHE: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}



def merge_groups(num_streams: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Words and per-stream word counts in stream order, from encodes of disjoint groups of streams.

    Each part is ``(rows, words, counts)``: ``encode``'s output for the streams ``rows`` (ascending).
    """
    counts = np.zeros(num_streams, np.int64)
    for rows, _, cnt in parts:
        counts[rows] = cnt
    if len(parts) == 1 and parts[0][0].size == num_streams:
        return parts[0][1], counts
    starts = np.zeros(num_streams, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    out = np.empty(int(counts.sum()), np.uint16)
    for rows, words, cnt in parts:
        local = np.zeros(rows.size, np.int64)
        np.cumsum(cnt[:-1], out=local[1:])
        out[np.repeat(starts[rows] - local, cnt) + np.arange(words.size)] = words
    return out, counts


def _decode_lut(f64: np.ndarray, c64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slot_to_symbol the tables imply, packed decode entries) for validated tables, cached: building
    them costs far more than decoding a small group of streams, and a codec reuses few tables."""
    key = f64.tobytes() + bytes(str(f64.shape), "ascii")
    hit = _LUT_CACHE.get(key)
    if hit is not None:
        return hit
    nt, a = f64.shape
    expect = np.stack([np.repeat(np.arange(a, dtype=np.uint8), f64[t]) for t in range(nt)])
    # Packed decode entry per (table, slot): symbol | f << 8 | (slot - cum) << 21. Table nt is the
    # identity (symbol 0, f = M, bias = slot) used past a stream's end.
    slots = np.arange(M, dtype=np.int64)
    sym = expect.astype(np.int64)
    f_slot = np.take_along_axis(f64, sym, axis=1)
    bias = slots[None, :] - np.take_along_axis(c64, sym, axis=1)
    lut = np.empty((nt + 1, M), dtype=np.int64)
    lut[:nt] = sym | (f_slot << 8) | (bias << 21)
    lut[nt] = (M << 8) | (slots << 21)
    lut = lut.ravel()
    expect.setflags(write=False)
    lut.setflags(write=False)
    if len(_LUT_CACHE) >= 64:
        _LUT_CACHE.clear()
    _LUT_CACHE[key] = (expect, lut)
    return expect, lut


def decode(
    words: np.ndarray,
    stream_words: np.ndarray,
    lengths: np.ndarray,
    table_idx: np.ndarray,
    freq: np.ndarray,
    cum: np.ndarray,
    slot_to_symbol: np.ndarray,
    n: int,
) -> np.ndarray:
    """Decodes every stream into a (S, n) uint8 array (zeros past lengths[k]).

    Raises CodecError when any stream is inconsistent: word counts that do not add up, a stream that
    reads past its words, or one that does not end in the initial state having read all its words.
    """
    words = np.asarray(words)
    stream_words = np.asarray(stream_words)
    if words.ndim != 1 or stream_words.ndim != 1:
        raise CodecError("rANS words and stream_words must be 1-D")
    if words.size and not np.issubdtype(words.dtype, np.integer):
        raise CodecError(f"rANS words must be integers, got {words.dtype}")
    n = int(n)
    if n < 0:
        raise CodecError("rANS stream length bound n must be >= 0")
    f64 = validate_freq(freq)
    c64 = _check_cum(f64, cum)
    nt, a = f64.shape
    slot_to_symbol = np.asarray(slot_to_symbol)
    if slot_to_symbol.shape != (nt, M):
        raise CodecError(f"rANS slot_to_symbol must be {(nt, M)}, got {slot_to_symbol.shape}")
    expect, lut = _decode_lut(f64, c64)
    if not np.array_equal(slot_to_symbol, expect):
        raise CodecError("rANS slot_to_symbol does not match the frequency table")
    s = stream_words.size
    lengths, table_idx = _check_streams(lengths, table_idx, nt, n)
    if lengths.size != s:
        raise CodecError(f"rANS has {s} word counts but {lengths.size} stream lengths")
    sw = stream_words.astype(np.int64)
    if s and (sw.min() < 2 or sw.max() > n + 2):
        raise CodecError(f"rANS stream word counts must lie in [2, {n + 2}]")
    if int(sw.sum()) != words.size:
        raise CodecError(f"rANS word counts add up to {int(sw.sum())}, but {words.size} words are stored")
    if words.size and (int(words.max()) > 0xFFFF or int(words.min()) < 0):
        raise CodecError("rANS words must be 16-bit")
    out = np.zeros((n, s), dtype=np.uint8)
    if s == 0:
        return out.T.copy()

    # Reads past a stream's last word stay inside the padded buffer and are caught at the end.
    wpad = np.zeros(words.size + n + 2, dtype=np.int64)
    wpad[: words.size] = words
    ptr = np.zeros(s, dtype=np.int64)
    np.cumsum(sw[:-1], out=ptr[1:])
    end = ptr + sw
    x = (wpad[ptr] << 16) | wpad[ptr + 1]
    ptr += 2
    tbases = np.ascontiguousarray((table_idx * M).T)  # [P, S]
    period = tbases.shape[0]
    ragged = bool(np.any(lengths != n))
    ident = nt * M

    slot = np.empty(s, dtype=np.int64)
    p = np.empty(s, dtype=np.int64)
    t = np.empty(s, dtype=np.int64)
    m = np.empty(s, dtype=np.bool_)
    for i in range(n):
        np.bitwise_and(x, M - 1, out=slot)
        slot += tbases[i % period]
        if ragged:
            np.copyto(slot, ident + (x & (M - 1)), where=lengths <= i)
        np.take(lut, slot, out=p, mode="clip")
        np.copyto(out[i], p, casting="unsafe")  # low 8 bits: the symbol
        np.right_shift(p, 8, out=t)
        t &= 0x1FFF
        x >>= PROB_BITS
        x *= t
        np.right_shift(p, 21, out=t)
        x += t
        np.less(x, L, out=m)
        ids = np.flatnonzero(m)
        if ids.size:
            pv = ptr[ids]
            x[ids] = (x[ids] << 16) | wpad[pv]
            ptr[ids] = pv + 1

    bad = (x != L) | (ptr != end)
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"rANS stream {k} is corrupt ({int(bad.sum())} of {s} streams fail: final state "
            f"{int(x[k])} vs {L}, read {int(ptr[k] - end[k] + sw[k])} of {int(sw[k])} words)"
        )
    return np.ascontiguousarray(out.T)
