"""The compiled cachegen CPU path (`_ransc`, built from csrc/*.c by setup.py) behind numpy-typed wrappers.

The extension does the per-element work of the cachegen CPU path over a whole chunk: the elementwise
quantize and dequantize steps (quant.py), query-aware key rounding (rounding.py), cross-layer
prediction (predict.py: the fixed-point arithmetic kvmesh writes, and the fp32 one of older
containers), the protected-row sums (codec.py), histogram, center and table choice
(alone, or fused with the delta-stream choice of delta.py), rANS encode and decode (taking and
undoing delta streams' differences on the fly). It is the CPU's only implementation of those stages:
it is required, and importing this module without it is an ImportError saying how to build it. The
numpy/torch reference it is checked against bit-exactly lives in tests/codecs/reference.

Table blocks for the extension are derived here from tables.alphabet_tables (integer arithmetic
only) and cached per set of alphabets.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from kvmesh.codecs.cachegen import quant, rans
from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.predict import SX_MAX, SX_MIN, LayerPredictor, fixed_weights
from kvmesh.codecs.cachegen.quant import SEGMENT
from kvmesh.codecs.cachegen.rounding import QueryProfile, device_factors
from kvmesh.codecs.cachegen.tables import NUM_TABLES, alphabet_tables
from kvmesh.codecs.errors import CodecError

BUILD_HINT = ("build it with `pip install -e .` (or `python setup.py build_ext --inplace`) in the repository; "
              "it needs a C compiler (gcc or clang) and the Python headers")

try:
    from kvmesh.codecs.cachegen import _ransc
except ImportError as e:  # the CPU path has no other implementation: say how to get this one
    raise ImportError(f"kvmesh.codecs.cachegen._ransc, the compiled cachegen CPU coder, is not built ({e}); "
                      f"{BUILD_HINT}") from e


# -- table blocks -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _enc_block(b: int) -> np.ndarray:
    """uint64 [NT, 2B, 2]: rcp, bias | (M - f) << 16 | f << 32 per symbol (_ransc.c's encode_lanes
    says why this is exact), each table's B entries twice (the coder indexes it by symbol from
    an offset of B - center)."""
    tabs = alphabet_tables(b)
    f = tabs.freq.astype(np.uint64)
    c = tabs.cum[:, :b].astype(np.uint64)
    one = f == 1
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    rcp = np.where(one, top, top // np.maximum(f, np.uint64(2)) + np.uint64(1))
    bias = np.where(one, c + np.uint64(rans.M - 1), c)
    out = np.empty((NUM_TABLES, 2, b, 2), np.uint64)
    out[..., 0] = rcp[:, None, :]
    out[..., 1] = (bias | ((np.uint64(rans.M) - f) << np.uint64(16)) | (f << np.uint64(32)))[:, None, :]
    return out.reshape(NUM_TABLES, 2 * b, 2)


def _dec_block(b: int) -> np.ndarray:
    """uint32 [NT, 4096]: symbol | (f - 1) << 8 | (slot - cum[symbol]) << 20."""
    tabs = alphabet_tables(b)
    sym = tabs.slot_to_symbol.astype(np.int64)
    f = np.take_along_axis(tabs.freq.astype(np.int64), sym, axis=1)
    bias = np.arange(rans.M, dtype=np.int64)[None, :] - np.take_along_axis(tabs.cum.astype(np.int64), sym, axis=1)
    return (sym | ((f - 1) << 8) | (bias << 20)).astype(np.uint32)


@functools.lru_cache(maxsize=None)
def _cost_block(b: int) -> np.ndarray:
    """int16 [B, NT]: the table costs, symbol-major (a stream adds one row per distinct residual)."""
    cost = alphabet_tables(b).cost
    if cost.min() < 0 or cost.max() > np.iinfo(np.int16).max:  # LOG2_COST lies in [0, 8192]
        raise ValueError(f"table costs of alphabet {b} do not fit int16")
    return np.ascontiguousarray(cost.T.astype(np.int16))


def _concat(block, alphabets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.full(257, -1, np.int64)
    parts, pos = [], 0
    for b in alphabets:
        arr = block(b).reshape(-1)
        offsets[b] = pos
        pos += arr.size
        parts.append(arr)
    return np.concatenate(parts), offsets


@functools.lru_cache(maxsize=32)
def enc_tables(alphabets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _concat(_enc_block, alphabets)


@functools.lru_cache(maxsize=8)  # 1 MiB per alphabet: only the sets in use stay
def dec_tables(alphabets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _concat(_dec_block, alphabets)


@functools.lru_cache(maxsize=32)
def cost_tables(alphabets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _concat(_cost_block, alphabets)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8)


# -- wrappers -----------------------------------------------------------------------------------

def histogram(q: np.ndarray, layout: StreamLayout) -> np.ndarray:
    """int64 [S, 256]: symbol counts per stream of q uint8 [2, L, T, C]."""
    out = np.empty((layout.num_streams, 256), np.int64)
    _ransc.histogram(_u8(q), layout.layers, layout.tokens, layout.channels, out)
    return out


def choose_tables(hist: np.ndarray, layout: StreamLayout, with_cost: bool = False
                  ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center uint8 [S], table uint8 [S]) exactly as CpuBackend.choose_tables' numpy path; with
    with_cost, also each stream's least cost (int64 [S], 1/256 bit)."""
    S = layout.num_streams
    cost, off = cost_tables(layout.alphabets)
    center = np.empty(S, np.uint8)
    table = np.empty(S, np.uint8)
    least = [np.empty(S, np.int64)] if with_cost else []
    _ransc.choose(np.ascontiguousarray(hist, dtype=np.int64), layout.max_levels,
                  np.ascontiguousarray(layout.lengths, dtype=np.int32),
                  np.ascontiguousarray(layout.stream_levels, dtype=np.int64), cost, off, center, table, *least)
    return (center, table, least[0]) if with_cost else (center, table)


