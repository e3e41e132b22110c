"""The numpy rANS coder (codecs/cachegen/rans.py) against a literal scalar reading of the spec."""
from __future__ import annotations

import numpy as np
import pytest

from kvmesh.codecs import CodecError
from kvmesh.codecs.cachegen import rans

M, L = rans.M, rans.L


# ---- a scalar, spec-literal reference (one stream at a time, plain Python ints) ----------------

def ref_encode(sym: list[int], freq: list[int]) -> list[int]:
    cum = [0]
    for f in freq:
        cum.append(cum[-1] + f)
    x, emitted = L, []
    for s in reversed(sym):
        f, c = freq[s], cum[s]
        if x >= (f << 20):
            emitted.append(x & 0xFFFF)
            x >>= 16
        x = ((x // f) << 12) + (x % f) + c
        assert x < 1 << 32
    emitted.append(x & 0xFFFF)
    emitted.append(x >> 16)
    return emitted[::-1]


def ref_decode(words: list[int], n: int, freq: list[int]) -> list[int] | None:
    cum = [0]
    for f in freq:
        cum.append(cum[-1] + f)
    s2s = [s for s, f in enumerate(freq) for _ in range(f)]
    if len(words) < 2:
        return None
    x, pos, out = (words[0] << 16) | words[1], 2, []
    for _ in range(n):
        slot = x & 4095
        s = s2s[slot]
        x = freq[s] * (x >> 12) + slot - cum[s]
        if x < L:
            if pos >= len(words):
                return None
            x = (x << 16) | words[pos]
            pos += 1
        out.append(s)
    return out if x == L and pos == len(words) else None


# ---- helpers --------------------------------------------------------------------------------------

def random_freq(rng: np.random.Generator, nt: int, a: int, skew: float = 1.0) -> np.ndarray:
    """Valid tables (every symbol >= 1, rows sum to M); high skew leaves many frequency-1 symbols."""
    out = np.empty((nt, a), dtype=np.int64)
    for t in range(nt):
        w = rng.random(a) ** (skew * 8)
        f = 1 + np.floor(w / w.sum() * (M - a)).astype(np.int64)
        f[rng.integers(a)] += M - f.sum()
        out[t] = f
    return out


def draw(rng: np.random.Generator, freq: np.ndarray, tidx: np.ndarray, n: int, mode: str) -> np.ndarray:
    a = freq.shape[1]
    s = tidx.size
    if mode == "model":  # symbols distributed as each stream's table says
        _, s2s = rans.build_tables(freq)
        return s2s[tidx[:, None], rng.integers(0, M, (s, n))].astype(np.uint8)
    if mode == "uniform":  # mismatched with the table: rare symbols occur often
        return rng.integers(0, a, (s, n)).astype(np.uint8)
    if mode == "rarest":  # worst case: always a frequency-1 (or the rarest) symbol
        rare = np.argmin(freq, axis=1)[tidx]
        return np.repeat(rare[:, None], n, axis=1).astype(np.uint8)
    if mode == "constant":
        return np.full((s, n), a - 1, dtype=np.uint8)
    raise ValueError(mode)


def roundtrip(symbols, lengths, tidx, freq):
    cum, s2s = rans.build_tables(freq)
    words, counts = rans.encode(symbols, lengths, tidx, freq, cum)
    assert words.dtype == np.uint16 and counts.dtype == np.int32
    assert counts.shape == (symbols.shape[0],) and int(counts.sum()) == words.size
    back = rans.decode(words, counts, lengths, tidx, freq, cum, s2s, symbols.shape[1])
    return words, counts, back


def expected(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    keep = np.arange(symbols.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.where(keep, symbols, 0).astype(np.uint8)


# ---- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("a", [1, 2, 3, 16, 33, 200, 256])
@pytest.mark.parametrize("mode", ["model", "uniform", "rarest", "constant"])
def test_roundtrip_alphabets_and_distributions(a: int, mode: str) -> None:
    rng = np.random.default_rng(a * 7 + len(mode))
    nt = 5
    freq = random_freq(rng, nt, a, skew=2.0 if mode == "rarest" else 1.0)
    s, n = 37, 61
    tidx = rng.integers(0, nt, s)
    sym = draw(rng, freq, tidx, n, mode)
    lengths = np.full(s, n, dtype=np.int32)
    _, _, back = roundtrip(sym, lengths, tidx, freq)
    np.testing.assert_array_equal(back, sym)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 257])
def test_roundtrip_lengths(n: int) -> None:
    rng = np.random.default_rng(n)
    freq = random_freq(rng, 3, 17)
    s = 23
    tidx = rng.integers(0, 3, s).astype(np.uint8)
    sym = draw(rng, freq, tidx, n, "uniform")
    lengths = np.full(s, n, dtype=np.int32)
    words, counts, back = roundtrip(sym, lengths, tidx, freq)
    np.testing.assert_array_equal(back, sym)
    if n == 0:  # an empty stream is the initial state alone: [L >> 16, L & 0xFFFF]
        np.testing.assert_array_equal(counts, 2)
        np.testing.assert_array_equal(words, np.tile([1, 0], s))


def test_ragged_lengths_and_padding_ignored() -> None:
    rng = np.random.default_rng(5)
    freq = random_freq(rng, 4, 24)
    s, n = 50, 45
    tidx = rng.integers(0, 4, s)
    sym = draw(rng, freq, tidx, n, "model")
    lengths = rng.integers(0, n + 1, s).astype(np.int32)
    lengths[:3] = [0, 1, n]
    # Bytes past a stream's length must not matter, even values outside the alphabet.
    dirty = sym.copy()
    dirty[np.arange(n)[None, :] >= lengths[:, None]] = 255
    words, counts, back = roundtrip(dirty, lengths, tidx, freq)
    np.testing.assert_array_equal(back, expected(sym, lengths))
    cum, _ = rans.build_tables(freq)
    w2, c2 = rans.encode(expected(sym, lengths), lengths, tidx, freq, cum)
    np.testing.assert_array_equal(w2, words)
    np.testing.assert_array_equal(c2, counts)


def test_no_streams() -> None:
    freq = np.full((1, 4), M // 4)
    words, counts, back = roundtrip(np.zeros((0, 5), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.int64), freq)
    assert words.size == 0 and counts.size == 0 and back.shape == (0, 5)


def test_state_extremes() -> None:
    """Frequencies of 1 and of M - (A-1) drive x to both ends of its uint32 range."""
    freq = np.array([[1, M - 2, 1], [M - 2, 1, 1]])  # 3-symbol alphabet, two tables
    rng = np.random.default_rng(9)
    s, n = 40, 300
    tidx = np.arange(s) % 2
    sym = rng.choice([0, 2], size=(s, n)).astype(np.uint8)
    sym[tidx == 1] = rng.choice([0, 1, 2], size=(int((tidx == 1).sum()), n), p=[0.9, 0.05, 0.05])
    words, counts, back = roundtrip(sym, np.full(s, n), tidx, freq)
    np.testing.assert_array_equal(back, sym)


# ---- exact bytes against the scalar reference -----------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_matches_scalar_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    a = int(rng.integers(1, 40))
    nt = int(rng.integers(1, 4))
    freq = random_freq(rng, nt, a, skew=float(rng.choice([0.3, 1.0, 3.0])))
    s, n = 19, int(rng.integers(0, 70))
    tidx = rng.integers(0, nt, s)
    sym = draw(rng, freq, tidx, n, str(rng.choice(["model", "uniform", "rarest"])))
    lengths = rng.integers(0, n + 1, s)
    words, counts, back = roundtrip(sym, lengths, tidx, freq)
    offs = np.concatenate([[0], np.cumsum(counts)])
    for k in range(s):
        ref = ref_encode([int(v) for v in sym[k, : lengths[k]]], [int(v) for v in freq[tidx[k]]])
        got = words[offs[k]: offs[k + 1]].tolist()
        assert got == ref, f"stream {k}: words differ from the spec reference"
        assert ref_decode(ref, int(lengths[k]), [int(v) for v in freq[tidx[k]]]) == sym[k, : lengths[k]].tolist()
    np.testing.assert_array_equal(back, expected(sym, lengths))


def test_words_little_endian_bytes() -> None:
    """The stored form is uint16 little-endian; tobytes of '<u2' must round trip through decode."""
    rng = np.random.default_rng(3)
    freq = random_freq(rng, 2, 8)
    tidx = rng.integers(0, 2, 11)
    sym = draw(rng, freq, tidx, 20, "model")
    cum, s2s = rans.build_tables(freq)
    words, counts = rans.encode(sym, np.full(11, 20), tidx, freq, cum)
    raw = words.astype("<u2").tobytes()
    again = np.frombuffer(raw, dtype="<u2")
    np.testing.assert_array_equal(rans.decode(again, counts, np.full(11, 20), tidx, freq, cum, s2s, 20), sym)


def test_build_tables() -> None:
    freq = np.array([[1, 4094, 1], [2048, 1024, 1024]])
    cum, s2s = rans.build_tables(freq)
    np.testing.assert_array_equal(cum, [[0, 1, 4095, 4096], [0, 2048, 3072, 4096]])
    assert cum.dtype == np.int32 and s2s.dtype == np.uint8 and s2s.shape == (2, M)
    assert s2s[0, 0] == 0 and s2s[0, 1] == 1 and s2s[0, 4094] == 1 and s2s[0, 4095] == 2
    np.testing.assert_array_equal(np.bincount(s2s[1], minlength=3), freq[1])


# ---- bad input and corruption ---------------------------------------------------------------------

@pytest.mark.parametrize("freq", [
    np.array([[-1, M + 1]]),            # a negative frequency
    np.array([[1, M - 2]]),             # sums to M - 1
    np.full((1, 257), 16),              # alphabet too big
    np.zeros((0, 4), np.int64),         # no tables
    np.array([[1.5, M - 1.5]]),         # not integers
])
def test_invalid_tables_raise(freq: np.ndarray) -> None:
    with pytest.raises(CodecError):
        rans.build_tables(freq)


def test_invalid_encode_input_raises() -> None:
    freq = np.full((2, 4), M // 4)
    cum, _ = rans.build_tables(freq)
    sym = np.zeros((3, 5), np.uint8)
    ok = dict(lengths=np.full(3, 5), table_idx=np.zeros(3, np.int64))
    with pytest.raises(CodecError, match="alphabet"):
        rans.encode(np.full((3, 5), 4, np.uint8), ok["lengths"], ok["table_idx"], freq, cum)
    with pytest.raises(CodecError, match="table index"):
        rans.encode(sym, ok["lengths"], np.array([0, 2, 0]), freq, cum)
    with pytest.raises(CodecError, match="lengths"):
        rans.encode(sym, np.array([5, 6, 0]), ok["table_idx"], freq, cum)
    with pytest.raises(CodecError, match="uint8"):
        rans.encode(sym.astype(np.int32), ok["lengths"], ok["table_idx"], freq, cum)
    with pytest.raises(CodecError, match="cum"):
        rans.encode(sym, ok["lengths"], ok["table_idx"], freq, cum + 1)


@pytest.fixture(scope="module")
def coded():
    rng = np.random.default_rng(42)
    freq = random_freq(rng, 4, 20)
    s, n = 64, 48
    tidx = rng.integers(0, 4, s)
    sym = draw(rng, freq, tidx, n, "model")
    lengths = np.full(s, n)
    cum, s2s = rans.build_tables(freq)
    words, counts = rans.encode(sym, lengths, tidx, freq, cum)
    return dict(words=words, counts=counts, lengths=lengths, tidx=tidx, freq=freq, cum=cum, s2s=s2s, n=n, sym=sym)


def _decode(c, **over):
    args = {**c, **over}
    return rans.decode(args["words"], args["counts"], args["lengths"], args["tidx"], args["freq"], args["cum"],
                       args["s2s"], args["n"])


def test_coded_fixture_decodes(coded) -> None:
    np.testing.assert_array_equal(_decode(coded), coded["sym"])


def test_every_single_word_flip_is_detected_or_harmless(coded) -> None:
    """rANS's end-state check catches nearly every corruption; whatever it misses must decode to
    different symbols only in a way the container checksum covers. Here: any flip that decodes
    without error must be one whose stream still satisfied the state check. Count them: rare."""
    rng = np.random.default_rng(0)
    words = coded["words"]
    missed = 0
    positions = rng.choice(words.size, size=300, replace=False)
    for p in positions:
        bad = words.copy()
        bad[p] ^= np.uint16(1 << int(rng.integers(16)))
        try:
            _decode(coded, words=bad)
        except CodecError:
            continue
        missed += 1
    assert missed <= 3, f"{missed} of 300 single-bit flips passed the stream check"


@pytest.mark.parametrize("case", ["truncated", "extra", "counts_shifted", "counts_short", "count_one", "count_huge",
                                  "table_changed", "lengths_changed"])
def test_structural_corruption_raises(coded, case: str) -> None:
    c = dict(coded)
    if case == "truncated":
        c["words"] = c["words"][:-1]
        c["counts"] = c["counts"].copy()
        c["counts"][-1] -= 1
    elif case == "extra":
        c["words"] = np.concatenate([c["words"], [7]]).astype(np.uint16)
    elif case == "counts_shifted":
        cnt = c["counts"].copy()
        cnt[0] += 1
        cnt[1] -= 1
        c["counts"] = cnt
    elif case == "counts_short":
        c["counts"] = c["counts"][:-1]
    elif case == "count_one":
        cnt = c["counts"].copy()
        cnt[1] += cnt[0] - 1
        cnt[0] = 1
        c["counts"] = cnt
    elif case == "count_huge":
        cnt = c["counts"].copy()
        cnt[0] = c["n"] + 3
        c["counts"] = cnt
    elif case == "table_changed":
        t = c["tidx"].copy()
        t[5] = (t[5] + 1) % 4
        c["tidx"] = t
    elif case == "lengths_changed":
        ln = c["lengths"].copy()
        ln[3] -= 1
        c["lengths"] = ln
    with pytest.raises(CodecError):
        _decode(c)


def test_random_words_raise(coded) -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        junk = rng.integers(0, 1 << 16, coded["words"].size).astype(np.uint16)
        with pytest.raises(CodecError):
            _decode(coded, words=junk)


def test_decode_rejects_inconsistent_tables(coded) -> None:
    s2s = coded["s2s"].copy()
    s2s[0, 0] = 19
    with pytest.raises(CodecError, match="slot_to_symbol"):
        _decode(coded, s2s=s2s)
    with pytest.raises(CodecError, match="cum"):
        _decode(coded, cum=coded["cum"][:, :-1])


def test_zero_padded_tables_share_one_call() -> None:
    """Tables of different alphabet sizes padded with zero frequencies code together; a symbol with
    frequency 0 in its stream's table is refused."""
    rng = np.random.default_rng(8)
    small = random_freq(rng, 2, 5)
    big = random_freq(rng, 2, 17)
    freq = np.zeros((4, 17), np.int64)
    freq[:2, :5] = small
    freq[2:] = big
    s, n = 40, 33
    tidx = np.arange(s) % 4
    sym = rng.integers(0, 17, (s, n)).astype(np.uint8)
    sym[tidx < 2] %= 5
    words, counts, back = roundtrip(sym, np.full(s, n), tidx, freq)
    np.testing.assert_array_equal(back, sym)
    # Same words as coding each alphabet on its own.
    cum_s, _ = rans.build_tables(small)
    w_s, c_s = rans.encode(sym[tidx < 2][:, :], np.full(int((tidx < 2).sum()), n), tidx[tidx < 2], small, cum_s)
    np.testing.assert_array_equal(counts[tidx < 2], c_s)
    sym[1, 7] = 9  # frequency 0 in table 1
    cum, _ = rans.build_tables(freq)
    with pytest.raises(CodecError, match="frequency"):
        rans.encode(sym, np.full(s, n), tidx, freq, cum)
