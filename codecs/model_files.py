"""A served model's codec files, found by the model's name: what ``get_codec("cachegen", ...)`` needs.

The cachegen levels meet their size/quality goals only with the served model's query profile
(rounding.py) and layer predictor (predict.py). They belong to the model, not to a chunk, so they are
kept per model in a *model-files folder*::

    <root>/<model key>/query_profile.npz            QueryProfile.save   (kvmesh.engine.profile)
    <root>/<model key>/layer_predictor.npz          LayerPredictor.save, fitted for the default level
    <root>/<model key>/layer_predictor-<level>.npz  optional: fitted for that level (e.g. -hq)
    <root>/<model key>/levels-<level>.json          optional: the model's own level counts per layer
                                                    for that level, and how many of a partial chunk's
                                                    last tokens to keep at 8 bits (levels.save_schedule;
                                                    the recipe writes -default and -hq)

``<model key>`` is the model's name with every character outside ``[A-Za-z0-9._-]`` replaced by
``--`` ("HuggingFaceTB/SmolLM2-135M-Instruct" -> "HuggingFaceTB--SmolLM2-135M-Instruct"). Roots are
searched in order: the ``roots`` argument, else ``$KVMESH_MODEL_FILES`` (os.pathsep-separated), then
the cache folder ``$KVMESH_CACHE_DIR/model-files`` (default ``~/.cache/kvmesh/model-files``), where
the engine writes the files it makes once. The files are too large to ship in the package (the
SmolLM2-135M predictor is ~21 MB of fp32 weights), so they are made from the model, once.

    opts = codec_options("HuggingFaceTB/SmolLM2-135M-Instruct", "cachegen")  # {} when none exist
    codec = get_codec("cachegen", **opts)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmesh.codecs.cachegen.levels import read_schedule, save_schedule
from kvmesh.codecs.cachegen.predict import LayerPredictor
from kvmesh.codecs.cachegen.rounding import QueryProfile
from kvmesh.codecs.errors import CodecError

ENV_MODEL_FILES = "KVMESH_MODEL_FILES"
PROFILE_FILE = "query_profile.npz"
PREDICTOR_FILE = "layer_predictor.npz"
# method -> the level whose predictor fit it prefers (any predictor decodes with any level: the
# container names the predictor it was coded with; a level's own fit just expects its own noise)
_METHOD_LEVEL = {"cachegen": "default", "cachegen-hq": "hq", "cachegen-compact": "compact"}


def model_key(model: str) -> str:
    """The folder name of a model's files (a Hugging Face id or any name; never a path)."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "--", model.strip())
    if not key.strip(".-") or key in (".", ".."):
        raise CodecError(f"model name {model!r} gives no folder name: use letters, digits, '.', '_', '-' or '/'")
    return key


def default_roots() -> list[Path]:
    """$KVMESH_MODEL_FILES's folders, then the cache folder."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_MODEL_FILES, "").split(os.pathsep) if p.strip()]
    cache = os.environ.get("KVMESH_CACHE_DIR")
    roots.append((Path(cache).expanduser() if cache else Path.home() / ".cache" / "kvmesh") / "model-files")
    return roots


def model_folder(model: str, root: str | os.PathLike | None = None) -> Path:
    """Where a model's files are written: ``<root or the cache folder>/<model key>``."""
    base = Path(root).expanduser() if root is not None else default_roots()[-1]
    return base / model_key(model)


