"""The engine as the compose file and the cpu overlay run it: the real ``kvmesh-serve`` started through
the entrypoint with deploy/compose/lmcache.yaml and per-engine ``LMCACHE_<KEY>`` overrides (started by
the session's mesh fixture), registered with the real controller under its own instance id, its
/metrics carrying the agent's series that the `kvmesh-agent` scrape job and the dashboard expect."""
from __future__ import annotations

import pytest

from tests.deploy.mesh import ENGINE_ID, ENGINE_START_S, Mesh, http_json, poll, scrape
from tests.deploy.promql import Exported
from tests.support import wait_http_ok


@pytest.mark.slow
def test_engine_registers_under_its_env_identity_and_exports_agent_metrics(mesh: Mesh) -> None:
    engine = mesh.engine
    wait_http_ok(f"http://127.0.0.1:{engine.port}/health", timeout=ENGINE_START_S, proc=engine.proc)

    def registered() -> list[dict]:
        infos = http_json("POST", f"http://127.0.0.1:{mesh.http_port}/query_worker_info", {"instance_id": ENGINE_ID})
        return infos.get("worker_infos", [])

    (worker,) = poll("the engine's agent registers", registered, proc_logs=[engine.log])
    assert worker["ip"] == "127.0.0.1" and worker["port"] == engine.agent_port

    def connected_page() -> str | None:
        page = scrape(engine.port)
        return page if "kvmesh_agent_controller_connected 1.0" in page else None

    # The controller lists the worker as soon as RegisterWorker lands; the agent counts itself connected
    # only once its full KV resync has been accepted too, a moment later.
    text = poll("the agent reports itself connected", connected_page, proc_logs=[engine.log])
    exported = Exported()
    exported.add_exposition(text)
    # The agent's series and the engine's on one page: what the kvmesh-agent job scrapes on 8000.
    for name in ("kvmesh_agent_controller_connected", "kvmesh_agent_storage_capacity_bytes",
                 "kvmesh_agent_chunks_total", "kvmesh_engine_time_to_first_token_seconds_bucket",
                 "kvmesh_engine_prompt_tokens_total"):
        assert name in exported, f"{name} is not on the engine's /metrics"
