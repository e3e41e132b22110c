"""Regenerate the Python code beside the .proto files: ``python scripts/gen_protos.py``.

Writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to each proto under
``protos/kvmesh/api``. ``--check`` regenerates into a temporary folder and exits 1 when the
committed files differ (the test suite runs it too).
"""
from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "kvmesh" / "api").rglob("*.proto"))


def _include_dirs() -> list[str]:
    from grpc_tools import protoc  # noqa: F401  (imported for its bundled well-known protos)

    dirs = [str(PROTO_ROOT), str(importlib.resources.files("grpc_tools") / "_proto")]
    import google.api

    api_dir = Path(next(iter(google.api.__path__)))
    dirs.append(str(api_dir.parent.parent))
    return dirs


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def generated_files(base: Path) -> list[Path]:
    return sorted(
        p.relative_to(base)
        for p in (base / "kvmesh" / "api").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> list[str]:
    """Names of generated files that differ from a fresh generation (empty when up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want = generated_files(fresh)
        have = generated_files(PROTO_ROOT)
        stale = sorted(set(map(str, want)) ^ set(map(str, have)))
        for rel in want:
            if rel in have and not filecmp.cmp(fresh / rel, PROTO_ROOT / rel, shallow=False):
                stale.append(str(rel))
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale generated files")
    args = parser.parse_args()
    if args.check:
        stale = check()
        if stale:
            print("stale generated files (run python scripts/gen_protos.py):", *stale, sep="\n  ")
            return 1
        print("generated code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for rel in generated_files(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, PROTO_ROOT / rel)
    for pkg in {p.parent for p in proto_files()} | {PROTO_ROOT / "kvmesh", PROTO_ROOT / "kvmesh" / "api"}:
        for d in [pkg, *pkg.parents]:
            if d == PROTO_ROOT:
                break
            (d / "__init__.py").touch()
    print(f"generated code for {len(proto_files())} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