@dataclass(frozen=True)
class ModelFiles:
    """The files found for one model (either may be missing)."""

    model: str
    folder: Path
    key_profile: Path | None
    predictors: dict[str, Path]  # level name ("default", "hq", ...) -> file
    schedules: dict[str, Path]  # level name -> levels-<level>.json

    def predictor_for(self, method: str) -> Path | None:
        """The method's level's own predictor, else the default level's."""
        level = _METHOD_LEVEL.get(method, "default")
        return self.predictors.get(level) or self.predictors.get("default")

    def codec_options(self, method: str = "cachegen") -> dict[str, object]:
        """get_codec's keyword options for a cachegen method: key_profile and predictor, loaded."""
        if method not in _METHOD_LEVEL:
            raise CodecError(f"model files are for the cachegen methods ({', '.join(_METHOD_LEVEL)}), not {method!r}")
        opts: dict[str, object] = {}
        if self.key_profile is not None:
            opts["key_profile"] = QueryProfile.load(self.key_profile)
        predictor = self.predictor_for(method)
        if predictor is not None:
            opts["predictor"] = LayerPredictor.load(predictor)
        schedule = self.schedules.get(_METHOD_LEVEL[method])
        if schedule is not None:  # only the method's own level's: a schedule is tuned for one level
            _, keys, values, tail = read_schedule(schedule)
            opts["schedule"] = (keys, values) if tail is None else (keys, values, tail)
        return opts


def _scan(model: str, folder: Path) -> ModelFiles | None:
    profile = folder / PROFILE_FILE
    predictors = {}
    if (folder / PREDICTOR_FILE).is_file():
        predictors["default"] = folder / PREDICTOR_FILE
    for path in sorted(folder.glob("layer_predictor-*.npz")):
        predictors[path.stem.removeprefix("layer_predictor-")] = path
    schedules = {path.stem.removeprefix("levels-"): path for path in sorted(folder.glob("levels-*.json"))}
    if not profile.is_file() and not predictors and not schedules:
        return None
    return ModelFiles(model, folder, profile if profile.is_file() else None, predictors, schedules)


def find_model_files(model: str, roots: list[str | os.PathLike] | None = None) -> ModelFiles | None:
    """The first folder, over the roots in order, holding any of the model's files; None if none does."""
    key = model_key(model)
    for root in ([Path(r).expanduser() for r in roots] if roots is not None else default_roots()):
        found = _scan(model, root / key)
        if found is not None:
            return found
    return None


def codec_options(model: str, method: str = "cachegen", roots: list[str | os.PathLike] | None = None
                  ) -> dict[str, object]:
    """get_codec's options for ``method`` with the model's files ({} when the model has none: the
    codec then runs without them, at a lower ratio)."""
    if method not in _METHOD_LEVEL:
        return {}
    found = find_model_files(model, roots)
    return found.codec_options(method) if found is not None else {}


def save_model_files(model: str, key_profile: QueryProfile | None = None,
                     predictors: dict[str, LayerPredictor] | None = None,
                     root: str | os.PathLike | None = None,
                     schedules: dict[str, tuple[list[int], list[int]] | tuple[list[int], list[int], int]]
                     | None = None) -> ModelFiles:
    """Writes a model's files (atomically, each) into ``model_folder(model, root)``; predictors and
    schedules ((key counts, value counts) per layer, optionally then the tail tokens: Level.tail_for) by
    level name ("default" is layer_predictor.npz).
    Returns what find_model_files then finds there."""
    folder = model_folder(model, root)
    if key_profile is not None:
        key_profile.save(folder / PROFILE_FILE)
    for level, predictor in (predictors or {}).items():
        if level != "default" and level not in {v for v in _METHOD_LEVEL.values()}:
            raise CodecError(f"unknown level {level!r} for a layer predictor; levels: {', '.join(_METHOD_LEVEL.values())}")
        predictor.save(folder / (PREDICTOR_FILE if level == "default" else f"layer_predictor-{level}.npz"))
    for level, schedule in (schedules or {}).items():
        if level not in _METHOD_LEVEL.values():
            raise CodecError(f"unknown level {level!r} for a schedule; levels: {', '.join(_METHOD_LEVEL.values())}")
        save_schedule(folder / f"levels-{level}.json", level, *schedule)
    found = _scan(model, folder)
    if found is None:
        raise CodecError("save_model_files needs a query profile, a layer predictor or a schedule")
    return found
