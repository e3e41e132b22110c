"""The `cachegen` codec: quantize (quant.py) -> per-stream models (tables.py) -> rANS (rans.py).

The first token of a chunk (the attention sink when the chunk starts a sequence: every later token
attends to it heavily, so its errors cost far more than others') is stored apart with 8-bit per-token
quantization; the other tokens go through the quantize -> rANS pipeline.

Container sections (FORMAT.md has the byte-level specification):
  0 params      key mode, value mode, segment length, table family, lead tokens, levels - 1 per (K/V, layer),
                then the variant byte: which of sections 7 and 8 follow (an explicit flag, never
                guessed from the section count; containers written before it still read)
  1 lead        the lead tokens: their fp16 bounds and uint8 symbols
  2 key side    quantization side information of K
  3 value side  quantization side information of V (sections 1-4 each in its coded form, sidecode.py:
                byte planes coded with rANS against their own tables, when that is shorter)
  4 stream meta center symbol per stream, then table index per stream (uint8 each; bit 7 of a table byte marks a
                delta stream: one that carries the differences of consecutive symbols, delta.py)
  5 lengths     words per coded stream (4 adjacent channels sharing one rANS state, layout.py), bit-packed
  6 words       the rANS words, uint16 little-endian, coded streams concatenated
  7 protected   (levels that protect sink-like tokens only) a mask over the rest tokens' (K/V, layer,
                token) rows, then those rows at 8 bits per token; they overwrite the streams' values
  8 predictor   (only with cross-layer prediction, predict.py) the 8-byte id of the layer predictor the
                residuals were coded against, then one byte per (K/V, layer): 1 where that layer was
                coded as its residual from the prediction, 0 where as itself (the writer's choice);
                section 7 is then present at every level (empty when the level protects nothing)

Protected rows: in a layer, a token whose mean |x| over the channels is below a fraction of the
median of those means over the chunk's tokens is attention-sink-like (in SmolLM2 the ' the' tokens of layers
3-10: 0.15-0.3x the usual value norm, 5-14% of the attention each); its errors cost far more than
others', so it is stored again at 8 bits (bench/quant_lab.py, BENCHMARKS.md "Quantization lab").
The statistic is an exact float64 sum, the median a selection: every device picks the same rows.
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec, check_kv_structure
from kvmesh.codecs.cachegen import delta, quant, sidecode
from kvmesh.codecs.cachegen.backends import Backend, get_backend
from kvmesh.codecs.cachegen.layout import MAX_CODED_GROUP, channel_group, stream_layout
from kvmesh.codecs.cachegen.levels import LEVELS, Level, read_schedule, with_schedule
from kvmesh.codecs.cachegen.predict import (FLAG_FIXED, FLAG_FP32, ID_BYTES, LayerPredictor, features,
                                            residual_levels)
from kvmesh.codecs.cachegen.rounding import QueryProfile
from kvmesh.codecs.cachegen.tables import NUM_TABLES, TABLE_FAMILY_VERSION
from kvmesh.codecs.errors import CodecError

CODEC_ID = 2
N_SECTIONS = 7
N_SECTIONS_PROTECTED = 8
N_SECTIONS_PREDICTED = 9
_PARAMS = struct.Struct("<BBHBB")
LEAD_LEVELS = 256
LEAD_MODES = (quant.MODE_TOKEN, quant.MODE_TOKEN)
_COUNTS = struct.Struct("<HB")
# The variant byte (the last byte of section 0, after the levels; FORMAT.md §2): which optional
# sections the container holds. Containers written before it (params 6 + 2L bytes long) are told
# apart by their section count instead.
VARIANT_PROTECTED = 0x01  # section 7, protected rows
VARIANT_PREDICTED = 0x02  # section 8, the layer predictor (section 7 then present, maybe empty)
VARIANT_BITS = VARIANT_PROTECTED | VARIANT_PREDICTED
# Bit 2: sections 1-4, where not raw, hold their coded form (sidecode.py) instead of a zlib stream.
VARIANT_CODED = 0x04


def _variant_sections(variant: int) -> int:
    return N_SECTIONS + bool(variant & VARIANT_BITS) + bool(variant & VARIANT_PREDICTED)


def container_variant(blob: bytes | bytearray | memoryview) -> tuple[int, bytes | None]:
    """(variant bits, the id of the layer predictor the container needs or None) of a cachegen
    container, from its explicit variant byte (or, for containers written before it, from its
    section count). CodecError when ``blob`` is not a well-formed cachegen container."""
    header, sections = container.unpack(blob)
    if header.codec_id != CODEC_ID:
        raise CodecError(f"not a cachegen container (codec id {header.codec_id})")
    L = header.shape[1]
    variant = _read_variant(sections, L)
    if not variant & VARIANT_PREDICTED:
        return variant, None
    raw = bytes(sections[N_SECTIONS_PREDICTED - 1])
    if len(raw) != ID_BYTES + 2 * L:
        raise CodecError("corrupt cachegen container: predictor section has the wrong size")
    return variant, raw[:ID_BYTES]


def _read_variant(sections: list[memoryview], L: int) -> int:
    """The variant bits of a container's sections: its variant byte, checked against the section
    count, or the section count of a container written before the byte existed."""
    params = sections[0]
    if len(params) == _PARAMS.size + 2 * L + 1:
        variant = params[-1]
        if variant & ~(VARIANT_BITS | VARIANT_CODED) or variant & VARIANT_BITS == VARIANT_PREDICTED:
            raise CodecError(f"corrupt cachegen container: unknown variant flags {variant:#04x}")
        if len(sections) != _variant_sections(variant):
            raise CodecError(f"corrupt cachegen container: its variant flags {variant:#04x} need "
                             f"{_variant_sections(variant)} sections, it has {len(sections)}")
        return variant
    if len(params) != _PARAMS.size + 2 * L:
        raise CodecError("corrupt cachegen container: params section has the wrong size")
    return {N_SECTIONS: 0, N_SECTIONS_PROTECTED: VARIANT_PROTECTED,
            N_SECTIONS_PREDICTED: VARIANT_BITS}.get(len(sections), 0)


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


def pack_meta(meta: bytes) -> bytes:
    """Section 4: the 2S stream meta bytes in their coded form (sidecode.py) when that is shorter (~2.7x
    smaller on real KV: value streams' centres are nearly all the middle level, tables repeat), else raw."""
    return sidecode.encode(meta, 4)


def unpack_meta(raw: memoryview | bytes, n: int, what: str = "stream meta", coded: bool = False) -> bytes:
    """The n stream meta bytes of section 4: raw when it is n bytes long, else the coded form (coded:
    the container's variant bit 2) or a zlib stream of them (containers written before 2026-12-03)."""
    if len(raw) == n:
        return bytes(raw)
    if coded:
        return sidecode.decode(raw, n, 4, what)
    if len(raw) > n:
        raise CodecError(f"corrupt cachegen container: {what} section is too long")
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, n)  # never more than n bytes, whatever the stream claims
    except zlib.error as e:
        raise CodecError(f"corrupt cachegen container: {what} does not decompress ({e})") from None
    if len(out) != n or not d.eof or d.unconsumed_tail or d.unused_data:
        raise CodecError(f"corrupt cachegen container: {what} decompresses to the wrong size (want {n} bytes)")
    return out


