"""Each Triton kernel against its CPU reference, exact equality, over odd shapes.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set here only while the kernel
module is imported, since Triton decides at decoration time); with a CUDA GPU they run on it.
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError
from kvmesh.codecs.cachegen import quant, rans
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.layout import channel_group, stream_layout
from kvmesh.codecs.cachegen.tables import alphabet_tables
from tests.codecs.reference.predict import predict_reference
from tests.codecs.reference.rounding import quantize_keys as reference_quantize_keys
from tests.codecs.reference.streams import to_streams


def load_kernels():
    """(triton_rans module, triton_backend module, device); interpreted on a CPU-only machine.

    Triton decides between compiling and interpreting when a function is decorated, including its own
    library functions (tl.sum, tl.cumsum) decorated when triton is first imported: so the variable must
    be set before triton is imported anywhere in this process.
    """
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton", reason="triton is not installed")
        from kvmesh.codecs.cachegen import triton_backend, triton_rans
        return triton_rans, triton_backend, torch.device("cuda")
    already = "triton" in sys.modules
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not installed")
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        if already and not isinstance(standard._sum_combine, InterpretedFunction):
            pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 could be set and there is "
                        "no GPU; run `TRITON_INTERPRET=1 pytest tests/codecs/test_triton_*.py`", allow_module_level=True)
        from kvmesh.codecs.cachegen import triton_backend, triton_quant, triton_rans
        for mod in (triton_rans, triton_quant):
            if not isinstance(getattr(mod, "_round_down_fp16", getattr(mod, "_rans_encode_kernel", None)),
                              InterpretedFunction):
                importlib.reload(mod)  # imported earlier while the variable was unset
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return triton_rans, triton_backend, torch.device("cpu")


tr, tb, DEVICE = load_kernels()


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch):
    """Triton also reads the variable at launch time (lazy imports), so it stays set while a test runs."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def backend():
    return tb.TritonBackend(DEVICE)


