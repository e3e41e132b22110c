"""``kvmesh compress --wait``: answers, then follows the event with a progress bar to its end."""
from __future__ import annotations

import json
import subprocess

from tests.controller.harness import ControllerThread
from tests.support import console_script

from .conftest import make_kv, method_under_test


def test_compress_and_decompress_wait(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _, client = start_agent("lmcache_default_instance", chunk_size=8)
    tokens = list(range(30))
    client.put(tokens, make_kv(30, layers=2, channels=32, seed=40))
    base = [console_script("kvmesh"), "--controller", controller.grpc_target]
    p = subprocess.run([*base, "compress", "--method", method_under_test(), "--tokens",
                        ",".join(map(str, tokens)), "--wait"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    event = json.loads(p.stdout)
    assert event["status"] == "COMPLETED" and event["chunks_done"] == 4 and event["num_tokens"] == 30
    # Not a terminal: one progress line per update, the last one complete.
    lines = p.stderr.strip().splitlines()
    assert len(lines) >= 2 and all("chunks" in line for line in lines)
    assert lines[-1].startswith("[" + "#" * 30 + "] 4/4 chunks") and lines[-1].endswith("COMPLETED")
    p = subprocess.run([*base, "decompress", "--tokens-file", "-", "--wait", "--quiet"],
                       input=json.dumps({"tokens": tokens}), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == "COMPLETED" and p.stderr == ""
    assert client.location_stats().num_encoded == 0
