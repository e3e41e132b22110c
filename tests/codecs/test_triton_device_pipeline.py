"""The device pipeline (device_pipeline.py): the container made and read on the device.

Interpreted on a CPU-only machine, the "device" is the CPU: these tests cannot see a GPU stall. What
they prove there: every copy between host and device goes through the pipeline's one seam (to_host /
to_device) and an encode makes exactly two device-to-host copies (the few bytes of sizes, CRC and
flags: the one synchronisation; then the finished container, sections 1-4 coded on the device too), a
decode exactly ONE host-to-device copy (the blob with its block tables joined after it: sections 1-4's
rANS tables and word counts, read from the blob by the host; or the inflated sections of a container
written with zlib sections before 2026-12-03) and one of the flags back; and no pipeline code reads
a tensor's value on the host (item, bool, int, float, tolist, numpy, cpu) anywhere else. On a GPU,
bench/gpu_check.py runs the same encode and decode under torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
import random
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvmesh.codecs import CodecError, container, get_codec
from tests.codecs.conftest import bits, kv_like
from tests.codecs.reference.sidecode import raw_sections, zlib_form
from tests.codecs.test_triton_kernels import DEVICE, load_kernels

load_kernels()

from kvmesh.codecs.cachegen import codec as cg  # noqa: E402
from kvmesh.codecs.cachegen import device_crc as dcrc  # noqa: E402
from kvmesh.codecs.cachegen import device_pipeline as dp  # noqa: E402


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


_PIPELINE_FILES = tuple(os.path.join("codecs", "cachegen", f) for f in
                        ("device_pipeline.py", "device_crc.py", "triton_backend.py", "triton_rans.py",
                         "triton_quant.py", "delta.py", "codec.py", "quant.py"))
_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _in_seam(frame) -> bool:
    """Whether the call comes from within device_pipeline.to_host (the staging copy included)."""
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "to_host" and frame.f_code.co_filename.endswith("device_pipeline.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def no_host_reads():
    """Fails on any host read of a tensor's value made directly by pipeline code, except inside the
    transfer seam (to_host). Calls from elsewhere (torch, the Triton interpreter) pass."""
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    seen: list[str] = []

    def guard(name):
        orig = originals[name]

        def wrapper(self, *a, **k):
            frame = sys._getframe(1)
            path = frame.f_code.co_filename
            if path.endswith(_PIPELINE_FILES) and not _in_seam(frame):
                seen.append(f"{name} at {os.path.basename(path)}:{frame.f_lineno} ({frame.f_code.co_name})")
            return orig(self, *a, **k)
        return wrapper

    for name in _READS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield seen
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def _coded_sections(blob: bytes) -> int:
    """How many of sections 1-4 are stored in their coded form (shorter than raw)."""
    stored = container.unpack(blob)[1][1:5]
    return sum(len(s) < len(r) for s, r in zip(stored, raw_sections(blob)))


def test_encode_copies_once_and_never_reads_on_the_way() -> None:
    kv = kv_like(2, 60, 64, dtype=torch.float16, seed=2)
    kv[1, 0, 4] *= 0.02  # a protected row: section 7 is assembled on the device too
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    tri.encode(kv.to(DEVICE))  # warm-up: the layout's constant arrays go to the device once, cached
    with dp.record_transfers() as log, no_host_reads() as reads:
        blob = tri.encode(kv.to(DEVICE))
    assert blob == cpu.encode(kv)
    assert reads == [], f"the encode read device values on the host outside the seam: {reads}"
    assert [(d, what) for d, what, _, _ in log] == [("d2h", "sizes, crc, flags"), ("d2h", "container")], log
    assert all(dev == DEVICE.type for _, _, dev, _ in log)
    assert log[0][3] <= 64, "the synchronising read is a few bytes"
    assert _coded_sections(blob) >= 2, "the test chunk should exercise the coded form"
    head = container.FIXED_HEADER_BYTES + 4 * 8 + len(container.unpack(blob)[1][0])
    # the container copy is every section after the params, as stored: the host adds header and CRC
    assert log[1][3] == len(blob) - head - 4


@pytest.mark.parametrize("form", ["coded", "zlib"])
def test_decode_copies_the_blob_once_and_never_reads_on_the_way(form: str) -> None:
    kv = kv_like(2, 60, 64, dtype=torch.float32, seed=3)
    kv[1, 1, 7] *= 0.02
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    blob = cpu.encode(kv)
    assert _coded_sections(blob) >= 2, "the test chunk should exercise the coded form"
    if form == "zlib":
        blob = zlib_form(blob)  # as written before 2026-12-03
    tri.decode(blob)
    with dp.record_transfers() as log, no_host_reads() as reads:
        out = tri.decode(blob)
    assert torch.equal(bits(out.cpu()), bits(cpu.decode(blob)))
    assert reads == [], f"the decode read device values on the host outside the seam: {reads}"
    assert [(d, what) for d, what, _, _ in log] == [("h2d", "blob"), ("d2h", "flags")], log
    plan = dp._plan(tri, blob)
    tail = len(plan.coded.extra) if form == "coded" else sum(len(r) + (-len(r)) % 4 for r in plan.raw)
    assert tail > 0, "the copy in should carry the tables (or the inflated sections) too"
    # the one copy: the blob, padding to 8 bytes, then the tables (or the inflated sections), padded
    assert log[0][3] == len(blob) + (-len(blob)) % 8 + tail + (-tail) % 8
    if form == "coded":  # 24 bytes per rANS block, 512 per coded plane's table (at most 10 planes)
        assert tail <= 24 * 16 + 512 * 10


def test_to_device_joins_its_parts_in_one_copy_aligned() -> None:
    """The seam's copy in: any number of parts, one transfer, each part's bytes back as a device view
    starting 8-byte aligned (an int64 view of the tables needs it), empty parts included."""
    parts = [b"abc", np.arange(5, dtype=np.int64), b"", memoryview(bytes(range(17)))]
    with dp.record_transfers() as log:
        views = dp.to_device(parts, DEVICE, "test")
    assert [(d, what) for d, what, _, _ in log] == [("h2d", "test")]
    assert log[0][3] == 8 + 40 + 0 + 24
    for p, v in zip(parts, views):
        assert v.device.type == DEVICE.type and v.dtype == torch.uint8
        assert bytes(v.cpu().numpy()) == bytes(memoryview(p).cast("B"))
        assert v.storage_offset() % 8 == 0
    assert views[1].view(torch.int64).cpu().tolist() == list(range(5))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/inf: the input is refused
@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
def test_encode_input_errors_are_the_cpu_paths(method: str) -> None:
    cpu, tri = get_codec(method, backend="cpu"), get_codec(method, backend="triton")
    for value in (float("nan"), float("inf"), 70000.0):
        kv = kv_like(1, 6, 8, dtype=torch.float32, seed=1)
        kv[1, 0, 3, 2] = value
        with pytest.raises(CodecError) as want:
            cpu.encode(kv)
        with pytest.raises(CodecError) as got:
            tri.encode(kv.to(DEVICE))
        assert str(got.value) == str(want.value)
    with pytest.raises(CodecError, match="shape"):
        tri.encode(torch.zeros(3, 1, 4, 4, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 21, 8), (2, 60, 64)])
def test_corrupt_sections_with_a_valid_checksum_raise_the_cpu_paths_error(shape: tuple[int, int, int]) -> None:
    """A flipped bit in each section, the CRC made right again: the device flags name what the CPU's
    checks name (checked once, at the end). The larger chunk has sections 1-4 in their coded form."""
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    kv = kv_like(*shape, dtype=torch.float32, seed=5)
    kv[1, 0, 3] *= 0.02
    blob = cpu.encode(kv)
    header, sections = container.unpack(blob)
    rng = random.Random(4)
    pos = container.FIXED_HEADER_BYTES + 4 * len(sections)
    raws = raw_sections(blob)
    # the larger chunk: only its coded sections 1-4 (the small one covers every section)
    flips = [2] * len(sections) if shape == (2, 21, 8) else \
        [3 if 1 <= i <= 4 and len(s) < len(raws[i - 1]) else 0 for i, s in enumerate(sections)]
    assert sum(flips) >= 6
    for s, nflip in zip(sections, flips):
        for _ in range(nflip if len(s) else 0):
            bad = bytearray(blob)
            at = pos + rng.randrange(len(s))
            bad[at] ^= 1 << rng.randrange(8)
            bad[-4:] = struct.pack("<I", zlib.crc32(bytes(bad[:-4])))
            try:
                want = ("decodes", cpu.decode(bytes(bad)))
            except CodecError as e:
                want = ("error", str(e))
            try:
                got = ("decodes", tri.decode(bytes(bad)))
            except CodecError as e:
                got = ("error", str(e))
            assert got[0] == want[0], f"byte {at}: {got} vs {want}"
            if got[0] == "error":
                assert got[1] == want[1], f"byte {at}"
            else:
                assert torch.equal(bits(got[1].cpu()), bits(want[1]))
        pos += len(s)
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 4
    with pytest.raises(CodecError, match="checksum mismatch"):
        tri.decode(bytes(bad))


def test_device_crc_is_zlibs() -> None:
    for a, b in ((b"", b"x"), (b"kvmesh", b" container"), (bytes(range(256)) * 3, b"\x00" * 17)):
        assert dcrc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    for n in (0, 1, 7, 1000):
        assert dcrc.crc32_zeros(n) == zlib.crc32(bytes(n))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 700, dtype=np.uint8)
    buf = torch.from_numpy(data).to(DEVICE)
    for start, n, bound in ((0, 0, 1), (3, 1, 1), (5, 63, 64), (0, 64, 64), (9, 65, 200), (11, 689, 689)):
        raw = dcrc.raw_crc(buf, start, torch.full((1,), n, dtype=torch.int64, device=DEVICE), bound,
                           interpret=DEVICE.type == "cpu")
        assert (int(raw.item()) & 0xFFFFFFFF) ^ dcrc.crc32_zeros(n) == zlib.crc32(data[start:start + n].tobytes())


@pytest.mark.parametrize("values", [[5], [7, 7, 7], [2, 3, 1026, 40], list(range(2, 300, 7)), [65535, 0]])
def test_stream_lengths_pack_like_the_cpu(values: list[int]) -> None:
    counts = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    packed, length = dp._pack_counts(counts)
    want = cg.pack_uints(np.asarray(values, np.int64))
    assert int(length.item()) == len(want)
    assert bytes(packed.cpu().numpy()[:len(want)]) == want
    assert not packed.cpu().numpy()[len(want):].any()
    blob = bytes(7) + want
    back = dp._unpack_counts(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(DEVICE), 7, len(values), blob)
    assert back.cpu().tolist() == values


def test_chunks_the_pipeline_leaves_to_codec_py_still_match() -> None:
    """One token (no rest tokens) goes through codec.py's path on the Triton backend: same bytes."""
    kv = kv_like(2, 1, 8, dtype=torch.float16, seed=9)
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    assert not dp.encodable(tri, kv)
    blob = cpu.encode(kv)
    assert tri.encode(kv.to(DEVICE)) == blob
    assert torch.equal(bits(tri.decode(blob).cpu()), bits(cpu.decode(blob)))