def first_mismatch(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    idx = np.argwhere(a != b)
    return "equal" if idx.size == 0 else f"{len(idx)} mismatches, first at {tuple(idx[0])}: {a[tuple(idx[0])]} vs {b[tuple(idx[0])]}"


def raw(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same(got, want) -> None:
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = want.cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape and np.array_equal(got, want), first_mismatch(got, want)


# ---- the generic coder: streams [S, n] row-major --------------------------------------------------

def random_freq(rng: np.random.Generator, nt: int, a: int, power: float) -> np.ndarray:
    w = rng.random((nt, a)) ** power
    f = 1 + np.floor(w / w.sum(axis=1, keepdims=True) * (rans.M - a)).astype(np.int64)
    f[np.arange(nt), rng.integers(0, a, nt)] += rans.M - f.sum(axis=1)
    return f


def row_lanes(s: int, n: int) -> "tr.Lanes":
    return tr.Lanes(torch.arange(s, device=DEVICE) * n, torch.arange(s, device=DEVICE), 1)


CASES = [  # streams, length bound, alphabet, tables, skew power
    (1, 1, 2, 1, 1.0),
    (77, 37, 17, 5, 4.0),
    (130, 19, 256, 3, 8.0),
    (33, 64, 3, 2, 12.0),
]


@pytest.mark.parametrize("s,n,a,nt,power", CASES)
def test_encode_decode_match_numpy(s: int, n: int, a: int, nt: int, power: float) -> None:
    rng = np.random.default_rng(s * 31 + a)
    freq = random_freq(rng, nt, a, power)
    cum, s2s = rans.build_tables(freq)
    tidx = rng.integers(0, nt, s)
    sym = s2s[tidx[:, None], rng.integers(0, rans.M, (s, n))].astype(np.uint8)
    sym[: s // 3] = rng.integers(0, a, (s // 3, n))  # some streams far from their model
    lengths = rng.integers(0, n + 1, s).astype(np.int32)
    lengths[0] = n
    words, counts = rans.encode(sym, lengths, tidx, freq, cum)

    d = lambda a_, dt: torch.from_numpy(np.ascontiguousarray(a_)).to(DEVICE, dt)  # noqa: E731
    lanes = row_lanes(s, n)
    zeros = torch.zeros(s, dtype=torch.uint8, device=DEVICE)
    alpha = torch.full((s,), a, dtype=torch.int32, device=DEVICE)
    enc = d(tr.pack_encode_table(freq, cum), torch.int32)
    dec = d(tr.pack_decode_table(freq, cum, s2s), torch.int32)
    w_gpu, c_gpu = tr.rans_encode(d(sym, torch.uint8), lanes, d(lengths, torch.int32), zeros, alpha,
                                  d(tidx * a, torch.int32), enc, n, interpret=DEVICE.type == "cpu")
    assert_same(c_gpu, counts)
    assert_same(w_gpu, words)

    out = torch.zeros(s * n, dtype=torch.uint8, device=DEVICE)
    status = tr.rans_decode(d(words, torch.uint16), d(counts, torch.int32), out, lanes, d(lengths, torch.int32),
                            zeros, alpha, d(tidx * rans.M, torch.int32), dec, n, interpret=DEVICE.type == "cpu")
    assert bool((status == 1).all())
    want = np.where(np.arange(n)[None, :] < lengths[:, None], sym, 0)
    got = out.cpu().numpy().reshape(s, n)
    assert_same(np.where(np.arange(n)[None, :] < lengths[:, None], got, 0), want)

    # A flipped bit fails its stream's check, exactly like the numpy decoder raises.
    k = int(np.argmax(counts))
    start = int(counts[:k].sum())
    bad = words.copy()
    bad[start + int(counts[k]) // 2] ^= 0x0100
    with pytest.raises(CodecError):
        rans.decode(bad, counts, lengths, tidx, freq, cum, s2s, n)
    status = tr.rans_decode(d(bad, torch.uint16), d(counts, torch.int32), out, lanes, d(lengths, torch.int32),
                            zeros, alpha, d(tidx * rans.M, torch.int32), dec, n, interpret=DEVICE.type == "cpu")
    assert int(status[k]) == 0
    assert int(status.sum()) == s - 1


# ---- quantization ------------------------------------------------------------------------------------

QDTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 24), (3, 300, 7)])
def test_quantize_dequantize_match_quant_py(mode: int, shape: tuple[int, int, int]) -> None:
    from tests.codecs.conftest import kv_like

    tq = sys.modules["kvmesh.codecs.cachegen.triton_quant"]
    layers, tokens, channels = shape
    for dtype in QDTYPES:
        x = kv_like(layers, tokens, channels, dtype=dtype, seed=tokens + mode)[0]
        x[0, :, 0] = 0.0  # an all-zero channel
        x[-1, :, -1] = -3.0  # a constant channel
        if layers > 1:
            x[1] = 0.0  # an all-zero layer: bounds 0, every q 0
        lv = torch.tensor([16.0, 33.0, 129.0][:layers])
        q, side = quant.quantize(x.float(), lv, mode)
        q2, side2 = tq.quantize(x.to(DEVICE), lv.to(DEVICE), mode, interpret=DEVICE.type == "cpu")
        assert len(side2) == len(side)
        for a, b in zip(side2, side):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_same(raw(a), raw(b))
        assert_same(q2, q)
        ref = quant.dequantize(q, side, lv, mode)
        for out_dtype in QDTYPES:
            y = tq.dequantize(q.to(DEVICE), [t.to(DEVICE) for t in side], lv.to(DEVICE), mode, out_dtype,
                              interpret=DEVICE.type == "cpu")
            want = ref.to(out_dtype)
            assert_same(y.view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                        want.view(torch.int16 if out_dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("mode", [quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP])
@pytest.mark.parametrize("shape, heads", [((1, 1, 4), 1), ((2, 37, 24), 3), ((2, 300, 12), 2)])
def test_round_keys_matches_the_reference(mode: int, shape: tuple[int, int, int], heads: int) -> None:
    """Query-aware key rounding (rounding.py) as one kernel: the reference's symbols, including
    all-zero and constant channels (signed zeros must not change a symbol)."""
    from kvmesh.codecs.cachegen import rounding
    from tests.codecs.conftest import kv_like
    from tests.codecs.test_key_rounding import correlated_moments

    tq = sys.modules["kvmesh.codecs.cachegen.triton_quant"]
    layers, tokens, channels = shape
    profile = rounding.QueryProfile(correlated_moments(layers, heads, channels // heads, seed=tokens))
    for dtype in (torch.float16, torch.float32):
        x = kv_like(layers, tokens, channels, dtype=dtype, seed=tokens + mode)[0]
        x[0, :, 0] = 0.0
        x[-1, :, -1] = -3.0
        lv = torch.tensor([12.0, 20.0][:layers])
        _, side = quant.quantize(x.float(), lv, mode)
        want = reference_quantize_keys(x.float(), side, lv, mode, profile)
        got = tq.round_keys(x.to(DEVICE), [t.to(DEVICE) for t in side], lv.to(DEVICE), mode, profile,
                            interpret=DEVICE.type == "cpu")
        assert_same(got, want)


def test_backend_quantize_matches_cpu_backend(backend) -> None:
    from tests.codecs.conftest import kv_like

    kv = kv_like(3, 45, 10, dtype=torch.float16, seed=11)
    levels = np.array([[32, 16, 16], [33, 17, 17]])
    for modes in ((quant.MODE_CHANNEL, quant.MODE_TOKEN_SYMMETRIC), (quant.MODE_TOKEN, quant.MODE_CHANNEL_SHARED_STEP)):
        q, sides = CpuBackend().quantize(kv.float(), levels, modes)
        q2, sides2 = backend.quantize(kv.to(DEVICE), levels, modes)
        assert_same(q2, q)
        for a, b in zip(sides2, sides):
            assert len(a) == len(b)
            for u, v in zip(a, b):
                assert_same(raw(u), raw(v))
        ref = CpuBackend().dequantize(q, sides, levels, modes)
        assert_same(backend.dequantize(q2, sides2, levels, modes).view(torch.int32), ref.view(torch.int32))
        assert_same(backend.dequantize(q2, sides2, levels, modes, dtype=torch.float16).view(torch.int16),
                    ref.half().view(torch.int16))


# ---- the cachegen layout: statistics and coding through the backend ----------------------------------

LAYOUTS = [  # layers, tokens, channels, key levels, value levels
    (1, 1, 1, [16], [17]),
    (2, 37, 7, [33, 16], [17, 32]),
    (3, 13, 24, [129, 65, 64], [128, 2, 3]),
]


def make_q(rng: np.random.Generator, layers: int, tokens: int, channels: int, levels: np.ndarray) -> torch.Tensor:
    lv = torch.from_numpy(levels).view(2, layers, 1, 1)
    centre = torch.from_numpy(rng.integers(0, 1 << 20, (2, layers, 1, channels)))
    spread = torch.from_numpy(rng.integers(0, 4, (2, layers, 1, channels)))
    noise = torch.from_numpy(rng.integers(-3, 4, (2, layers, tokens, channels)))
    q = (centre % lv + noise * spread) % lv
    q[:, :, :, 0] = 0  # a constant channel
    return q.to(torch.uint8)


@pytest.mark.parametrize("layers,tokens,channels,kl,vl", LAYOUTS)
def test_stats_and_coding_match_cpu_backend(backend, layers, tokens, channels, kl, vl) -> None:
    rng = np.random.default_rng(tokens)
    levels = np.array([kl, vl], dtype=np.int64)
    # the codec's channels per coded stream (1 for 1 and 7 channels, 4 for 24)
    layout = stream_layout(layers, tokens, channels, levels, channel_group(channels))
    q = make_q(rng, layers, tokens, channels, levels)
    cpu = CpuBackend()

    hist = cpu.histogram(q, layout)
    assert_same(backend.histogram(q.to(DEVICE), layout).to(torch.int64), hist)
    center, table = cpu.choose_tables(hist, layout)
    c2, t2 = backend.choose_tables(hist, layout)
    assert_same(c2, center)
    assert_same(t2, table)
    c3, t3 = backend.stats(q.to(DEVICE), layout)
    assert_same(c3, center)
    assert_same(t3, table)

    words, counts = cpu.rans_encode(q, center, table, layout)
    w2, n2 = backend.rans_encode(q.to(DEVICE), center, table, layout)
    assert_same(n2, counts)
    assert_same(w2, words)
    assert_same(backend.rans_decode(words, counts, center, table, layout), q)
    assert_same(cpu.rans_decode(w2, n2, center, table, layout), q)


def test_stats_fallback_variant_matches(backend, monkeypatch) -> None:
    """The variant without tl.gather/tl.dot (used if a Triton build cannot compile them) agrees too."""
    monkeypatch.setattr(tr, "_DOT_OK", False)
    rng = np.random.default_rng(3)
    levels = np.array([[33, 16], [17, 129]], dtype=np.int64)
    layout = stream_layout(2, 21, 9, levels)
    q = make_q(rng, 2, 21, 9, levels)
    center, table = CpuBackend().choose_tables(CpuBackend().histogram(q, layout), layout)
    c2, t2 = backend.stats(q.to(DEVICE), layout)
    assert_same(c2, center)
    assert_same(t2, table)


def test_choose_tables_ties_go_to_lowest_index(backend) -> None:
    """A stream whose residuals are all 0 costs the same under every table whose symbol-0 cost ties;
    both paths must then pick the lowest such index."""
    levels = np.array([[2], [2]], dtype=np.int64)
    layout = stream_layout(1, 5, 3, levels)
    q = torch.zeros(2, 1, 5, 3, dtype=torch.uint8)
    cost = alphabet_tables(2).cost
    hist = CpuBackend().histogram(q, layout)
    center, table = CpuBackend().choose_tables(hist, layout)
    c2, t2 = backend.choose_tables(hist, layout)
    assert_same(t2, table)
    assert_same(c2, center)
    best = cost[:, 0].min()
    assert int(table[0]) == int(np.flatnonzero(cost[:, 0] == best)[0])


def test_multi_segment_stream_layout(backend) -> None:
    """Chunks longer than one segment: the last segment is short, lanes map across segments."""
    rng = np.random.default_rng(7)
    levels = np.array([[16], [17]], dtype=np.int64)
    layout = stream_layout(1, 259, 6, levels, 2)
    q = make_q(rng, 1, 259, 6, levels)
    cpu = CpuBackend()
    center, table = cpu.choose_tables(cpu.histogram(q, layout), layout)
    c2, t2 = backend.stats(q.to(DEVICE), layout)
    assert_same(c2, center)
    assert_same(t2, table)
    words, counts = cpu.rans_encode(q, center, table, layout)
    w2, n2 = backend.rans_encode(q.to(DEVICE), center, table, layout)
    assert_same(w2, words)
    assert_same(n2, counts)
    assert_same(backend.rans_decode(words, counts, center, table, layout), q)
    streams = to_streams(q, layout.nseg)
    assert streams.shape[0] == layout.num_streams


def test_decode_rejects_bad_counts(backend) -> None:
    levels = np.array([[16], [16]], dtype=np.int64)
    layout = stream_layout(1, 9, 4, levels)
    q = make_q(np.random.default_rng(1), 1, 9, 4, levels)
    cpu = CpuBackend()
    center, table = cpu.choose_tables(cpu.histogram(q, layout), layout)
    words, counts = cpu.rans_encode(q, center, table, layout)
    short = counts.copy()
    short[0] = 1
    short[1] += counts[0] - 1
    with pytest.raises(CodecError):
        backend.rans_decode(words, short, center, table, layout)
    with pytest.raises(CodecError):
        backend.rans_decode(words[:-1], counts, center, table, layout)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("rows, channels", [(1, 1), (37, 24), (300, 40), (5, 200)])
def test_fixed_prediction_kernel_equals_the_reference(rows: int, channels: int, parts: int) -> None:
    """The device's fixed-point prediction (to_fixed in torch, the int32 kernel) gives the numpy
    reference's features and bits."""
    from kvmesh.codecs.cachegen import predict, triton_quant as tq
    from tests.codecs.reference.predict import predict_fixed_reference, to_fixed_reference
    from tests.codecs.test_layer_prediction import random_predictor

    g = np.random.default_rng(rows + parts)
    layers = [(g.standard_normal((rows, channels)) * m).astype(np.float32) for m in (20.0, 0.5, 3.0)][:parts]
    want_parts = [to_fixed_reference(y) for y in layers]
    got_parts = [predict.to_fixed(torch.from_numpy(y).to(DEVICE)) for y in layers]
    for (x, sx), (gx, gsx) in zip(want_parts, got_parts):
        assert sx == gsx and np.array_equal(gx.cpu().numpy(), x)
    p = random_predictor(layers=2, channels=channels, seed=rows)
    kv = parts - 2
    w16, sw = p.fixed(kv, 1)
    b = p.weights(kv, 1)[1]
    want = predict_fixed_reference(want_parts, w16, sw, b)
    scale = predict.part_scales([sx for _, sx in got_parts], torch.from_numpy(sw).to(DEVICE))
    got = tq.predict_fixed(torch.stack([x for x, _ in got_parts]), torch.from_numpy(w16).to(DEVICE), scale,
                           torch.from_numpy(b).to(DEVICE), interpret=DEVICE.type == "cpu")
    assert np.array_equal(got.cpu().numpy().view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("rows, features, channels", [(1, 1, 1), (37, 72, 24), (300, 20, 200)])
def test_prediction_kernel_equals_the_reference(rows: int, features: int, channels: int) -> None:
    from kvmesh.codecs.cachegen import triton_quant as tq

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, features, generator=g) * 10
    w = torch.randn(features, channels, generator=g) / 5
    b = torch.randn(channels, generator=g)
    b[0] = -0.0
    want = predict_reference(x, w, b)
    got = tq.predict(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), interpret=DEVICE.type == "cpu")
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))
