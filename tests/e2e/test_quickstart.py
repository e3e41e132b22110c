"""The README's main job, ``bash scripts/quickstart.sh``: starts both services, compresses and
decompresses a prompt's KV cache between completions, leaves them running, and ``stop`` ends them. Runs with free ports and a temporary run folder;
setup is skipped (the suite already runs inside the environment scripts/setup.sh made)."""
from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.engine.serving import served_model_files
from tests.support import REPO, free_port

pytestmark = pytest.mark.slow


def test_quickstart_runs_the_flow_and_leaves_services_running(tmp_path) -> None:  # noqa: ANN001
    ports = {"KVMESH_CONTROLLER_PORT": free_port(), "KVMESH_MONITOR_PORT": free_port(),
             "KVMESH_ENGINE_PORT": free_port(), "LMCACHE_LMCACHE_WORKER_PORTS": free_port(),
             "LMCACHE_P2P_INIT_PORTS": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "KVMESH_SKIP_SETUP": "1",
           "KVMESH_RUN_DIR": str(tmp_path / "run"),
           "KVMESH_MODEL_FILES": str(served_model_files().parent)}  # the suite's codec files, made once
    script = ["bash", str(REPO / "scripts" / "quickstart.sh")]
    try:
        proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        out = proc.stdout
        for n in range(1, 5):
            assert f"quickstart: [{n}/4]" in out
        assert "## 4. Decompress" in out and "DECOMPRESS COMPLETED" in out
        assert "same text all three times: yes" in out
        assert "bash scripts/quickstart.sh stop" in out
        # The bearer token: made once, readable by its owner only, and named (not shown) in the commands.
        token_file = tmp_path / "run" / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in out
        assert f'Authorization: Bearer $(cat {token_file})' in out
        # Still serving after the script returned.
        engine = f"http://localhost:{ports['KVMESH_ENGINE_PORT']}"
        with pytest.raises(urllib.error.HTTPError) as refused:  # the services run with the token on
            urllib.request.urlopen(f"{engine}/v1/models", timeout=10)
        assert refused.value.code == 401
        authorized = urllib.request.Request(f"{engine}/v1/models", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(authorized, timeout=10) as resp:
            assert resp.status == 200
        status = subprocess.run(script + ["status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and status.stdout.count("running (pid") == 2, status.stdout
        for name in ("engine", "controller"):
            assert (tmp_path / "run" / f"{name}.log").stat().st_size > 0
    finally:
        stop = subprocess.run(script + ["stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert "stopped engine" in stop.stdout and "stopped controller" in stop.stdout
    status = subprocess.run(script + ["status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "engine: not running" in status.stdout


def test_quickstart_fails_loudly_when_a_service_cannot_start(tmp_path) -> None:  # noqa: ANN001
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("chunk_size: not-a-number\n")
    env = {**os.environ, "KVMESH_SKIP_SETUP": "1", "KVMESH_RUN_DIR": str(tmp_path / "run"),
           "KVMESH_CONTROLLER_PORT": str(free_port()), "KVMESH_MONITOR_PORT": str(free_port()),
           "KVMESH_ENGINE_PORT": str(free_port()), "LMCACHE_CONFIG_FILE": str(bad_config)}
    script = ["bash", str(REPO / "scripts" / "quickstart.sh")]
    try:
        proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(script + ["stop"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "quickstart: FAILED: engine exited" in proc.stderr
    assert "chunk_size" in proc.stderr  # the log's tail says what was wrong