def test_gpu_check_sync_check_runs_here() -> None:
    """bench/gpu_check.py's transfer check (on a GPU it also turns every other synchronisation into an
    error) passes interpreted; the script needs nothing installed beyond what the GPU box has."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.sync_check(DEVICE, quick=True) == []


def test_zlib_sections_on_threads_read_the_same(monkeypatch) -> None:
    """Containers written with zlib sections 1-4 (before 2026-12-03) inflate on the pipeline's threads
    above a size: the same bytes as one after the other."""
    monkeypatch.setattr(dp, "_PARALLEL_ZLIB", 0)
    kv = kv_like(2, 30, 8, dtype=torch.float16, seed=8)
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    blob = zlib_form(cpu.encode(kv))
    plan = dp._plan(tri, blob)
    monkeypatch.setattr(dp, "_PARALLEL_ZLIB", 1 << 40)
    assert dp._plan(tri, blob).raw == plan.raw


# ---- predictor-coded containers (section 8) on the device pipeline --------------------------------

_DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def predicted() -> tuple[object, torch.Tensor, dict[str, bytes]]:
    """A layer predictor fitted to KV with related layers, that KV (with a sink-like value row, so the
    protecting levels write section 7 too), and the CPU codec's containers of it per level."""
    from kvmesh.codecs.cachegen.predict import fit
    from tests.codecs.test_layer_prediction import related_kv

    kv = related_kv(layers=3, tokens=70, channels=24, seed=5)
    kv[1, 1, 9] *= 0.02
    p = fit([kv])
    blobs = {m: get_codec(m, backend="cpu", predictor=p).encode(kv) for m in ("cachegen", "cachegen-hq")}
    return p, kv, blobs


