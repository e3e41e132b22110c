"""The model files of cachegen (query profiles, layer predictors): numpy .npz without pickles, tagged
with a format name, written atomically."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kvmesh.codecs.errors import CodecError

T = TypeVar("T")


def save(path: str | Path, fmt: str, **arrays: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, format=np.array(fmt), **arrays)
    tmp.replace(path)
    return path


def load(path: str | Path, fmt: str, kind: str, build: Callable[[Any], T]) -> T:
    """build(the open npz) for a file of format ``fmt``; anything else is a CodecError naming ``kind``."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != fmt:
                raise CodecError(f"{path} is not a kvmesh {kind} ({fmt})")
            return build(z)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"cannot read {kind} {path}: {e}") from None
