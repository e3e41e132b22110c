"""The codec registry: method names -> codecs, and container ids -> method names."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec
from kvmesh.codecs.errors import CodecError

BACKENDS = ("auto", "cpu", "triton")


@dataclass(frozen=True)
class _Method:
    name: str
    codec_id: int
    level_id: int
    level_name: str
    factory: Callable[..., Codec]  # (backend ("cpu" | "triton"), **options) -> codec
    backends: tuple[str, ...]  # the backends the method has
    options: tuple[str, ...] = ()  # the keyword options its factory takes (get_codec passes them on)


_METHODS: dict[str, _Method] = {}
_LEVEL_ALIASES: dict[str, dict[str, str]] = {}  # base name -> {level name or alias -> method name}


def register(name: str, codec_id: int, factory: Callable[..., Codec], *, level_id: int = 0,
             level_name: str = "default", base: str | None = None, aliases: tuple[str, ...] = (),
             backends: tuple[str, ...] = ("cpu", "triton"), options: tuple[str, ...] = ()) -> None:
    """Registers a method; `base` groups levels of one codec so get_codec(base, level=...) finds them.

    `backends` lists the backends the method has: "auto" picks Triton on a GPU only for methods
    that have it, and asking a CPU-only method for "triton" is an error. `options` names the keyword
    options the factory accepts (for cachegen: key_profile).
    """
    _METHODS[name] = _Method(name, codec_id, level_id, level_name, factory, backends, options)
    levels = _LEVEL_ALIASES.setdefault(base or name, {})
    for key in (level_name, *aliases):
        levels[key] = name


def available_methods() -> list[str]:
    """Every method name get_codec accepts."""
    return list(_METHODS)


def method_options(name: str) -> tuple[str, ...]:
    """The keyword options get_codec accepts for method `name` (e.g. cachegen's key_profile)."""
    if name not in _METHODS:
        raise CodecError(f"unknown codec method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name].options


def method_for_ids(codec_id: int, level_id: int) -> str:
    for m in _METHODS.values():
        if m.codec_id == codec_id and m.level_id == level_id:
            return m.name
    raise CodecError(f"unknown codec id {codec_id} level {level_id}")


def _resolve_backend(method: _Method, backend: str) -> str:
    if backend not in BACKENDS:
        raise CodecError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if torch.cuda.is_available() and "triton" in method.backends else "cpu"
    if backend not in method.backends:
        raise CodecError(f"method {method.name!r} has no {backend} backend; it has: {', '.join(method.backends)}")
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise CodecError("backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    return backend


def get_codec(name: str, backend: str = "auto", level: str | None = None, **options: object) -> Codec:
    """Returns the codec registered as `name` (optionally at a named level) on the given backend.

    options: the method's keyword options (method_options(name)), e.g. cachegen's
    ``key_profile=QueryProfile | path``; an option the method does not take is a CodecError."""
    if name not in _METHODS:
        raise CodecError(f"unknown codec method {name!r}; available: {', '.join(_METHODS)}")
    if level is not None:
        base = next((b for b, lv in _LEVEL_ALIASES.items() if name in lv.values()), name)
        levels = _LEVEL_ALIASES.get(base, {})
        if level not in levels:
            raise CodecError(f"method {name!r} has no level {level!r}; levels: {', '.join(levels)}")
        if name != base and levels[level] != name:
            raise CodecError(f"method {name!r} is already level {_METHODS[name].level_name!r}, not {level!r}")
        name = levels[level]
    method = _METHODS[name]
    unknown = sorted(k for k in options if k not in method.options)
    if unknown:
        takes = ", ".join(method.options) or "none"
        raise CodecError(f"method {name!r} takes no option {', '.join(map(repr, unknown))}; its options: {takes}")
    given = {k: v for k, v in options.items() if v is not None}
    return method.factory(_resolve_backend(method, backend), **given)


@dataclass(frozen=True)
class ContainerInfo:
    method: str
    level: str
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    nbytes: int


def inspect(blob: bytes) -> ContainerInfo:
    """Reads and validates a container's header and checksum without decoding it."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"blob must be bytes, got {type(blob).__name__}")
    header = container.read_header(blob)
    name = method_for_ids(header.codec_id, header.level_id)
    return ContainerInfo(name, _METHODS[name].level_name, header.dtype, header.shape, len(memoryview(blob).cast("B")))


def decode(blob: bytes, device: torch.device | str | None = None, **options: object) -> torch.Tensor:
    """Decodes any container with the CPU codec named in its header; options as get_codec's (a
    cachegen container coded with cross-layer prediction needs ``predictor=``)."""
    info = inspect(blob)
    return get_codec(info.method, backend="cpu", **options).decode(blob, device=device)


def max_encoded_size(name: str, shape: tuple[int, ...], dtype: torch.dtype, level: str | None = None,
                     **options: object) -> int:
    """An upper bound on the container size of method `name` for any kv of this shape and dtype."""
    return get_codec(name, backend="cpu", level=level, **options).max_encoded_size(shape, dtype)
