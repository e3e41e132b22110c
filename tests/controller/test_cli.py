"""The ``kvmesh`` command-line client against a real controller."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from kvmesh.api.common.v1 import common_pb2
from kvmesh.controller.cli import ProgressBar, UsageError, main, parse_tokens
from tests.support import console_script

from .harness import ControllerThread


def kvmesh(c: ControllerThread, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI's main in this process (real gRPC to the controller), capturing its streams."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(["--controller", c.grpc_target, *args])
            except SystemExit as exit_:  # argparse errors
                rc = int(exit_.code or 0)
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_console_script_runs(controller: ControllerThread) -> None:
    p = subprocess.run([console_script("kvmesh"), "--controller", controller.grpc_target, "events"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"events": []}


@pytest.mark.parametrize("text, tokens", [
    ("1,2,3", [1, 2, 3]),
    ("1 2\n3", [1, 2, 3]),
    ("[4, 5]", [4, 5]),
    ('{"count": 2, "tokens": [6, 7]}', [6, 7]),  # /tokenize's answer as is
    ("", []),
])
def test_parse_tokens(text: str, tokens: list[int]) -> None:
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["1,x", "[1.5]", "[true]", '{"tokens": "a"}', "[1,"])
def test_parse_tokens_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_tokens(text)


def test_progress_bar_without_a_terminal_prints_a_line_per_update() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    ev = common_pb2.Event(status=common_pb2.RUNNING, chunks_total=4, chunks_done=1, bytes_before=100, bytes_after=25)
    bar.update(ev)
    ev.chunks_done, ev.status = 4, common_pb2.COMPLETED
    bar.update(ev)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert "1/4 chunks" in lines[0] and "(4.00x)" in lines[0] and lines[1].endswith("COMPLETED")
    assert lines[1].count("#") == 30


def test_cli_queries(controller: ControllerThread) -> None:
    controller.register("inst", 0, port=8001)
    p = kvmesh(controller, "workers")
    assert p.returncode == 0, p.stderr
    infos = json.loads(p.stdout)["worker_infos"]
    assert [(w["instance_id"], w["port"]) for w in infos] == [("inst", 8001)]
    p = kvmesh(controller, "lookup", "--tokens-file", "-", stdin="[1, 2, 3]")
    assert p.returncode == 0 and json.loads(p.stdout)["layout_info"] == {}
    p = kvmesh(controller, "instance", "--ip", "127.0.0.1")
    assert p.returncode == 0 and json.loads(p.stdout)["res"] == "inst"
    p = kvmesh(controller, "compress", "--instance-id", "inst", "--method", "lossless")
    assert p.returncode == 2 and "tokens are required" in json.loads(p.stderr)["error"]["message"]
    p = kvmesh(controller, "clear", "--instance-id", "inst", "--location", "LocalCPUBackend", "--tokens", "")
    # An empty token list clears the whole location; the unreachable agent fails the event, not the call.
    assert p.returncode == 0, p.stderr
    event_id = json.loads(p.stdout)["event_id"]
    p = kvmesh(controller, "events", "--limit", "1")
    assert p.returncode == 0 and json.loads(p.stdout)["events"][0]["event_id"] == event_id
    p = kvmesh(controller, "event", event_id)
    assert p.returncode == 0 and json.loads(p.stdout)["event"]["operation"] == "CLEAR"
    p = kvmesh(controller, "check-finish", event_id)
    assert p.returncode == 0 and json.loads(p.stdout)["status"] in ("PENDING", "RUNNING", "FAILED")


def test_cli_errors_are_json_with_non_zero_exit(controller: ControllerThread) -> None:
    p = kvmesh(controller, "health", "--instance-id", "ghost")
    assert p.returncode == 1
    err = json.loads(p.stderr)["error"]
    assert err["code"] == "NOT_FOUND" and "ghost" in err["message"]
    p = kvmesh(controller, "lookup", "--tokens", "1,-2")
    assert p.returncode == 1 and json.loads(p.stderr)["error"]["code"] == "INVALID_ARGUMENT"
    p = kvmesh(controller, "move", "--from", "nocolon", "--to", "a:b", "--tokens", "1")
    assert p.returncode == 2 and "INSTANCE_ID:LOCATION" in p.stderr
