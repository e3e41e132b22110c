"""The cachegen pipeline stages behind one typed protocol, with one registry of implementations.

Each stage has exactly one implementation per device:

* ``cpu``: CpuBackend, the compiled extension (native.py wrapping csrc/*.c; required, setup.py builds it);
* ``triton``: TritonBackend (triton_backend.py), Triton kernels on a CUDA GPU, or on the CPU under
  ``TRITON_INTERPRET=1``.

Both return identical values (and so write identical bytes); the numpy/torch reference every stage is
checked against lives with the tests (tests/codecs/reference). :func:`resolve` is the one place that
turns a requested backend name ("auto", "cpu", "triton") into the backend that runs, and
:func:`get_backend` the one place that builds it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from kvmesh.codecs.cachegen import native as _native
from kvmesh.codecs.cachegen import quant
from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.predict import FLAG_FIXED, LayerPredictor, levels_from_spans
from kvmesh.codecs.cachegen.rounding import QueryProfile, check_mode
from kvmesh.codecs.errors import CodecError

SideTensors = list[torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What CacheGenCodec needs from a device: every stage of FORMAT.md, bit-exact on every backend."""

    name: str
    device: torch.device

    def quantize(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                 key_profile: QueryProfile | None = None) -> tuple[torch.Tensor, list[SideTensors]]:
        """x [2, L, T, C] -> (q uint8 [2, L, T, C], [key side tensors, value side tensors])."""
        ...

    def quantize_half(self, x: torch.Tensor, levels: np.ndarray, mode: int, key_profile: QueryProfile | None = None
                      ) -> tuple[torch.Tensor, SideTensors]:
        """One of K or V: x fp32 [L, T, C], levels [L] -> (q uint8 [L, T, C], side tensors)."""
        ...

    def dequantize(self, q: torch.Tensor, sides: list[SideTensors], levels: np.ndarray,
                   modes: tuple[int, int]) -> torch.Tensor:
        """q uint8 [2, L, T, C] -> fp32 [2, L, T, C]."""
        ...

    def dequantize_half(self, q: torch.Tensor, side: SideTensors, levels: np.ndarray, mode: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """One of K or V: q uint8 [L, T, C] -> fp32 [L, T, C] (into out when given)."""
        ...

    def predict(self, x: torch.Tensor, predictor: LayerPredictor, kv: int, layer: int) -> torch.Tensor:
        """The cross-layer prediction of (kv, layer) from its features x fp32 [R, F]: fp32 [R, C]."""
        ...

    def to_fixed(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A decoded layer y fp32 [R, C] as fixed-point features (predict.to_fixed): (X int16 [R, C'], sx),
        C' >= C the backend's stored width (columns past C zero)."""
        ...

    def predict_fixed(self, parts: list[tuple[torch.Tensor, int]], predictor: LayerPredictor, kv: int,
                      layer: int) -> torch.Tensor:
        """The fixed-point prediction of (kv, layer) from its parts (to_fixed's results, in feature
        order): fp32 [R, C]."""
        ...

    def stream_models(self, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center uint8 [S], table uint8 [S], delta flag bool [S]) per stream (FORMAT.md section 4)."""
        ...

    def rans_encode(self, q: torch.Tensor, center: np.ndarray, table: np.ndarray, layout: StreamLayout,
                    flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(words uint16, words per coded stream) of every stream's residuals (delta streams per flags)."""
        ...

    def rans_decode(self, words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> torch.Tensor:
        """Inverse of rans_encode: q uint8 [2, L, T, C]; CodecError on a corrupt stream."""
        ...


def _per_channel(mode: int) -> bool:
    return mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP)


class CpuBackend:
    """Every stage in the compiled extension (native.py), the per-group bounds in torch."""

    name = "cpu"
    device = torch.device("cpu")

    @staticmethod
    def _u8(q: torch.Tensor) -> np.ndarray:
        # the quantizer already returns contiguous CPU uint8: no copy in the usual case
        return q.detach().cpu().contiguous().numpy()

    def quantize(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                 key_profile: QueryProfile | None = None) -> tuple[torch.Tensor, list[SideTensors]]:
        """x fp32 [2, L, T, C] -> (q uint8 [2, L, T, C], [key side tensors, value side tensors]).
        key_profile: the keys' symbols are rounded along it (rounding.py); same grid and side tensors."""
        x = x.to(torch.float32).contiguous()
        qk, sk = self.quantize_half(x[0], levels[0], modes[0], key_profile)
        qv, sv = self.quantize_half(x[1], levels[1], modes[1])
        return torch.stack([qk, qv]), [sk, sv]

    def quantize_half(self, x: torch.Tensor, levels: np.ndarray, mode: int, key_profile: QueryProfile | None = None
                      ) -> tuple[torch.Tensor, SideTensors]:
        """One of K or V: x fp32 [L, T, C], levels [L] -> (q uint8 [L, T, C], side tensors)."""
        lv = torch.from_numpy(np.asarray(levels).astype(np.float32))
        x = x.to(torch.float32).contiguous()
        if key_profile is not None:
            check_mode(mode)
            side = quant.quantize_params(x, lv, mode)[0]
            lo, inv, step, bm1 = quant.grid(side, lv, mode)
            return _native.round_keys(x, lo, inv, step, bm1, key_profile), side
        # the per-group part in torch, the elementwise part in one compiled pass
        side, lo, inv, bm1 = quant.quantize_params(x, lv, mode)
        return _native.quantize(x, lo, inv, bm1, _per_channel(mode)), side

    def dequantize(self, q: torch.Tensor, sides: list[SideTensors], levels: np.ndarray,
                   modes: tuple[int, int]) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty(q.shape, dtype=torch.float32)
        for i in (0, 1):
            self.dequantize_half(q[i], sides[i], levels[i], modes[i], out=out[i])
        return out

    def dequantize_half(self, q: torch.Tensor, side: SideTensors, levels: np.ndarray, mode: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """One of K or V: q uint8 [L, T, C] -> fp32 [L, T, C] (into out when given)."""
        lv = torch.from_numpy(np.asarray(levels).astype(np.float32))
        lo, step = quant.dequantize_params(side, lv, mode)
        return _native.dequantize(q.contiguous(), lo, step, _per_channel(mode), out=out)

    def predict(self, x: torch.Tensor, predictor: LayerPredictor, kv: int, layer: int) -> torch.Tensor:
        """predict.py's prediction of (kv, layer) from its features x fp32 [R, F]: fp32 [R, C]."""
        w, b = predictor.weights(kv, layer)
        return _native.predict(x.contiguous(), w, b)

    def to_fixed(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """predict.to_fixed, compiled: (X int16 [R, even(C)], sx)."""
        y = y.to(torch.float32).contiguous()
        out = np.empty((y.shape[0], _native.even(y.shape[1])), np.int16)
        sx = _native.to_fixed(y, out)
        return torch.from_numpy(out), sx

    def predict_fixed(self, parts: list[tuple[torch.Tensor, int]], predictor: LayerPredictor, kv: int,
                      layer: int) -> torch.Tensor:
        """The fixed-point prediction (predict.py) of (kv, layer): fp32 [R, C]."""
        out = np.empty((parts[0][0].shape[0], predictor.channels), np.float32)
        _native.predict_fixed(tuple((x.numpy(), sx) for x, sx in parts), predictor, kv, layer, out)
        return torch.from_numpy(out)

    # -- cross-layer prediction, fused per (K/V, layer) step ---------------------------------------
    # codec.py's _quantize_predicted and _add_predictions run on any backend from the stages above;
    # on the CPU these two do the same steps with three compiled calls per (K/V, layer) and no torch
    # glue (~60 steps a chunk, each a few hundred microseconds of torch ops otherwise). Same bits:
    # tests/codecs/test_fused_prediction.py checks them against the stage-by-stage loop.

    def quantize_predicted(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                           key_profile: QueryProfile | None, predictor: LayerPredictor,
                           protect: tuple[bytes, torch.Tensor, torch.Tensor | None] | None, fixed: bool = True
                           ) -> tuple[torch.Tensor, list[SideTensors], np.ndarray, np.ndarray]:
        """codec.CacheGenCodec._quantize_predicted (see there) for x fp32 [2, L, R, C]; fixed: the
        fixed-point prediction (else the fp32 one of containers written before 2026-12-03)."""
        _, L, R, C = x.shape
        x = x.to(torch.float32)
        if x.stride()[2:] != (C, 1):  # each (K/V, layer) [R, C] must be one dense block (a token slice is)
            x = x.contiguous()
        dec = torch.empty(x.shape, dtype=torch.float32)
        q = torch.empty(x.shape, dtype=torch.uint8)
        sides = [[torch.empty(shape, dtype=dt) for shape, dt in quant.side_spec(modes[kv], L, R, C)] for kv in (0, 1)]
        views = [[_layer_views(s, modes[kv], layer) for layer in range(L)] for kv, s in enumerate(sides)]
        levels = np.array(levels, dtype=np.int64)
        used = np.zeros((2, L), dtype=bool)
        masks, rows = _protected_by_layer(protect, L, R)
        # numpy views throughout: the loop runs ~60 steps a chunk, and a numpy slice costs a tenth of a tensor's
        xn, dn, qn = x.numpy(), dec.numpy(), q.numpy()
        pred, resid = np.empty((R, C), np.float32), np.empty((R, C), np.float32)
        fx = _FixedLayers(L, R, C) if fixed else None
        for layer in range(L):
            for kv in (0, 1):
                src, p, lv = xn[kv, layer], None, int(levels[kv, layer])
                if layer and fx is not None:
                    _native.predict_fixed(fx.parts(kv, layer), predictor, kv, layer, pred)
                elif layer:
                    w, b = predictor.weights(kv, layer)
                    _native.predict_parts((dn[0, layer - 1], dn[1, layer - 1], dn[0, layer])[:2 + kv], w, b, pred)
                if layer:
                    sx, sr = _native.layer_residual(src, pred, modes[kv], resid)
                    fewer = levels_from_spans(lv, sx, sr)
                    if fewer < lv:
                        src, p, lv, used[kv, layer] = resid, pred, fewer, True
                        levels[kv, layer] = fewer
                prof = key_profile.layer(layer) if kv == 0 and key_profile is not None else None
                protected = masks is not None and masks[kv, layer].any()
                _native.quantize_layer(src, lv, modes[kv], views[kv][layer], qn[kv, layer], dn[kv, layer], prof, p,
                                       masks[kv, layer] if protected else None, rows[kv][layer] if protected else None)
                if fx is not None:
                    fx.take(dn[kv, layer], kv, layer)
        return q, sides, levels, used

    def add_predictions(self, out: torch.Tensor, used: np.ndarray, predictor: LayerPredictor,
                        protect: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        """codec.CacheGenCodec._add_predictions (see there) for out fp32 [2, L, R, C] (contiguous); used
        uint8 [2, L]: section 8's flags (predict.FLAG_FP32 / FLAG_FIXED: which arithmetic, 0: none)."""
        _, L, R, C = out.shape
        masks, rows = _protected_by_layer((b"",) + tuple(protect) if protect is not None else None, L, R)
        on = out.numpy()
        fx = _FixedLayers(L, R, C) if (np.asarray(used) == FLAG_FIXED).any() else None
        for layer in range(L):
            for kv in (0, 1):
                if used[kv, layer] == FLAG_FIXED:
                    _native.predict_fixed(fx.parts(kv, layer), predictor, kv, layer, on[kv, layer], add=True)
                elif used[kv, layer]:
                    w, b = predictor.weights(kv, layer)
                    _native.predict_parts((on[0, layer - 1], on[1, layer - 1], on[0, layer])[:2 + kv], w, b, on[kv, layer],
                                          add=True)
                if masks is not None and masks[kv, layer].any():
                    out[kv, layer][torch.from_numpy(masks[kv, layer].astype(bool))] = rows[kv][layer]
                if fx is not None:
                    fx.take(on[kv, layer], kv, layer)

    def histogram(self, q: torch.Tensor, layout: StreamLayout) -> np.ndarray:
        """int64 [S, 256]: how often each symbol occurs in each stream."""
        return _native.histogram(self._u8(q), layout)

    def choose_tables(self, hist: np.ndarray, layout: StreamLayout, with_cost: bool = False
                      ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center uint8 [S], table uint8 [S]) per FORMAT.md: the median symbol, then the table of
        least integer cost for the residuals (ties: the lowest index); with_cost adds that least
        cost per stream (int64 [S], 1/256 bit)."""
        return _native.choose_tables(hist, layout, with_cost)

    def stream_models(self, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center, table, delta flag) per stream, histogram, table and delta choice fused in one pass
        (halves: (K, V) may use delta streams)."""
        return _native.models(self._u8(q), layout, halves)

    def rans_encode(self, q: torch.Tensor, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes residual r = (q - center) mod B of every stream; (words uint16, words per coded stream).
        Streams flagged in flags (bool [S]) are delta streams: they code delta.forward's symbols."""
        return _native.encode(self._u8(q), np.asarray(center), np.asarray(table), layout, flags)

    def rans_decode(self, words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> torch.Tensor:
        """Inverse of rans_encode (with the same flags): q uint8 [2, L, T, C]; CodecError on a corrupt stream."""
        return torch.from_numpy(_native.decode(words, counts, np.asarray(center), np.asarray(table), layout, flags))


class _FixedLayers:
    """The fixed-point features (to_fixed) of the decoded layers of a chunk, each made once, as the
    layers become final (prediction added, protected rows restored)."""

    def __init__(self, L: int, R: int, C: int) -> None:
        self.x = np.zeros((2, L, R, _native.even(C)), np.int16)
        self.sx = np.zeros((2, L), np.int64)

    def take(self, y: np.ndarray, kv: int, layer: int) -> None:
        if kv == 0 or layer < self.x.shape[1] - 1:  # the last layer's values feed no prediction
            self.sx[kv, layer] = _native.to_fixed(y, self.x[kv, layer])

    def parts(self, kv: int, layer: int) -> tuple[tuple[np.ndarray, int], ...]:
        """The features of (kv, layer)'s prediction: K'[l-1], V'[l-1] (and K'[l] for values)."""
        keys = ((0, layer - 1), (1, layer - 1), (0, layer))[:2 + kv]
        return tuple((self.x[k], int(self.sx[k])) for k in keys)


def _layer_views(side: SideTensors, mode: int, layer: int) -> list[np.ndarray]:
    """Numpy views of one layer's part of a mode's side tensors (quant.side_spec), for quantize_layer."""
    if mode in (quant.MODE_CHANNEL, quant.MODE_TOKEN):  # [2, L, ...]: lo then hi
        return [side[0][0, layer].numpy(), side[0][1, layer].numpy()]
    return [t[layer].numpy() for t in side]


def _protected_by_layer(protect: tuple[bytes, torch.Tensor, torch.Tensor | None] | None, L: int, R: int
                        ) -> tuple[np.ndarray | None, list[list[torch.Tensor]]]:
    """(mask uint8 [2, L, R] or None, the protected rows of each (K/V, layer) as the decoder restores
    them): codec.py's section 7 rows are in (K/V, layer, token) order."""
    if protect is None or protect[2] is None:
        return None, []
    mask = protect[1].cpu().numpy().astype(np.uint8)
    ends = np.cumsum(mask.sum(axis=2, dtype=np.int64).reshape(-1)).tolist()
    rows = protect[2].to(torch.float32).contiguous()
    per = [rows[a:b] for a, b in zip([0] + ends[:-1], ends)]
    return mask, [per[kv * L:(kv + 1) * L] for kv in (0, 1)]


def _triton() -> Backend:
    try:
        from kvmesh.codecs.cachegen.triton_backend import TritonBackend
    except ImportError as e:
        raise CodecError(f"the triton backend is not available: {e}") from None
    return TritonBackend()


# The registry: backend name -> factory. get_backend builds from it; resolve chooses among its names.
BACKENDS: dict[str, Callable[[], Backend]] = {"cpu": CpuBackend, "triton": _triton}
CHOICES = ("auto", *BACKENDS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(requested: str, offered: tuple[str, ...] = tuple(BACKENDS), method: str = "cachegen") -> str:
    """The backend that runs for a request: "auto" is Triton on a CUDA GPU when the method offers it,
    else the CPU; "triton" needs a CUDA GPU or TRITON_INTERPRET=1. CodecError says what is valid."""
    if requested not in CHOICES:
        raise CodecError(f"backend must be one of {CHOICES}, got {requested!r}")
    if requested == "auto":
        return "triton" if "triton" in offered and torch.cuda.is_available() else "cpu"
    if requested not in offered:
        raise CodecError(f"method {method!r} has no {requested} backend; it has: {', '.join(offered)}")
    if requested == "triton" and not torch.cuda.is_available() and not _interpreting():
        raise CodecError("backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    return requested


def get_backend(name: str) -> Backend:
    """A new backend of a resolved name ("cpu" | "triton")."""
    if name not in BACKENDS:
        raise CodecError(f"unknown cachegen backend {name!r}; backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]()