def models(q: np.ndarray, layout: StreamLayout, halves: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center uint8 [S], table uint8 [S], delta flag bool [S]) as the reference stream_models (tests/codecs/reference) computes them,
    in one pass over q uint8 [2, L, T, C] with no [S, 256] histogram. halves: (K, V) may use delta streams."""
    S = layout.num_streams
    cost, off = cost_tables(layout.alphabets)
    center = np.empty(S, np.uint8)
    table = np.empty(S, np.uint8)
    flags = np.empty(S, np.uint8)
    _ransc.models(_u8(q), layout.layers, layout.tokens, layout.channels,
                  np.ascontiguousarray(layout.stream_levels, dtype=np.int64), cost, off,
                  int(bool(halves[0])) | int(bool(halves[1])) << 1,
                  center, table, flags)
    return center, table, flags.astype(bool)


def quantize(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, bm1: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """quant.quantize's elementwise step in one pass: x fp32 [L, T, C]; lo, inv broadcastable to
    [L, nseg, 1, C] (per_channel) or [L, T, 1]; bm1 [L, ...]. Returns q uint8 [L, T, C]."""
    L, T, C = x.shape
    nseg = -(-T // SEGMENT)
    shape = (L, nseg, 1, C) if per_channel else (L, T, 1)
    flat = (lambda t: t.to(torch.float32).expand(shape).contiguous().numpy())
    q = np.empty((L, T, C), np.uint8)
    _ransc.quantize(np.ascontiguousarray(x.numpy(), dtype=np.float32), L, T, C, flat(lo), flat(inv),
                    np.ascontiguousarray(bm1.reshape(L).numpy(), dtype=np.float32), bool(per_channel), q)
    return torch.from_numpy(q)


def dequantize(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, per_channel: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """quant.dequantize's elementwise step in one pass: q uint8 [L, T, C] -> fp32 [L, T, C] (into out
    when given: a contiguous fp32 tensor of that shape); lo, step broadcastable to [L, nseg, 1, C]
    (per_channel) or [L, T, 1]."""
    L, T, C = q.shape
    nseg = -(-T // SEGMENT)
    shape = (L, nseg, 1, C) if per_channel else (L, T, 1)
    flat = (lambda t: t.to(torch.float32).expand(shape).contiguous().numpy())
    y = torch.empty((L, T, C), dtype=torch.float32) if out is None else out
    _ransc.dequantize(np.ascontiguousarray(q.numpy()), L, T, C, flat(lo), flat(step), bool(per_channel), y.numpy())
    return y


def round_keys(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, step: torch.Tensor, bm1: torch.Tensor,
               profile: QueryProfile) -> torch.Tensor:
    """Query-aware key rounding (rounding.py, FORMAT.md section 3) in one compiled pass: x fp32 [L, T, C]; lo, inv, step broadcastable to
    [L, nseg, 1, C]; bm1 [L, ...]. Returns q uint8 [L, T, C] (the same symbols)."""
    L, T, C = x.shape
    profile.check(L, C)
    nseg = -(-T // SEGMENT)
    flat = (lambda t: t.to(torch.float32).expand(L, nseg, 1, C).contiguous().numpy())
    cols = device_factors(profile, torch.device("cpu"))[0].numpy()
    q = np.empty((L, T, C), np.uint8)
    _ransc.round_keys(np.ascontiguousarray(x.numpy(), dtype=np.float32), L, T, C, flat(lo), flat(inv), flat(step),
                      np.ascontiguousarray(bm1.reshape(L).numpy(), dtype=np.float32), cols, profile.factor,
                      profile.recip, profile.kv_heads, profile.head_dim, q)
    return torch.from_numpy(q)


def predict(x: torch.Tensor, w: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """The cross-layer prediction (FORMAT.md section 3) in one compiled pass: x fp32 [R, F], w fp32 [F, C], b fp32 [C] -> [R, C]."""
    R, F = x.shape
    C = w.shape[1]
    out = np.empty((R, C), np.float32)
    _ransc.predict(np.ascontiguousarray(x.numpy(), dtype=np.float32), R, F, C, w, b, out)
    return torch.from_numpy(out)


def _np(t: np.ndarray | torch.Tensor) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.numpy()


def predict_parts(parts: tuple[np.ndarray | torch.Tensor, ...], w: np.ndarray, b: np.ndarray,
                  out: np.ndarray | torch.Tensor, add: bool = False) -> np.ndarray | torch.Tensor:
    """predict with the features read in place: parts, 1 to 3 contiguous fp32 [R, C'] arrays (numpy or
    CPU tensors), are the features [R, len(parts) * C'] side by side (predict.features'
    concatenation, never made); the prediction goes into out fp32 [R, C] (contiguous), or is added
    to it with add."""
    R, K = parts[0].shape
    x0 = _np(parts[0])
    x1 = _np(parts[1]) if len(parts) > 1 else x0
    x2 = _np(parts[2]) if len(parts) > 2 else x0
    _ransc.predict_parts(len(parts), x0, x1, x2, R, K, w.shape[1], w, b, _np(out), bool(add))
    return out


def even(width: int) -> int:
    """The stored width of fixed-point features: ``width`` rounded up to even (predict_fixed reads int16 pairs)."""
    return width + (width & 1)


def to_fixed(y: np.ndarray | torch.Tensor, out: np.ndarray) -> int:
    """predict.to_fixed in one compiled pass: y fp32 [R, C] (contiguous) -> out int16 [R, even(C)] (the
    padding column zero); returns sx."""
    R, C = y.shape
    return _ransc.to_fixed(_np(y), R, C, out.shape[1], out, SX_MIN, SX_MAX)


def packed_fixed(predictor: LayerPredictor, kv: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W int16 [P, even(C) / 2, C, 2], sw int32 [P, C], b fp32 [C]) of (kv, layer) as predict_fixed reads
    them: LayerPredictor.fixed's weights, each part padded to an even width and its feature pairs
    interleaved per column. Cached on the predictor."""
    cache = predictor.__dict__.setdefault("_native_fixed", {})
    if (kv, layer) not in cache:
        C = predictor.channels
        w16, sw = fixed_weights(predictor.weights(kv, layer)[0], C)  # not via predictor.fixed: one int16 copy
        P, Kp = w16.shape[0] // C, even(C)
        padded = np.zeros((P, Kp, C), np.int16)
        padded[:, :C] = w16.reshape(P, C, C)
        packed = np.ascontiguousarray(padded.reshape(P, Kp // 2, 2, C).transpose(0, 1, 3, 2))
        cache[kv, layer] = (packed, np.ascontiguousarray(sw, dtype=np.int32), predictor.weights(kv, layer)[1])
    return cache[kv, layer]


def predict_fixed(parts: tuple[tuple[np.ndarray, int], ...], predictor: LayerPredictor, kv: int, layer: int,
                  out: np.ndarray | torch.Tensor, add: bool = False) -> np.ndarray | torch.Tensor:
    """The fixed-point prediction of (kv, layer) (FORMAT.md section 3) from its parts, 2 or 3 (X int16
    [R, even(C)] from to_fixed, sx) in feature order, into out fp32 [R, C] (or added to it with add)."""
    w, sw, b = packed_fixed(predictor, kv, layer)
    xs = [x for x, _ in parts] + [parts[0][0]] * (3 - len(parts))
    sx = [e for _, e in parts] + [0] * (3 - len(parts))
    R, Kp = xs[0].shape
    _ransc.predict_fixed(len(parts), xs[0], xs[1], xs[2], sx[0], sx[1], sx[2], R, Kp, w.shape[2], w, sw, b,
                         _np(out), bool(add))
    return out


def layer_residual(target: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor, mode: int,
                   out: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """out = target - pred (fp32 [R, C], contiguous each) and (target's spans, the residual's spans) as
    predict.residual_levels compares them, float64 (one value in channel modes, else one per token)."""
    R, C = target.shape
    n = 1 if mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP) else R
    spans = np.empty(2 * n, np.float32)
    _ransc.layer_residual(_np(target), _np(pred), R, C, mode, _np(out), spans)
    s = spans.astype(np.float64)
    return s[:n], s[n:]


_EMPTY = np.zeros(0, np.uint8)


def profile_args(profile: QueryProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(cols, factor, recip, heads, head_dim) of a 1-layer profile for quantize_layer, cached on it."""
    cache = profile.__dict__.setdefault("_native_args", {})
    if "args" not in cache:
        profile.check(1, profile.channels)
        cols = device_factors(profile, torch.device("cpu"))[0].numpy()
        cache["args"] = (cols, profile.factor, profile.recip, profile.kv_heads, profile.head_dim)
    return cache["args"]


def quantize_layer(x: np.ndarray | torch.Tensor, levels: int, mode: int, side: list[np.ndarray],
                   q: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, profile: QueryProfile | None = None,
                   pred: np.ndarray | torch.Tensor | None = None, mask: np.ndarray | None = None,
                   restored: np.ndarray | torch.Tensor | None = None) -> None:
    """One layer of one of K or V, whole, in one compiled pass (the CPU's fused encoder): x fp32 [R, C]
    contiguous -> its side tensors into ``side`` (numpy views of the layer's part of each side tensor,
    as quant.side_spec lays them out: [lo, hi] for modes 0 and 1, [a] for 2, [lo, d] for 3), its
    symbols into q uint8 [R, C] (rounded along ``profile``, a 1-layer profile, when given), and the
    values the decoder will have into y fp32 [R, C]: the dequantized symbols, plus ``pred`` when
    given, with the rows ``mask`` (uint8 [R]) marks replaced in order by ``restored`` fp32 [n, C].
    Arrays: numpy or CPU tensors. The same bits as quantize_half, dequantize_half, the sum and the
    protected-row restore."""
    R, C = x.shape
    flags = 0
    cols = factor = recip = _EMPTY
    heads = head_dim = 0
    if profile is not None:
        if profile.layers != 1 or profile.channels != C:
            profile.check(1, C)
        cols, factor, recip, heads, head_dim = profile_args(profile)
        flags |= 1
    if pred is not None:
        flags |= 2
    if mask is not None:
        flags |= 4
    lo16 = side[0]
    hi16 = side[1] if mode in (quant.MODE_CHANNEL, quant.MODE_TOKEN) else _EMPTY
    d32 = side[1] if mode == quant.MODE_CHANNEL_SHARED_STEP else _EMPTY
    _ransc.quantize_layer(_np(x), R, C, mode, float(levels - 1), lo16, hi16, d32, _np(q), _np(y),
                          _np(pred) if pred is not None else _EMPTY, mask if mask is not None else _EMPTY,
                          _np(restored) if restored is not None else _EMPTY, cols, factor, recip, heads,
                          head_dim, flags)


def f16_bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(quant.fp16_round_down(x), quant.fp16_round_up(x)) of fp32 x [n] as float16 arrays."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    lo, hi = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
    _ransc.f16_bounds(x, x.size, lo, hi)
    return lo.view(np.float16), hi.view(np.float16)


def row_sums(h: torch.Tensor) -> torch.Tensor:
    """float64 [N]: the exact sums over the last axis of |h| for finite fp16 h [..., C] (C <= 8192),
    as codec.protected_rows defines them."""
    C = h.shape[-1]
    bits = np.ascontiguousarray(h.reshape(-1, C).contiguous().view(torch.int16).numpy()).view(np.uint16)
    out = np.empty(bits.shape[0], np.float64)
    _ransc.row_sums(bits, bits.shape[0], C, out)
    return torch.from_numpy(out).reshape(h.shape[:-1])


def _flags(flags: np.ndarray | None, S: int) -> np.ndarray:
    if flags is None:
        return np.zeros(S, np.uint8)
    f = np.asarray(flags)
    if f.shape != (S,):
        raise CodecError(f"delta flags must hold {S} entries, got {f.shape}")
    return np.ascontiguousarray(f, dtype=bool).view(np.uint8)


def encode(q: np.ndarray, center: np.ndarray, table: np.ndarray, layout: StreamLayout,
           flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(words uint16, words per stream int32) of every stream's residuals, as CpuBackend.rans_encode;
    the flagged streams (bool [S]) code their delta symbols (delta.py), computed from q on the fly."""
    S = layout.num_streams
    if center.shape != (S,) or table.shape != (S,):
        raise CodecError(f"center and table must hold {S} entries, got {center.shape} and {table.shape}")
    enc, off = enc_tables(layout.alphabets)
    cap = 2 * layout.layers * layout.channels * layout.tokens + 2 * S
    words = np.empty(cap, np.uint16)
    counts = np.empty(layout.num_coded, np.int32)
    try:
        n = _ransc.encode(_u8(q), layout.layers, layout.tokens, layout.channels, layout.group,
                          np.ascontiguousarray(layout.stream_levels, dtype=np.int64), _u8(center), _u8(table),
                          enc, off, words, counts, _flags(flags, S))
    except ValueError as e:
        raise CodecError(f"cachegen rANS encode: {e}") from None
    return words[:n], counts


_DECODE_ERRORS = {
    1: "its word count lies outside [2, stream length + 2]",
    2: "the word counts do not add up to the words stored",
    3: "its center lies outside its alphabet",
    4: "its table index is out of range",
    6: "it does not end in the initial state having read exactly its words",
    7: "its alphabet has no table",
}


def decode(words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
           layout: StreamLayout, flags: np.ndarray | None = None) -> np.ndarray:
    """q uint8 [2, L, T, C] from the streams, as CpuBackend.rans_decode; CodecError on a corrupt stream.
    The flagged streams (bool [S]) hold delta symbols: q is restored from them as they decode."""
    S, G = layout.num_streams, layout.group
    if counts.shape != (S // G,) or center.shape != (S,) or table.shape != (S,):
        raise CodecError(f"rANS decode needs {S // G} word counts and {S} centers and tables")
    counts = np.asarray(counts)
    if S and (int(counts.min()) < 2 or int(counts.max()) > G * SEGMENT + 2):
        raise CodecError(f"corrupt rANS data: a stream's word count lies outside [2, {G * SEGMENT + 2}]")
    words = np.asarray(words)
    if words.dtype != np.uint16 and words.size and (int(words.min()) < 0 or int(words.max()) > 0xFFFF):
        raise CodecError("rANS words must be 16-bit")
    dec, off = dec_tables(layout.alphabets)
    q = np.empty((2, layout.layers, layout.tokens, layout.channels), np.uint8)
    # padding after the words: a corrupt stream reads past its own words without a bounds check
    # per symbol (as rans.decode does) and fails the final check
    padded = np.zeros(words.size + G * SEGMENT + 2, np.uint16)
    padded[: words.size] = words
    err = _ransc.decode(padded, words.size, np.ascontiguousarray(counts, dtype=np.int32),
                        layout.layers, layout.tokens, layout.channels, G,
                        np.ascontiguousarray(layout.stream_levels, dtype=np.int64), _u8(center), _u8(table),
                        dec, off, q, _flags(flags, S))
    if err is not None:
        code, k = err
        raise CodecError(f"corrupt rANS data: stream {k}: {_DECODE_ERRORS.get(code, f'error {code}')}")
    return q
