"""The README's quick start on a fresh clone, as a newcomer runs it: ``git clone``, then
``bash scripts/quickstart.sh``, checked against what the README promises, then ``quickstart.sh stop``.

The clone is of the committed HEAD (commit first to test local changes). It is not entirely cold, to
stay within a few minutes: its ``.venv`` reuses this environment's packages (``KVMESH_BASE_VENV``: only
kvmesh itself is installed into it, its C coder compiled), the tools come from this checkout's
``.tools`` when they are there (``TOOLS_DIR``; else ``KVMESH_SKIP_TOOLS=1``), and the converted model
from the cache the other tests use (``KVMESH_CACHE_DIR``). Everything else runs as written: setup's
stages, the two services on their own ports, the walk-through, the README's gRPC snippet and CLI.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.serving import served_model_files
from tests.support import REPO, free_port

pytestmark = pytest.mark.slow

TOOLS = ("prometheus", "promtool", "redis-server", "redis-cli")


def readme_block(readme: str, after: str, lang: str = "") -> str:
    """The first fenced code block (of ``lang``) that follows the text ``after`` in the README."""
    start = readme.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(readme, start)
    assert match is not None, f"no ```{lang} block after {after!r} in README.md"
    return match.group(1)


def clone_env(clone: Path) -> dict[str, str]:
    ports = {"KVMESH_CONTROLLER_PORT": free_port(), "KVMESH_MONITOR_PORT": free_port(),
             "KVMESH_ENGINE_PORT": free_port(), "LMCACHE_LMCACHE_WORKER_PORTS": free_port(),
             "LMCACHE_P2P_INIT_PORTS": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "KVMESH_AUTH"))}
    env.update({k: str(v) for k, v in ports.items()})
    env["KVMESH_BASE_VENV"] = sys.prefix
    env["KVMESH_CACHE_DIR"] = os.environ.get("KVMESH_CACHE_DIR") or str(REPO / ".kvmesh-run" / "cache")
    env["KVMESH_MODEL_FILES"] = str(served_model_files().parent)  # the suite's, made once: setup finds them
    tools = REPO / ".tools"
    if all((tools / "bin" / t).exists() for t in TOOLS):
        env["TOOLS_DIR"] = str(tools.resolve())
    else:
        env["KVMESH_SKIP_TOOLS"] = "1"
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(sys.prefix))  # the clone's own .venv, not ours
    return env


def test_readme_quick_start_on_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "kvmesh"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = clone_env(clone)
    script = ["bash", "scripts/quickstart.sh"]
    readme = (clone / "README.md").read_text()
    # The README's first commands are the ones run here.
    quick = readme_block(readme, "## Quick start", "bash")
    assert "bash scripts/quickstart.sh" in quick and "bash scripts/test.sh" in quick
    try:
        proc = subprocess.run(script, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout
        assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

        # Visible progress: every stage of setup and of the quick start, in order.
        stages = (["quickstart: [1/4]"] + [f"setup: [{n}/7]" for n in range(1, 8)]
                  + [f"quickstart: [{n}/4]" for n in range(2, 5)])
        positions = [out.find(s) for s in stages]
        assert -1 not in positions and positions == sorted(positions), out[:3000]
        assert "setup: use it with  . .venv/bin/activate" in out

        # The summary the README shows: the same labels in the same order, the same greedy text thrice.
        promised = readme_block(readme, "It ends with:").strip().splitlines()
        summary = out[out.index("## Summary"):].splitlines()[:len(promised)]
        assert [line.split(":")[0] for line in summary] == [line.split(":")[0] for line in promised], summary
        texts = [re.match(r"[a-z ]+:\s+('.*?'|\".*?\")", line).group(1) for line in summary[1:4]]
        assert len(set(texts)) == 1, texts
        assert re.search(r"\(\d+ of \d+ prompt tokens from the compressed cache\)", summary[2])
        assert re.fullmatch(r"compress:\s+COMPRESS COMPLETED: 1/1 chunks, [\d.]+ KiB -> [\d.]+ KiB, [\d.]+x smaller",
                            summary[4]), summary[4]
        assert re.fullmatch(r"decompress:\s+DECOMPRESS COMPLETED: 1/1 chunks, [\d.]+ KiB -> [\d.]+ KiB, "
                            r"back to full size", summary[5]), summary[5]
        assert summary[6] == "same text all three times: yes"
        assert "bash scripts/quickstart.sh stop" in out

        # Inside the clone only: the token, owner-only; no tracked file changed, nothing unignored added.
        token = clone / ".kvmesh-run" / "token"
        assert token.stat().st_mode & 0o777 == 0o600
        status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True,
                                check=True)
        assert status.stdout == "", status.stdout

        # The README's gRPC snippet, with the interpreter it names, against the running controller.
        snippet = readme_block(readme, "## From a program", "python")
        assert "run this with `.venv/bin/python`" in readme
        snippet = snippet.replace("localhost:9001", f"localhost:{env['KVMESH_MONITOR_PORT']}")
        run = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", snippet], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert re.search(r"^COMPLETED 1/1 chunks \d+ -> \d+ bytes$", run.stdout, re.M), run.stdout

        # The README's CLI, by path.
        cli = subprocess.run([str(clone / ".venv" / "bin" / "kvmesh"), "--controller",
                              f"localhost:{env['KVMESH_MONITOR_PORT']}", "events"],
                             cwd=clone, env={**env, "KVMESH_AUTH_TOKEN_FILE": str(token)},
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        header, *rows = cli.stdout.splitlines()
        assert header.split()[:3] == ["EVENT", "OPERATION", "STATUS"]
        assert [r.split()[1] for r in rows[:3]] == ["COMPRESS", "DECOMPRESS", "COMPRESS"], cli.stdout
    finally:
        stop = subprocess.run(script + ["stop"], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert "stopped engine" in stop.stdout and "stopped controller" in stop.stdout
