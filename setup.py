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


# The compiled rANS coder of the cachegen CPU path (codecs/cachegen/native.py loads it). optional:
# without a C compiler the install still succeeds and the numpy coder runs instead. Integer math
# only; -ffp-contract=off keeps any future float expression unfused, as FORMAT.md requires.
RANSC = Extension(
    "kvmesh.codecs.cachegen._ransc",
    sources=["codecs/cachegen/_ransc.c"],
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=True,
)

packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, ext_modules=[RANSC])
