"""Maps the repository's top-level folders into the ``kvmesh`` namespace.

``protos/kvmesh`` is the ``kvmesh`` package itself (it holds the generated ``kvmesh.api`` code);
``controller/``, ``instance_agent/``, ``codecs/`` and ``engine/`` become ``kvmesh.<folder>``.
Every sub-folder with an ``__init__.py`` is a sub-package, so new ones need no edit here.
"""
from pathlib import Path

from setuptools import Extension, setup

ROOTS = {
    "kvmesh": "protos/kvmesh",
    "kvmesh.controller": "controller",
    "kvmesh.instance_agent": "instance_agent",
    "kvmesh.codecs": "codecs",
    "kvmesh.engine": "engine",
    "kvmesh.core": "core",
}


def _packages() -> tuple[list[str], dict[str, str]]:
    here = Path(__file__).parent
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for name, folder in ROOTS.items():
        package_dir[name] = folder
        for init in sorted((here / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(here / folder)
            sub = ".".join((name, *rel.parts)) if rel.parts else name
            packages.append(sub)
    return packages, package_dir


# The compiled cachegen CPU path (codecs/cachegen/native.py loads it), split by stage in
# codecs/cachegen/csrc/ (ransc.h says which file holds what). Required: the CPU path has no other
# implementation, so an install without a C compiler fails here rather than at the first encode.
# -ffp-contract=off keeps the fp32 quantize and predict steps unfused, as FORMAT.md requires.
CSRC = "codecs/cachegen/csrc"
RANSC = Extension(
    "kvmesh.codecs.cachegen._ransc",
    sources=[f"{CSRC}/{name}.c" for name in ("common", "stats", "quantize", "predict", "rans", "sidecode", "module")],
    depends=[f"{CSRC}/ransc.h"],
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=False,
)

packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, ext_modules=[RANSC])