def pack_side(raw: bytes) -> bytes:
    """Sections 1-3 (fp16/fp32 side tensors, lead symbols; always an even number of bytes): their coded
    form (sidecode.py: the bytes at even offsets, then those at odd offsets, as rANS-coded planes) when
    that is shorter, else raw (FORMAT.md §2). The split puts the fp16 exponents together."""
    return sidecode.encode(raw, 2)


def unpack_side(raw: memoryview | bytes, n: int, what: str, coded: bool = False) -> memoryview | bytes:
    """The n bytes of section 1, 2 or 3: raw when it is n bytes long, else the coded form (coded: the
    container's variant bit 2) or pack_side's zlib stream (containers written before 2026-12-03)."""
    if len(raw) == n:
        return raw
    if coded:
        return sidecode.decode(raw, n, 2, what)
    split = np.frombuffer(unpack_meta(raw, n, what), np.uint8)
    out = np.empty(n, np.uint8)
    out[0::2], out[1::2] = split[: (n + 1) // 2], split[(n + 1) // 2:]
    return out.tobytes()


def stream_meta(blob: bytes) -> bytes:
    """The 2·S raw stream meta bytes of a cachegen container (section 4, inflated when compressed)."""
    header, sections = container.unpack(blob)
    _, L, T, C = header.shape
    rest = T - _PARAMS.unpack_from(sections[0], 0)[4]
    coded = bool(_read_variant(sections, L) & VARIANT_CODED)
    return unpack_meta(sections[4], 4 * L * C * quant.num_segments(rest), coded=coded) if rest > 0 else b""


def side_bytes(mode: int, layers: int, tokens: int, channels: int) -> int:
    return sum(int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
               for shape, dt in quant.side_spec(mode, layers, tokens, channels))


def lead_bytes(layers: int, lead: int, channels: int) -> int:
    return 2 * side_bytes(quant.MODE_TOKEN, layers, lead, channels) + 2 * layers * lead * channels


def protected_bytes(layers: int, rest: int, channels: int, rows: int) -> int:
    """Size of section 7: the mask bits, then per protected row fp16 lo, fp16 hi and C symbols."""
    return (2 * layers * rest + 7) // 8 + rows * (4 + channels)


def protected_rows(x: torch.Tensor, thresholds: tuple[float, float], tail: int = 0) -> torch.Tensor:
    """bool [2, L, R]: the rows of x fp32 [2, L, R, C] to store at 8 bits (FORMAT.md section 3): the
    sink-like rows below a threshold, and the last ``tail`` rows (K and V, every layer; Level.tail_for).

    s = the sum over channels of fp16(|x|) in float64: exact in any order (every term is a multiple of
    2^-24 below 2^16, so partial sums need < 53 bits for C <= 8192), hence the same on every device.
    On the CPU the compiled coder sums the fp16 bit patterns as integers (the same values); on a GPU,
    torch sums on the device.
    """
    mask = torch.zeros(x.shape[:3], dtype=torch.bool, device=x.device)
    for kv, threshold in enumerate(thresholds):
        if threshold <= 0:
            continue  # s >= 0, so s < 0 * ref never holds
        h = x[kv].to(torch.float16)
        if x.device.type == "cpu" and x.shape[-1] <= 8192:
            from kvmesh.codecs.cachegen import native as _native

            s = _native.row_sums(h)  # |fp16(x)| = fp16(|x|): the C code drops the sign bit
        else:
            s = torch.abs(h).sum(dim=2, dtype=torch.float64)  # [L, R]
        ref = torch.median(s, dim=1, keepdim=True).values  # the lower middle value: a selection
        mask[kv] = s < float(threshold) * ref
    if tail > 0:
        mask[:, :, max(x.shape[2] - tail, 0):] = True
    return mask


def _protect_encode(x: torch.Tensor, thresholds: tuple[float, float], tail: int = 0
                    ) -> tuple[bytes, torch.Tensor, torch.Tensor | None]:
    """(section 7, mask bool [2, L, R], the protected rows as the decoder restores them fp32 [n, C] or None)."""
    mask = protected_rows(x, thresholds, tail)
    bits = np.packbits(mask.cpu().numpy().reshape(-1), bitorder="little").tobytes()
    rows = x[mask]  # [n, C] in (K/V, layer, token) order
    if rows.shape[0] == 0:
        return bits, mask, None
    q, side = quant.quantize(rows.unsqueeze(0), torch.full((1,), float(LEAD_LEVELS), device=x.device), quant.MODE_TOKEN)
    return bits + _tensor_bytes([side[0][0], side[0][1], q]), mask, _protected_values(q, side[0])


def _protected_values(q: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    levels = torch.full((1,), float(LEAD_LEVELS), device=q.device)
    return quant.dequantize(q, [side], levels, quant.MODE_TOKEN)[0]


def _protect_decode(raw: memoryview, shape: tuple[int, ...], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Section 7 of rest rows shaped [2, L, R, C]: (mask bool [2, L, R], the rows fp32 [n, C] or None)."""
    _, L, R, C = shape
    nbits = 2 * L * R
    nmask = (nbits + 7) // 8
    if len(raw) < nmask:
        raise CodecError("corrupt cachegen container: protected section shorter than its mask")
    bits = np.unpackbits(np.frombuffer(raw[:nmask], np.uint8), bitorder="little")
    if bits[nbits:].any():
        raise CodecError("corrupt cachegen container: protected mask has padding bits set")
    mask_np = bits[:nbits].astype(bool)
    n = int(mask_np.sum())
    if len(raw) != protected_bytes(L, R, C, n):
        raise CodecError("corrupt cachegen container: protected section has the wrong size")
    mask = torch.from_numpy(mask_np.reshape(2, L, R)).to(dev)
    if n == 0:
        return mask, None
    side = _tensors_from(raw[nmask:nmask + 4 * n], [((2, 1, n), torch.float16)])
    q = torch.from_numpy(np.frombuffer(raw[nmask + 4 * n:], np.uint8).copy()).reshape(1, n, C)
    return mask, _protected_values(q.to(dev), side[0].to(dev))


def _restored_rows(mask: torch.Tensor | None, rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The protected rows placed in a tensor shaped like the rest tokens [2, L, R, C] (None: no rows)."""
    if rows is None:
        return None
    restored = torch.zeros_like(like)
    restored[mask] = rows
    return restored


def _cat_sides(parts: list[list[torch.Tensor]], mode: int) -> list[torch.Tensor]:
    """Side tensors of single layers joined along their layer axis."""
    axis = 1 if mode in (quant.MODE_CHANNEL, quant.MODE_TOKEN) else 0
    return [torch.cat([p[i] for p in parts], dim=axis) for i in range(len(parts[0]))]


def _tensor_bytes(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.float16
                    else t.detach().cpu().contiguous().view(torch.int16).numpy().tobytes() for t in tensors)


def _tensors_from(raw: memoryview, spec: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Reads side tensors (fp16/fp32, little-endian) and rejects non-finite or negative spans."""
    out, pos = [], 0
    for shape, dt in spec:
        n = int(np.prod(shape))
        if dt == torch.float16:
            t = torch.from_numpy(np.frombuffer(raw, "<i2", n, pos).copy()).view(torch.float16)
            pos += 2 * n
        else:
            t = torch.from_numpy(np.frombuffer(raw, "<f4", n, pos).astype(np.float32))
            pos += 4 * n
            if bool((t < 0).any()):
                raise CodecError("corrupt cachegen container: negative quantization span")
        if not bool(torch.isfinite(t).all()):
            raise CodecError("corrupt cachegen container: non-finite quantization side information")
        out.append(t.reshape(shape))
    return out


def read_params(params: bytes | memoryview, L: int, T: int, C: int) -> tuple[int, int, int, int, np.ndarray]:
    """Section 0 checked: (key mode, value mode, lead tokens, channels per coded stream, levels [2, L]);
    CodecError when a value is corrupt or from a format this build does not read."""
    kmode, vmode, segment, family, lead = _PARAMS.unpack_from(params, 0)
    if kmode not in quant.MODES or vmode not in quant.MODES or lead > T:
        raise CodecError(f"corrupt cachegen container: bad parameters (modes {kmode}, {vmode}, lead {lead})")
    group = 1 << (family >> 4)
    if segment != quant.SEGMENT or family & 0xF != TABLE_FAMILY_VERSION or group > MAX_CODED_GROUP or C % group:
        raise CodecError(f"cachegen container uses segment {segment} / table family {family & 0xF} / "
                         f"{group} channels per stream; this build reads {quant.SEGMENT} / "
                         f"{TABLE_FAMILY_VERSION} / a power of two <= {MAX_CODED_GROUP} dividing {C}")
    levels = np.frombuffer(params[_PARAMS.size : _PARAMS.size + 2 * L], np.uint8).astype(np.int64).reshape(2, L) + 1
    if levels.min() < 2:
        raise CodecError("corrupt cachegen container: a layer has fewer than 2 levels")
    return kmode, vmode, lead, group, levels


class CacheGenCodec(Codec):
    codec_id = CODEC_ID

    def __init__(self, level: Level, backend: Backend | None = None, key_profile: QueryProfile | None = None,
                 predictor: LayerPredictor | None = None, fixed_prediction: bool = True) -> None:
        """key_profile: the serving model's query profile (rounding.py). The encoder then rounds keys
        along it: same format and decoder, fewer errors where the model's queries look. Without one,
        keys round to their nearest level.
        predictor: the serving model's layer predictor (predict.py). Each layer is then coded as its
        difference from a prediction made from the layers before it: ~18% fewer bytes; decoding such
        a container needs the same predictor (its id is in the container).
        fixed_prediction: the prediction's arithmetic the writer uses (FORMAT.md section 3): fixed-point
        (the default since 2026-12-03), or False for the fp32 one of earlier containers (tests: those
        still read). Readers follow each container's section 8."""
        self.level = level
        self.level_id = level.level_id
        self.name = "cachegen" if level.name == "default" else f"cachegen-{level.name}"
        self.backend = backend if backend is not None else get_backend("cpu")
        self.key_profile = key_profile
        self.predictor = predictor
        self.fixed_prediction = fixed_prediction
        self._later: CacheGenCodec | None = None  # for_chunk's twin for chunks that do not start a sequence

    def for_chunk(self, start: int) -> CacheGenCodec:
        """The codec to write the chunk that begins at token ``start`` of its sequence with: this one
        for a sequence's first chunk, else a twin that stores no lead token (lead 0 in section 0, an
        empty section 1: FORMAT.md §2, which every reader follows). Why: only a sequence's first token
        is the attention sink the lead row keeps at 8 bits; a later chunk's first token is an ordinary
        one, and its lead row cost ~1% of a chunk at 8x for no measured quality (BENCHMARKS.md,
        "Recipe v4"). Writers only: a container of either decodes with either."""
        if start == 0 or self.level.lead_tokens == 0:
            return self
        if self._later is None:
            self._later = CacheGenCodec(dataclasses.replace(self.level, lead_tokens=0), self.backend,
                                        self.key_profile, self.predictor, self.fixed_prediction)
        return self._later

    # -- encode ----------------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor) -> bytes:
        if self.backend.name == "triton":
            from kvmesh.codecs.cachegen import device_pipeline

            if device_pipeline.encodable(self, kv):  # on the device end to end: the same bytes
                return device_pipeline.encode(self, kv)
        kv = check_kv_structure(kv)
        top = float(kv.abs().amax())  # one reduction for both checks (check_kv's and the fp16 range)
        if not math.isfinite(top):
            raise CodecError("kv contains inf or NaN values; refusing to encode")
        if top > quant.FP16_MAX:
            raise CodecError("cachegen stores fp16 bounds: values beyond +-65504 cannot be encoded (use 'lossless')")
        _, L, T, C = kv.shape
        if self.key_profile is not None:
            self.key_profile.check(L, C)
        levels = self.level.levels_for(L)
        if self.predictor is not None:
            self.predictor.check(L, C)
        modes = (self.level.key_mode, self.level.value_mode)
        lead = min(self.level.lead_tokens, T)
        x = kv.detach().to(self.backend.device, torch.float32)
        lead_sec = b""
        if lead:
            lead_q, lead_sides = self.backend.quantize(x[:, :, :lead], np.full((2, L), LEAD_LEVELS), LEAD_MODES)
            lead_sec = pack_side(_tensor_bytes([*lead_sides[0], *lead_sides[1], lead_q]))
        rest = T - lead
        protect = None
        if self.level.protects and rest:
            protect = _protect_encode(x[:, :, lead:], self.level.protect, self.level.tail_for(T))
        if rest == 0:
            sections = [b"", lead_sec, b"", b"", b"", pack_uints(np.zeros(0, np.int64)), b""]
        else:
            if self.predictor is None:
                q, sides = self.backend.quantize(x[:, :, lead:], levels, modes, key_profile=self.key_profile)
            else:  # the residuals' level counts are chosen per chunk (predict.residual_levels)
                q, sides, levels, used = self._quantize_predicted(x[:, :, lead:], levels, modes, protect)
            layout = stream_layout(L, rest, C, levels, channel_group(C))
            center, table, flags = self.backend.stream_models(q, layout, self.level.delta)
            words, counts = self.backend.rans_encode(q, center, table, layout, flags)
            meta = pack_meta(center.tobytes() + (table | (flags.astype(np.uint8) << 7)).tobytes())
            sections = [b"", lead_sec, pack_side(_tensor_bytes(sides[0])), pack_side(_tensor_bytes(sides[1])), meta,
                        pack_uints(np.asarray(counts)), np.asarray(words, dtype="<u2").tobytes()]
        family = TABLE_FAMILY_VERSION | (channel_group(C).bit_length() - 1) << 4
        variant = (VARIANT_PROTECTED if self.level.protects or self.predictor is not None else 0) | \
            (VARIANT_PREDICTED if self.predictor is not None else 0) | VARIANT_CODED
        sections[0] = (_PARAMS.pack(modes[0], modes[1], quant.SEGMENT, family, lead)
                       + (levels - 1).astype(np.uint8).tobytes() + bytes([variant]))
        if self.level.protects or self.predictor is not None:
            sections.append(protect[0] if protect is not None else b"")
        if self.predictor is not None:
            flag = FLAG_FIXED if self.fixed_prediction else FLAG_FP32
            sections.append(self.predictor.ident + ((used * flag).astype(np.uint8).tobytes() if rest else bytes(2 * L)))
        return container.pack(self.codec_id, self.level_id, kv.dtype, tuple(kv.shape), sections)

    def _quantize_predicted(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                            protect: tuple[bytes, torch.Tensor, torch.Tensor | None] | None
                            ) -> tuple[torch.Tensor, list[list[torch.Tensor]], np.ndarray, np.ndarray]:
        """quantize with cross-layer prediction: layer by layer (K, then V), each the residual from the
        prediction made of the layers as the decoder will have them (protected rows included), at the
        level counts that give the residual about the step the KV would get at ``levels``. A layer whose
        residual would need as many levels as the KV itself is coded as itself. Returns (q, sides, the
        level counts, bool [2, L]: which layers were predicted)."""
        fused = getattr(self.backend, "quantize_predicted", None)
        if fused is not None:  # the CPU: the same steps, compiled (backends.CpuBackend)
            return fused(x, levels, modes, self.key_profile, self.predictor, protect, self.fixed_prediction)
        _, L, R, C = x.shape
        dev = x.device
        dec = torch.empty_like(x)
        q = torch.empty(x.shape, dtype=torch.uint8, device=dev)
        parts: tuple[list, list] = ([], [])
        levels = np.array(levels, dtype=np.int64)
        used = np.zeros((2, L), dtype=bool)
        mask, rows = protect[1:] if protect is not None else (None, None)
        restored = _restored_rows(mask, rows, x)
        has_rows = mask.any(dim=2).cpu().numpy() if mask is not None else None  # [2, L]: any protected row
        fixed: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (kv, layer): to_fixed of the decoded layer
        for layer in range(L):
            for kv in (0, 1):
                target = x[kv, layer:layer + 1]
                pred = None
                if layer:
                    pred = self._predict(dec, fixed if self.fixed_prediction else None, kv, layer)
                    residual = target - pred
                    fewer = residual_levels(int(levels[kv, layer]), target, residual, modes[kv])
                    if fewer < levels[kv, layer]:
                        target, levels[kv, layer], used[kv, layer] = residual, fewer, True
                    else:
                        pred = None
                lv = levels[kv, layer:layer + 1]
                prof = self.key_profile.layer(layer) if kv == 0 and self.key_profile is not None else None
                ql, side = self.backend.quantize_half(target, lv, modes[kv], prof)
                y = self.backend.dequantize_half(ql, side, lv, modes[kv], out=dec[kv, layer:layer + 1])[0]
                if pred is not None:
                    y.add_(pred)  # the same fp32 sum as y + pred, in place
                if restored is not None and has_rows[kv, layer]:
                    y.copy_(torch.where(mask[kv, layer, :, None], restored[kv, layer], y))
                if self.fixed_prediction and (kv == 0 or layer < L - 1):  # the last values feed nothing
                    fixed[kv, layer] = self.backend.to_fixed(y)
                q[kv, layer] = ql[0]
                parts[kv].append(side)
        return q, [_cat_sides(parts[kv], modes[kv]) for kv in (0, 1)], levels, used

    def _predict(self, dec: torch.Tensor, fixed: dict[tuple[int, int], tuple[torch.Tensor, int]] | None,
                 kv: int, layer: int) -> torch.Tensor:
        """The prediction of (kv, layer >= 1) from the decoded layers before it: fixed-point from their
        to_fixed forms when ``fixed`` holds them, else the fp32 arithmetic from dec fp32 [2, L, R, C]."""
        if fixed is None:
            return self.backend.predict(features(dec, kv, layer), self.predictor, kv, layer)
        keys = ((0, layer - 1), (1, layer - 1), (0, layer))[:2 + kv]
        return self.backend.predict_fixed([fixed[k] for k in keys], self.predictor, kv, layer)

    def _add_predictions(self, out: torch.Tensor, used: np.ndarray,
                         protect: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        """Decoder side of _quantize_predicted: out fp32 [2, L, R, C] holds the dequantized residuals;
        adds the predictions of the layers ``used`` (uint8 [2, L], section 8's flags) marks, each with the
        arithmetic its flag names, in the encoder's order, and restores the protected rows."""
        fused = getattr(self.backend, "add_predictions", None)
        if fused is not None:  # the CPU: the same steps, compiled (backends.CpuBackend)
            return fused(out, used, self.predictor, protect)
        mask, rows = protect if protect is not None else (None, None)
        restored = _restored_rows(mask, rows, out)
        L = out.shape[1]
        fixed: dict[tuple[int, int], tuple[torch.Tensor, int]] | None = {} if (used == FLAG_FIXED).any() else None
        for layer in range(L):
            for kv in (0, 1):
                if used[kv, layer]:
                    pred = self._predict(out, fixed if used[kv, layer] == FLAG_FIXED else None, kv, layer)
                    out[kv, layer] = out[kv, layer] + pred
                if restored is not None:
                    out[kv, layer] = torch.where(mask[kv, layer, :, None], restored[kv, layer], out[kv, layer])
                if fixed is not None and (kv == 0 or layer < L - 1):
                    fixed[kv, layer] = self.backend.to_fixed(out[kv, layer])

    def encode_parts(self, kv: torch.Tensor) -> dict[str, int]:
        """Where the bytes of encode(kv) go, by section (for the benchmark)."""
        blob = self.encode(kv)
        header, sections = container.unpack(blob)
        names = ("params", "lead_token", "key_side", "value_side", "stream_meta", "stream_lengths", "symbols", "protected",
                 "predictor_id")
        parts = {n: len(s) for n, s in zip(names, sections)}
        parts["header"] = len(blob) - sum(parts.values())
        return parts

    # -- decode ----------------------------------------------------------------------------------
    def predicted_flags(self, sections: Sequence[memoryview], L: int, C: int) -> np.ndarray:
        """Section 8 of a container coded with cross-layer prediction, checked (one reader for codec.py and
        the device pipeline, so both raise the same errors in the same order): uint8 [2, L], per (K/V,
        layer) the prediction's arithmetic (predict.FLAG_FP32 / FLAG_FIXED) or 0 where coded as itself."""
        raw = bytes(sections[N_SECTIONS_PREDICTED - 1])
        if len(raw) != ID_BYTES + 2 * L:
            raise CodecError("corrupt cachegen container: predictor section has the wrong size")
        ident = raw[:ID_BYTES]
        used = np.frombuffer(raw[ID_BYTES:], np.uint8).reshape(2, L)
        if used.max() > FLAG_FIXED or used[:, 0].any():
            raise CodecError("corrupt cachegen container: bad predicted-layer flags")
        if self.predictor is None:
            raise CodecError(f"this container was coded with cross-layer prediction (predictor {ident.hex()}): "
                             "decode it with get_codec(..., predictor=<that layer predictor>)")
        if ident != self.predictor.ident:
            raise CodecError(f"this container was coded with layer predictor {ident.hex()}, "
                             f"not this codec's {self.predictor.ident.hex()}")
        self.predictor.check(L, C)
        if not self.level.protects and len(sections[N_SECTIONS]):
            raise CodecError("corrupt cachegen container: protected rows at a level that protects none")
        return used

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        if self.backend.name == "triton":
            from kvmesh.codecs.cachegen import device_pipeline

            out = device_pipeline.decode(self, blob)  # on the device end to end (None: not this container)
            if out is not None:
                return out if device is None else out.to(device)
        # a protecting level also reads its containers written before protection existed (7 sections)
        allowed = (N_SECTIONS, N_SECTIONS_PROTECTED) if self.level.protects else (N_SECTIONS,)
        header, sections = self._unpack(blob, allowed + (N_SECTIONS_PREDICTED,))
        params, lead_raw, kside, vside, meta, lens, words = sections[:N_SECTIONS]
        _, L, T, C = header.shape
        variant = _read_variant(sections, L)  # the explicit flag says which optional sections follow
        protected = sections[N_SECTIONS] if variant & VARIANT_BITS else None
        coded = bool(variant & VARIANT_CODED)  # sections 1-4: coded form (else zlib), where not raw
        predicted = bool(variant & VARIANT_PREDICTED)
        if predicted:
            used = self.predicted_flags(sections, L, C)
        kmode, vmode, lead, group, levels = read_params(params, L, T, C)
        dev = self.backend.device
        parts = []
        if len(lead_raw) > lead_bytes(L, lead, C) or (len(lead_raw) == 0) != (lead == 0):
            raise CodecError("corrupt cachegen container: lead token section has the wrong size")
        lead_raw = unpack_side(lead_raw, lead_bytes(L, lead, C), "lead token", coded)
        if lead:
            spec = quant.side_spec(quant.MODE_TOKEN, L, lead, C)
            nside = side_bytes(quant.MODE_TOKEN, L, lead, C)
            lk = _tensors_from(lead_raw[:nside], spec)
            lv = _tensors_from(lead_raw[nside : 2 * nside], spec)
            lq = torch.from_numpy(np.frombuffer(lead_raw[2 * nside :], np.uint8).copy()).reshape(2, L, lead, C)
            parts.append(self.backend.dequantize(lq.to(dev), [[t.to(dev) for t in lk], [t.to(dev) for t in lv]],
                                                 np.full((2, L), LEAD_LEVELS), LEAD_MODES))
        rest = T - lead
        if rest:
            # sizes first: a forged header must not make us allocate per-stream arrays
            if len(meta) > 4 * L * C * quant.num_segments(rest):
                raise CodecError("corrupt cachegen container: stream meta section is too long")
            for raw, mode in ((kside, kmode), (vside, vmode)):
                if not 0 < len(raw) <= side_bytes(mode, L, rest, C):
                    raise CodecError("corrupt cachegen container: side information has the wrong size")
            kside, vside = (unpack_side(raw, side_bytes(mode, L, rest, C), "side information", coded)
                            for raw, mode in ((kside, kmode), (vside, vmode)))
            layout = stream_layout(L, rest, C, levels, group)
            S = layout.num_streams
            sides = [[t.to(dev) for t in _tensors_from(raw, quant.side_spec(mode, L, rest, C))]
                     for raw, mode in ((kside, kmode), (vside, vmode))]
            m = np.frombuffer(unpack_meta(meta, 2 * S, coded=coded), np.uint8)
            center, flags, table = m[:S], m[S:] >= delta.DELTA_FLAG, m[S:] & delta.TABLE_MASK
            if np.any(center.astype(np.int64) >= layout.stream_levels) or np.any(table >= NUM_TABLES):
                raise CodecError("corrupt cachegen container: stream center or table index out of range")
            counts = unpack_uints(lens, layout.num_coded)
            if (np.any(counts < 2) or np.any(counts > layout.coded_lengths + 2)
                    or 2 * int(counts.sum()) != len(words)):
                raise CodecError("corrupt cachegen container: stream word counts do not match the stored words")
            w = np.frombuffer(words, dtype="<u2")
            q = self.backend.rans_decode(w, counts.astype(np.int32), center, table, layout, flags)
            rest_out = self.backend.dequantize(q, sides, levels, (kmode, vmode))
            protect = None
            if protected is not None and (self.level.protects or len(protected)):
                protect = _protect_decode(protected, rest_out.shape, rest_out.device)
            if predicted:
                self._add_predictions(rest_out, used, protect)
            elif protect is not None and protect[1] is not None:
                rest_out[protect[0]] = protect[1]
            parts.append(rest_out)
        elif protected is not None and len(protected):
            raise CodecError("corrupt cachegen container: protected rows present without tokens")
        elif len(kside) or len(vside) or len(meta) or len(words) or len(lens) != len(pack_uints(np.zeros(0, np.int64))):
            raise CodecError("corrupt cachegen container: stream sections present without tokens")
        out = (torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]).to(header.dtype)
        return out if device is None else out.to(device)

    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        _, L, T, C = shape
        lead = min(self.level.lead_tokens, T)
        rest = T - lead
        streams = 2 * L * C * quant.num_segments(rest)
        group = channel_group(C)
        coded = streams // group
        words = 2 * (2 * L * C * rest + 2 * coded)  # rANS emits at most one word per symbol
        # a count minus the base is at most G * SEGMENT (+ 2 - 2)
        counts = _COUNTS.size + (coded * (group * quant.SEGMENT).bit_length() + 7) // 8
        sides = side_bytes(self.level.key_mode, L, rest, C) + side_bytes(self.level.value_mode, L, rest, C) if rest else 0
        n_sections, protected = N_SECTIONS, 0
        if self.level.protects:
            n_sections, protected = N_SECTIONS_PROTECTED, protected_bytes(L, rest, C, 2 * L * rest) if rest else 0
        if self.predictor is not None:
            n_sections, protected = N_SECTIONS_PREDICTED, protected + ID_BYTES + 2 * L
        return (container.container_overhead(n_sections) + _PARAMS.size + 2 * L + 1 + lead_bytes(L, lead, C)
                + sides + 2 * streams + counts + words + protected)


def make_codec(level_name: str, backend: str = "cpu", key_profile: QueryProfile | str | os.PathLike | None = None,
               predictor: LayerPredictor | str | os.PathLike | None = None,
               schedule: tuple[Sequence[int], Sequence[int]] | tuple[Sequence[int], Sequence[int], int | None]
               | str | os.PathLike | None = None) -> CacheGenCodec:
    """key_profile: a QueryProfile or the path of one saved with QueryProfile.save; predictor: a
    LayerPredictor or the path of one saved with LayerPredictor.save; schedule: the model's own level
    counts per layer, (key counts, value counts) or (key counts, value counts, tail tokens: Level.tail_for),
    or a file saved with levels.save_schedule for this level."""
    level = LEVELS[level_name]
    if key_profile is not None and not isinstance(key_profile, QueryProfile):
        if not isinstance(key_profile, (str, os.PathLike)):
            raise CodecError(f"key_profile must be a QueryProfile or a file path, got {type(key_profile).__name__}")
        key_profile = QueryProfile.load(key_profile)
    if predictor is not None and not isinstance(predictor, LayerPredictor):
        if not isinstance(predictor, (str, os.PathLike)):
            raise CodecError(f"predictor must be a LayerPredictor or a file path, got {type(predictor).__name__}")
        predictor = LayerPredictor.load(predictor)
    if schedule is not None:
        if isinstance(schedule, (str, os.PathLike)):
            name, keys, values, tail = read_schedule(schedule)
            if name != level_name:
                raise CodecError(f"schedule {schedule} is for level {name!r}, not {level_name!r}")
        elif isinstance(schedule, (tuple, list)) and len(schedule) in (2, 3):
            keys, values, tail = schedule[0], schedule[1], (schedule[2] if len(schedule) == 3 else None)
        else:
            raise CodecError("schedule must be (key counts, value counts[, tail tokens]) or a schedule file path")
        level = with_schedule(level, keys, values, tail)
    return CacheGenCodec(level, get_backend(backend), key_profile, predictor)