def _flags(blob: bytes) -> bytes:
    return bytes(container.unpack(blob)[1][cg.N_SECTIONS_PREDICTED - 1])[8:]


def _with_flags(blob: bytes, flags: bytes | bytearray) -> bytes:
    header, sections = container.unpack(blob)
    parts = [bytes(s) for s in sections]
    parts[-1] = parts[-1][:8] + bytes(flags)
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, parts)


@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
def test_decode_of_fixed_point_predicted_containers_copies_once(predicted, method: str) -> None:
    """Fixed-point predicted layers (flag 2) decode on the device: the CPU's tensor bit for bit, ONE
    copy in (blob + tables), the flags back, no host read on the way (the loop over layers is planned
    from section 8 in the host's copy of the blob; the features' scales stay on the device)."""
    p, kv, blobs = predicted
    blob = blobs[method]
    assert set(_flags(blob)) == {0, 2} and _flags(blob).count(2) >= 3
    assert len(container.unpack(blob)[1][7]) > (2 * 3 * 69 + 7) // 8, "the chunk should protect a row"
    cpu = get_codec(method, backend="cpu", predictor=p)
    tri = get_codec(method, backend="triton", predictor=p)
    assert dp._plan(tri, blob) is not None, "the device pipeline decodes predicted containers"
    tri.decode(blob)
    with dp.record_transfers() as log, no_host_reads() as reads:
        out = tri.decode(blob)
    assert torch.equal(bits(out.cpu()), bits(cpu.decode(blob)))
    assert out.dtype == kv.dtype
    assert reads == [], f"the decode read device values on the host outside the seam: {reads}"
    assert [(d, what) for d, what, _, _ in log] == [("h2d", "blob"), ("d2h", "flags")], log


