"""The compiled rANS coder (codecs/cachegen/_ransc.c via native.py) against the numpy reference.

The numpy path (tests/codecs/reference: ReferenceBackend) is the reference: every stage must give identical values
(and so identical container bytes), and corrupt input must raise CodecError in both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, container
from kvmesh.codecs.cachegen import native
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec, stream_meta
from kvmesh.codecs.cachegen.layout import stream_layout
from kvmesh.codecs.cachegen.levels import LEVELS
from tests.codecs.conftest import kv_like
from tests.codecs.reference.backend import ReferenceBackend


REAL_CHUNKS = Path(__file__).resolve().parents[2] / "bench" / "data" / "realkv_chunks.safetensors"


def test_native_module_is_built():
    """The extension is required (setup.py builds it; native.py refuses to import without it)."""
    from kvmesh.codecs.cachegen import _ransc
    assert callable(_ransc.encode) and callable(_ransc.decode)
    assert native._ransc is _ransc


# ---- stage by stage on synthetic chunks -----------------------------------------------------------

def _symbols(rng: np.random.Generator, levels: np.ndarray, tokens: int, channels: int) -> torch.Tensor:
    """q uint8 [2, L, T, C] below each layer's alphabet: alternately uniform (long streams, a word
    nearly every symbol) and concentrated around a random center (few words, frequency-1 symbols)."""
    _, L = levels.shape
    q = np.empty((2, L, tokens, channels), np.uint8)
    for kv in range(2):
        for layer in range(L):
            b = int(levels[kv, layer])
            if (kv + layer) % 2:
                q[kv, layer] = rng.integers(0, b, (tokens, channels))
            else:
                center = rng.integers(0, b, channels)
                off = rng.geometric(0.6, (tokens, channels)) * rng.choice([-1, 1], (tokens, channels))
                q[kv, layer] = (center + off) % b
    return torch.from_numpy(q)


def _case(seed: int, layers: int, tokens: int, channels: int, levels: np.ndarray | None = None, group: int = 1):
    rng = np.random.default_rng(seed)
    if levels is None:
        levels = rng.integers(2, 257, (2, layers))
    layout = stream_layout(layers, tokens, channels, levels, group)
    return rng, layout, _symbols(rng, levels, tokens, channels)


# every alphabet 2..256 (in groups of 32: 16 layers x K/V), ragged segments (300 = 256 + 44),
# single-symbol streams, channel counts around the coder's 4-lane grouping
ALL_ALPHABETS = np.concatenate([np.arange(2, 257), [256]])
CASES = [(f"alphabets-{a[0]}-{a[-1]}", dict(seed=1 + i, layers=16, tokens=(300, 1, 45)[i % 3], channels=(5, 3, 4)[i % 3],
                                              levels=a.reshape(2, 16)))
         for i, a in enumerate(np.split(ALL_ALPHABETS, 8))]
CASES += [
    ("three-segments", dict(seed=11, layers=4, tokens=513, channels=8)),
    ("one-channel", dict(seed=12, layers=3, tokens=257, channels=1)),
    ("small-alphabets", dict(seed=13, layers=6, tokens=200, channels=7, levels=np.array([[2, 3, 4, 2, 3, 4]] * 2))),
    # several channels per coded stream (layout.py): 4 lanes of G, a tail of fewer lanes, G = 8
    ("group-2", dict(seed=14, layers=3, tokens=300, channels=6, group=2)),
    ("group-4", dict(seed=15, layers=4, tokens=257, channels=24, group=4)),
    ("group-4-tail", dict(seed=16, layers=2, tokens=45, channels=12, group=4)),
    ("group-8", dict(seed=17, layers=2, tokens=513, channels=40, group=8)),
    ("group-4-one-token", dict(seed=18, layers=3, tokens=1, channels=4, group=4)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_stages_match_numpy(name, kw):
    rng, layout, q = _case(**kw)
    ref, nat = ReferenceBackend(), CpuBackend()
    hist = ref.histogram(q, layout)
    assert np.array_equal(nat.histogram(q, layout), hist)
    center, table = ref.choose_tables(hist, layout)
    c2, t2 = nat.choose_tables(hist, layout)
    assert np.array_equal(c2, center) and np.array_equal(t2, table)

    # the chosen tables cluster on a few indices: code with random ones too, so every table is used
    # delta streams too: every second one
    flags = np.arange(layout.num_streams) % 2 == 1
    for tab, fl in ((table, None), (rng.integers(0, 64, layout.num_streams).astype(np.uint8), flags)):
        words, counts = ref.rans_encode(q, center, tab, layout, fl)
        w2, c2n = nat.rans_encode(q, center, tab, layout, fl)
        assert w2.dtype == np.uint16 and np.array_equal(w2, words)
        assert np.array_equal(np.asarray(c2n, np.int64), np.asarray(counts, np.int64))
        assert len(counts) == layout.num_coded
        out = nat.rans_decode(words, counts.astype(np.int32), center, tab, layout, fl)
        assert torch.equal(out, q)
        assert torch.equal(ref.rans_decode(words, counts.astype(np.int32), center, tab, layout, fl), q)


def test_symbols_outside_the_alphabet_code_like_numpy():
    """The reference reduces (q - center) mod B for any q; the coder must not assume q < B."""
    rng, layout, q = _case(seed=6, layers=2, tokens=40, channels=6, levels=np.array([[5, 9], [17, 3]]))
    q = torch.from_numpy(rng.integers(0, 256, tuple(q.shape)).astype(np.uint8))
    ref, nat = ReferenceBackend(), CpuBackend()
    center = rng.integers(0, 3, layout.num_streams).astype(np.uint8)
    table = rng.integers(0, 64, layout.num_streams).astype(np.uint8)
    words, counts = ref.rans_encode(q, center, table, layout)
    w2, c2 = nat.rans_encode(q, center, table, layout)
    assert np.array_equal(w2, words) and np.array_equal(c2, counts)


# ---- corrupt streams --------------------------------------------------------------------------------

def _decode_outcome(backend: CpuBackend, words, counts, center, table, layout):
    try:
        return backend.rans_decode(np.asarray(words, np.uint16), np.asarray(counts, np.int32), center, table, layout)
    except CodecError as e:
        return e


def _corruptions(rng: np.random.Generator, words: np.ndarray, counts: np.ndarray):
    for _ in range(6):  # single bit flips
        w = words.copy()
        i = int(rng.integers(words.size))
        w[i] ^= np.uint16(1 << int(rng.integers(16)))
        yield "bit flip", w, counts
    for _ in range(3):  # truncation, the counts adjusted so that they still add up
        w = words[: words.size - 1]
        c = counts.copy()
        k = int(np.flatnonzero(c > 2)[-1])
        c[k] -= 1
        yield "truncated", w, c
    for _ in range(4):  # wrong counts, same total (a word moves from one stream to another)
        c = counts.copy()
        a, b = rng.choice(counts.size, 2, replace=False)
        if c[a] > 2:
            c[a] -= 1
            c[b] += 1
        yield "moved count", words, c
    yield "count sum", words[:-1], counts
    for _ in range(4):  # random words with plausible counts
        yield "random words", rng.integers(0, 1 << 16, words.size).astype(np.uint16), counts


@pytest.mark.parametrize("seed", range(4))
def test_corrupt_streams_raise_in_both(seed):
    rng, layout, q = _case(seed=10 + seed, layers=3, tokens=90 + 170 * seed, channels=(6, 6, 12, 10)[seed],
                           group=(1, 2, 4, 2)[seed])
    ref, nat = ReferenceBackend(), CpuBackend()
    center, table = ref.choose_tables(ref.histogram(q, layout), layout)
    words, counts = ref.rans_encode(q, center, table, layout)
    counts = np.asarray(counts, np.int32)
    raised = 0
    total = 0
    for what, w, c in _corruptions(rng, words, counts):
        r = _decode_outcome(ref, w, c, center, table, layout)
        n = _decode_outcome(nat, w, c, center, table, layout)
        # identical verdicts: both reject, or (a corruption that happens to stay consistent) both
        # return the same symbols
        assert isinstance(r, CodecError) == isinstance(n, CodecError), what
        if isinstance(n, CodecError):
            raised += 1
            assert "stream" in str(n) or "word" in str(n)
        else:
            assert torch.equal(r, n), what
        total += 1
    # a 16-bit final-state check leaves a chance of ~2**-16 per corrupted stream to pass
    assert raised >= total - 1


def test_random_inputs_never_crash():
    """Arbitrary words, counts, centers and tables (within their dtypes): the coder either decodes
    or raises CodecError, and agrees with the numpy reference where the reference checks too."""
    rng = np.random.default_rng(7)
    nat = CpuBackend()
    for trial in range(200):
        layers, tokens, channels = int(rng.integers(1, 3)), int(rng.integers(1, 300)), int(rng.integers(1, 6))
        levels = rng.integers(2, 257, (2, layers))
        group = (1, 2, 4)[trial % 3] if channels % 4 == 0 else 1
        layout = stream_layout(layers, tokens, channels, levels, group)
        S, SC = layout.num_streams, layout.num_coded
        counts = rng.integers(0, 260 * group, SC).astype(np.int32) if trial % 3 == 0 else \
            np.minimum(layout.coded_lengths + 2, rng.integers(2, 12, SC)).astype(np.int32)
        size = int(counts.sum()) + (int(rng.integers(-2, 3)) if trial % 5 == 0 else 0)
        words = rng.integers(0, 1 << 16, max(size, 0))
        center = rng.integers(0, 256 if trial % 4 == 0 else 2, S).astype(np.uint8)
        table = rng.integers(0, 70 if trial % 4 == 1 else 64, S).astype(np.uint8)
        out = _decode_outcome(nat, words, counts, center, table, layout)
        assert isinstance(out, (CodecError, torch.Tensor))
        if isinstance(out, torch.Tensor):
            assert out.shape == (2, layers, tokens, channels)


def test_streams_that_read_past_all_words_raise():
    """Zero words make every stream want a new word at every symbol: the last streams read far past
    the stored words (into the wrapper's padding) and must fail, as in the reference."""
    for channels, group in ((5, 1), (8, 4)):
        layout = stream_layout(2, 256, channels, np.array([[7, 7], [200, 3]]), group)
        S, SC = layout.num_streams, layout.num_coded
        counts = np.full(SC, 2, np.int32)
        words = np.zeros(2 * SC, np.uint16)
        center = np.zeros(S, np.uint8)
        table = np.zeros(S, np.uint8)
        for backend in (ReferenceBackend(), CpuBackend()):
            with pytest.raises(CodecError):
                backend.rans_decode(words, counts, center, table, layout)


def test_encode_rejects_bad_stream_meta():
    _, layout, q = _case(seed=8, layers=2, tokens=20, channels=4)
    nat = CpuBackend()
    center, table = nat.choose_tables(nat.histogram(q, layout), layout)
    bad_center = center.copy()
    bad_center[3] = 255
    with pytest.raises(CodecError, match="center"):
        nat.rans_encode(q, bad_center, table, layout)
    bad_table = table.copy()
    bad_table[0] = 64
    with pytest.raises(CodecError, match="table"):
        nat.rans_encode(q, center, bad_table, layout)


# ---- whole containers -------------------------------------------------------------------------------

def _chunks() -> list[torch.Tensor]:
    out = [kv_like(layers=3, tokens=300, channels=24, seed=1), kv_like(layers=2, tokens=1, channels=5, seed=2),
           kv_like(layers=4, tokens=2, channels=7, dtype=torch.bfloat16, seed=3),
           kv_like(layers=2, tokens=520, channels=9, dtype=torch.float32, seed=4)]
    if REAL_CHUNKS.exists():
        from safetensors.torch import load_file
        out.append(load_file(str(REAL_CHUNKS))["chunk_1"])
    return out


@pytest.mark.parametrize("level", ["default", "hq", "compact"])
def test_containers_identical_with_and_without_native(level):
    ref = CacheGenCodec(LEVELS[level], ReferenceBackend())
    nat = CacheGenCodec(LEVELS[level], CpuBackend())
    for kv in _chunks():
        blob = nat.encode(kv)
        assert blob == ref.encode(kv), list(kv.shape)
        a, b = nat.decode(blob), ref.decode(blob)
        assert a.dtype == kv.dtype and a.shape == kv.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float32 else \
            torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_forged_words_behind_a_valid_checksum_raise_in_both():
    """Words changed inside a container whose CRC is recomputed reach the rANS decoder itself."""
    kv = kv_like(layers=2, tokens=120, channels=16, seed=5)
    ref = CacheGenCodec(LEVELS["default"], ReferenceBackend())
    nat = CacheGenCodec(LEVELS["default"], CpuBackend())
    blob = nat.encode(kv)
    header, sections = container.unpack(blob)
    secs = [bytes(s) for s in sections]
    rng = np.random.default_rng(9)
    for trial in range(12):
        forged = list(secs)
        w = bytearray(secs[6])
        if trial % 3 == 2:
            meta = bytearray(stream_meta(blob))  # a table index out of range (written back raw)
            meta[len(meta) // 2 + int(rng.integers(len(meta) // 2))] = 64 + trial
            forged[4] = bytes(meta)
        else:
            i = int(rng.integers(len(w)))
            w[i] ^= 1 << int(rng.integers(8))
            forged[6] = bytes(w)
        bad = container.pack(header.codec_id, header.level_id, kv.dtype, tuple(kv.shape), forged)
        with pytest.raises(CodecError):
            ref.decode(bad)
        with pytest.raises(CodecError):
            nat.decode(bad)


# ---- a missing build --------------------------------------------------------------------------------

def test_missing_extension_is_a_clear_import_error():
    """Without the compiled module, importing the CPU path fails and says how to build it: there is
    no slower fallback to run instead."""
    import subprocess
    import sys
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.endswith('cachegen._ransc'): raise ImportError('blocked for the test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import kvmesh.codecs\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "is not built" in proc.stderr and "pip install -e ." in proc.stderr, proc.stderr[-2000:]


def test_raw_calls_check_their_buffers():
    """The C functions refuse undersized buffers and absurd shapes instead of touching memory."""
    from kvmesh.codecs.cachegen import _ransc
    q = np.zeros(2 * 2 * 3 * 4, np.uint8)
    with pytest.raises(ValueError, match="buffer"):
        _ransc.histogram(q, 2, 3, 4, np.empty(10, np.int64))
    with pytest.raises(ValueError, match="positive"):
        _ransc.histogram(q, 1 << 30, 1 << 30, 1 << 30, np.empty(10, np.int64))
    with pytest.raises(ValueError, match="positive"):
        _ransc.histogram(q, 0, 3, 4, np.empty(10, np.int64))
