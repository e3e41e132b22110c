"""The codec registry: method names -> codecs, and container ids -> method names."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvmesh.codecs import container
from kvmesh.codecs.base import Codec
from kvmesh.codecs.cachegen.backends import CHOICES, resolve
from kvmesh.codecs.errors import CodecError

BACKENDS = CHOICES


@dataclass(frozen=True)
class _Method:
    name: str
    codec_id: int
    level_id: int
    level_name: str
    factory: Callable[..., Codec]  # (backend ("cpu" | "triton"), **options) -> codec
    backends: tuple[str, ...]  # the backends the method has
    options: tuple[str, ...] = ()  # the keyword options its factory takes (get_codec passes them on)
    listed: bool = True  # in available_methods() (what agents advertise and accept) by default


_METHODS: dict[str, _Method] = {}

# Methods that are registered but not listed by default (comparison baselines such as
# lmcache-cachegen) join available_methods() when named here, comma-separated.
ENV_EXTRA_METHODS = "KVMESH_EXTRA_METHODS"


def register(name: str, codec_id: int, factory: Callable[..., Codec], *, level_id: int = 0,
             level_name: str = "default", backends: tuple[str, ...] = ("cpu", "triton"),
             options: tuple[str, ...] = (), listed: bool = True) -> None:
    """Registers a method.

    `backends` lists the backends the method has: "auto" picks Triton on a GPU only for methods
    that have it, and asking a CPU-only method for "triton" is an error. `options` names the keyword
    options the factory accepts (for cachegen: key_profile, predictor). `listed=False` keeps the
    method out of available_methods() unless configured (ENV_EXTRA_METHODS or ``extra``): get_codec
    and decode still take it by name.
    """
    _METHODS[name] = _Method(name, codec_id, level_id, level_name, factory, backends, options, listed)


def configured_extra_methods() -> tuple[str, ...]:
    """The unlisted methods that ENV_EXTRA_METHODS names (unknown names are an error that lists the valid ones)."""
    names = tuple(n.strip() for n in os.environ.get(ENV_EXTRA_METHODS, "").split(",") if n.strip())
    unknown = [n for n in names if n not in _METHODS]
    if unknown:
        raise CodecError(f"{ENV_EXTRA_METHODS} names unknown methods {', '.join(map(repr, unknown))}; "
                         f"registered: {', '.join(_METHODS)}")
    return names


def available_methods(extra: tuple[str, ...] | None = None) -> list[str]:
    """The methods to offer: every listed method, plus the unlisted ones named in ``extra`` (default:
    the ENV_EXTRA_METHODS configuration). Agents advertise and accept this list."""
    extra = configured_extra_methods() if extra is None else extra
    unknown = [n for n in extra if n not in _METHODS]
    if unknown:
        raise CodecError(f"unknown codec methods {', '.join(map(repr, unknown))}; registered: {', '.join(_METHODS)}")
    return [m.name for m in _METHODS.values() if m.listed or m.name in extra]


def registered_methods() -> list[str]:
    """Every method get_codec accepts, listed or not."""
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
    return resolve(backend, method.backends, method.name)


def get_codec(name: str, backend: str = "auto", **options: object) -> Codec:
    """Returns the codec registered as `name` (e.g. "cachegen", "cachegen-hq") on the given backend.

    options: the method's keyword options (method_options(name)), e.g. cachegen's
    ``key_profile=QueryProfile | path``; an option the method does not take is a CodecError."""
    if name not in _METHODS:
        raise CodecError(f"unknown codec method {name!r}; available: {', '.join(_METHODS)}")
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


def max_encoded_size(name: str, shape: tuple[int, ...], dtype: torch.dtype, **options: object) -> int:
    """An upper bound on the container size of method `name` for any kv of this shape and dtype."""
    return get_codec(name, backend="cpu", **options).max_encoded_size(shape, dtype)