def test_decode_of_fp32_and_mixed_flags_matches_the_cpu(predicted) -> None:
    """The fp32 arithmetic (flag 1: the 2026 fixture, zlib sections) and a container mixing flags 1 and
    2 (fixed-point features of an fp32-predicted layer) decode on the device as on the CPU."""
    from kvmesh.codecs import LayerPredictor

    blob = open(os.path.join(_DATA, "fp32_predicted.kvmc"), "rb").read()
    p = LayerPredictor.load(os.path.join(_DATA, "fp32_predicted.predictor.npz"))
    tri = get_codec("cachegen", backend="triton", predictor=p)
    assert dp._plan(tri, blob) is not None
    with dp.record_transfers() as log:
        out = tri.decode(blob)
    assert torch.equal(bits(out.cpu()), bits(get_codec("cachegen", backend="cpu", predictor=p).decode(blob)))
    assert [d for d, *_ in log] == ["h2d", "d2h"]
    p, _, blobs = predicted
    flags = bytearray(_flags(blobs["cachegen"]))
    flags[flags.index(2)] = 1  # K of layer 1 in fp32, the layers after it fixed-point from it
    mixed = _with_flags(blobs["cachegen"], flags)
    cpu = get_codec("cachegen", backend="cpu", predictor=p)
    got = get_codec("cachegen", backend="triton", predictor=p).decode(mixed)
    assert torch.equal(bits(got.cpu()), bits(cpu.decode(mixed)))
    assert not torch.equal(bits(got.cpu()), bits(cpu.decode(blobs["cachegen"])))


def test_forged_predictor_sections_raise_the_cpu_paths_error(predicted) -> None:
    """Section 8 forged (CRC made right): bad flags, a wrong size, another predictor, none: the
    device decode raises codec.py's CodecError, word for word; flags set to 0 still decode alike."""
    from tests.codecs.test_layer_prediction import random_predictor

    p, _, blobs = predicted
    blob = blobs["cachegen"]
    flags = _flags(blob)
    header, sections = container.unpack(blob)
    short = container.pack(header.codec_id, header.level_id, header.dtype, header.shape,
                           [bytes(s) for s in sections[:-1]] + [bytes(sections[-1])[:-1]])
    forged = [_with_flags(blob, b"\x01" + flags[1:]), _with_flags(blob, flags[:1] + b"\x03" + flags[2:]), short]
    cases = [(f, p) for f in forged] + [(blob, random_predictor(layers=3, channels=24)), (blob, None)]
    for bad, pred in cases:
        with pytest.raises(CodecError) as want:
            get_codec("cachegen", backend="cpu", predictor=pred).decode(bad)
        with pytest.raises(CodecError) as got:
            get_codec("cachegen", backend="triton", predictor=pred).decode(bad)
        assert str(got.value) == str(want.value)
    zeros = _with_flags(blob, bytes(len(flags)))  # every layer "coded as itself": a different tensor, alike
    assert torch.equal(bits(get_codec("cachegen", backend="triton", predictor=p).decode(zeros).cpu()),
                       bits(get_codec("cachegen", backend="cpu", predictor=p).decode(zeros)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked-out inf - inf
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_residual_level_choice_on_the_device_is_the_hosts(mode: int) -> None:
    """triton_quant.residual_choice (no host read) chooses predict.residual_levels's count and writes
    the residual: both parities, ratios far below and above 1, all-zero tokens (left out of the
    quantile), one token, a ratio exactly between two counts, tokens over several blocks."""
    from kvmesh.codecs.cachegen import triton_quant as tq
    from kvmesh.codecs.cachegen.predict import residual_levels

    g = torch.Generator().manual_seed(mode)
    interp = DEVICE.type == "cpu"
    for tokens in (1, 2, 7, 50, 600):  # 600: the channel spans over several row blocks
        x = torch.randn(tokens, 16, generator=g) * 4
        x[tokens // 2] = 0.0
        for scale in (0.0, 0.003, 0.3, 0.5, 1.0, 7.0, 1e9):
            p = x - (torch.randn(tokens, 16, generator=g) * scale + (x * 0.1 if scale else 0.0))
            if scale == 0.5:
                p = x - x * 0.5  # residual spans exactly half of x's: rint meets a half
            r = x - p
            for base in (2, 3, 6, 7, 21, 24, 64, 255, 256):
                want = residual_levels(base, x[None], r[None], mode)
                lv = torch.full((1,), float(base), device=DEVICE)
                used = torch.zeros(1, dtype=torch.bool, device=DEVICE)
                resid = torch.empty(tokens, 16, device=DEVICE)
                tq.residual_choice(x.to(DEVICE), p.to(DEVICE), base, mode, resid, lv, used, interp)
                assert int(lv.cpu()[0]) == min(want, base) and bool(used.cpu()[0]) == (want < base), \
                    (tokens, scale, base, want)
                assert torch.equal(bits(resid.cpu()), bits(r))


def _profile(layers: int, channels: int) -> object:
    from kvmesh.codecs import QueryProfile

    g = np.random.default_rng(1)
    a = g.standard_normal((layers, 1, channels, 3)) * 4.0
    return QueryProfile(a @ np.swapaxes(a, 2, 3) + 0.05 * np.eye(channels))


@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
def test_encode_with_a_predictor_on_the_device_writes_the_cpus_bytes(predicted, method: str) -> None:
    """A predictor-coded chunk is written by the device pipeline: the CPU's bytes (section 8 included),
    no host read on the way, the same two copies as without a predictor: the chosen level counts and
    predicted flags come back with the sizes/CRC/flags (the streams' alphabets never left the device),
    then the container."""
    p, kv, blobs = predicted
    tri = get_codec(method, backend="triton", predictor=p)
    assert dp.encodable(tri, kv)
    tri.encode(kv.to(DEVICE))
    with dp.record_transfers() as log, no_host_reads() as reads:
        blob = tri.encode(kv.to(DEVICE))
    assert blob == blobs[method]
    assert reads == [], f"the encode read device values on the host outside the seam: {reads}"
    assert [(d, what) for d, what, _, _ in log] == [("d2h", "sizes, crc, flags"), ("d2h", "container")], log
    assert log[0][3] <= 4 * (10 + 4 * kv.shape[1]), "a few bytes: sizes, CRC, flags, then 4L for the choice"
    header, sections = container.unpack(blob)
    levels = np.frombuffer(bytes(sections[0])[6:6 + 2 * kv.shape[1]], np.uint8).reshape(2, -1) + 1
    base = tri.level.levels_for(kv.shape[1])
    predicted = np.frombuffer(_flags(blob), np.uint8).reshape(2, -1) != 0
    assert (levels[predicted] < base[predicted]).all() and (levels[~predicted] == base[~predicted]).all()
    assert len(set(levels[predicted].tolist()) - set(base.reshape(-1).tolist())) >= 2, \
        "the chunk should give streams alphabets the base counts do not have"


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-point", "fp32"])
def test_encode_with_predictor_and_profile_matches_the_cpu(predicted, fixed: bool) -> None:
    """Both prediction arithmetics (fp32: the writer of containers before 2026-12-03), with a query
    profile rounding the keys (the residuals' when predicted), fp16 input: the CPU's bytes."""
    from kvmesh.codecs.cachegen.backends import get_backend
    from kvmesh.codecs.cachegen.codec import CacheGenCodec
    from kvmesh.codecs.cachegen.levels import LEVELS

    p, kv, _ = predicted
    prof = _profile(kv.shape[1], kv.shape[3])
    cpu = CacheGenCodec(LEVELS["default"], get_backend("cpu"), prof, p, fixed_prediction=fixed)
    tri = CacheGenCodec(LEVELS["default"], get_backend("triton"), prof, p, fixed_prediction=fixed)
    want = cpu.encode(kv)
    assert set(_flags(want)) == ({0, 2} if fixed else {0, 1})
    assert tri.encode(kv.to(DEVICE)) == want


def test_every_count_the_writer_may_choose_has_its_tables() -> None:
    """The encoder's tables for device-chosen counts (_possible_alphabets) hold every count
    predict.levels_from_spans can give below a base (and the base): no stream meets a missing table."""
    from kvmesh.codecs.cachegen.predict import levels_from_spans

    bases = np.array([[2, 3, 7, 20], [25, 28, 64, 255]])
    possible = set(dp._possible_alphabets(bases))
    for base in bases.reshape(-1):
        for ratio in np.r_[0.0, np.geomspace(1e-4, 2.0, 300)]:
            got = levels_from_spans(int(base), np.array([1.0]), np.array([ratio]))
            assert got >= base or got in possible, (base, ratio, got)
        assert int(base) in possible


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/inf: the input is refused
def test_encode_input_errors_with_a_predictor_are_the_cpu_paths(predicted) -> None:
    p, kv, _ = predicted
    cpu, tri = get_codec("cachegen", backend="cpu", predictor=p), get_codec("cachegen", backend="triton", predictor=p)
    for value in (float("nan"), float("inf"), 70000.0):
        bad = kv.to(torch.float32)
        bad[0, 1, 30, 2] = value
        with pytest.raises(CodecError) as want:
            cpu.encode(bad)
        with pytest.raises(CodecError) as got:
            tri.encode(bad.to(DEVICE))
        assert str(got.value) == str(want.value)


class _Launches(TorchDispatchMode):
    """Counts what would be a launch on a GPU: every aten op that computes (not views, allocations or
    metadata), and every Triton kernel launch (outside them: the interpreter's own tensor work)."""

    _FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "_local_scalar_dense", "set_", "resize_"}

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket.__name__ in self._FREE or self.inside):
            self.n += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches() -> Iterator[_Launches]:
    import triton.runtime.interpreter as ti
    import triton.runtime.jit as tj

    cls = ti.InterpretedFunction if DEVICE.type == "cpu" else tj.JITFunction
    orig = cls.run
    counter = _Launches()

    def run(self, *a, **k):
        counter.n += 1
        counter.inside += 1
        try:
            return orig(self, *a, **k)
        finally:
            counter.inside -= 1

    cls.run = run
    try:
        with counter:
            yield counter
    finally:
        cls.run = orig


def test_predictor_paths_launch_a_few_kernels_a_layer(monkeypatch) -> None:
    """The prediction steps launch a few kernels per (K/V, layer): decode ONE per predicted layer (the
    prediction, added in place) and a few ops a chunk; encode the prediction, the residual and its
    level choice (two kernels and a sort), the selection, quantize, dequantize and the layer's finish;
    not the dozens of small torch ops a layer that a host-side choice or torch glue would cost. The
    whole encode with a predictor launches no more than without one (the streams' statistics of every
    alphabet in one launch)."""
    from kvmesh.codecs.cachegen.predict import fit
    from tests.codecs.test_layer_prediction import related_kv

    steps: dict[str, int] = {}
    for name in ("_add_predictions", "_quantize_predicted"):
        def counted(*a, _orig=getattr(dp, name), _name=name, **k):
            with count_launches() as c:
                out = _orig(*a, **k)
            steps[_name] = c.n
            return out
        monkeypatch.setattr(dp, name, counted)
    kv = related_kv(layers=5, tokens=40, channels=16, seed=5)
    codec = get_codec("cachegen", backend="triton", predictor=fit([kv]))
    plain = get_codec("cachegen", backend="triton")
    x = kv.to(DEVICE)
    blob = codec.encode(x)
    predicted = sum(f != 0 for f in _flags(blob))
    assert predicted >= 5
    codec.decode(blob)
    plain.encode(x)
    with count_launches() as whole:
        codec.encode(x)
    with count_launches() as without:
        plain.encode(x)
    codec.decode(blob)
    assert steps["_add_predictions"] <= predicted + 8, steps
    assert steps["_quantize_predicted"] <= 10 * 2 * 5 + 8, steps
    assert whole.n <= without.n, (whole.n, without.n)
