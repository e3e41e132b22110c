"""The ``kvmesh`` command-line client against a real controller."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys

import pytest

from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.controller.cli import (ProgressBar, UsageError, age, build_parser, event_summary, events_table,
                                   human_bytes, main, parse_tokens, size_change, workers_table)
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
    base = [console_script("kvmesh"), "--controller", controller.grpc_target]
    p = subprocess.run([*base, "events"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "no events\n"
    p = subprocess.run([*base, "events", "--json"], capture_output=True, text=True, timeout=60)
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
    ev = common_pb2.Event(operation=common_pb2.COMPRESS, status=common_pb2.RUNNING, chunks_total=4, chunks_done=1,
                          bytes_before=100, bytes_after=25)
    bar.update(ev)
    ev.chunks_done, ev.status = 4, common_pb2.COMPLETED
    bar.update(ev)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert "1/4 chunks" in lines[0] and "100 B -> 25 B (4.0x smaller)" in lines[0] and lines[1].endswith("COMPLETED")
    assert lines[1].count("#") == 30


def test_sizes_and_ratios_read_as_people_say_them() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 259_584, 3 * 2**30)] == [
        "0 B", "1023 B", "1.5 KiB", "253.5 KiB", "3.0 GiB"]
    compress = common_pb2.Event(operation=common_pb2.COMPRESS, bytes_before=259_584, bytes_after=32_000)
    assert size_change(compress) == "253.5 KiB -> 31.2 KiB (8.1x smaller)"
    # A decompress grows the chunks back: a "ratio" below 1 would mean nothing to anyone.
    decompress = common_pb2.Event(operation=common_pb2.DECOMPRESS, bytes_before=32_000, bytes_after=259_584)
    assert size_change(decompress) == "31.2 KiB -> 253.5 KiB"
    assert size_change(common_pb2.Event(operation=common_pb2.CLEAR)) == "-"
    now = 1_000_000.0
    assert [age(t, now=now) for t in (0, now - 3.8, now - 150, now - 7300, now - 200_000)] == [
        "-", "3s ago", "2m ago", "2h ago", "2d ago"]


def test_events_table_lines_up_and_shows_ratios_only_for_compress() -> None:
    now = 10_000.0
    events = [
        common_pb2.Event(event_id="Decompress-b", operation=common_pb2.DECOMPRESS, status=common_pb2.COMPLETED,
                         instance_id="inst", method="cachegen", location="LocalCPUBackend", num_tokens=11,
                         chunks_total=1, chunks_done=1, bytes_before=32_000, bytes_after=259_584, created_time=now - 5),
        common_pb2.Event(event_id="Compress-a", operation=common_pb2.COMPRESS, status=common_pb2.COMPLETED,
                         instance_id="inst", method="cachegen", location="LocalCPUBackend", num_tokens=11,
                         chunks_total=1, chunks_done=1, bytes_before=259_584, bytes_after=32_000, created_time=now - 65),
        common_pb2.Event(event_id="Clear-c", operation=common_pb2.CLEAR, status=common_pb2.FAILED, instance_id="i2",
                         location="LocalDiskBackend", error="worker 0 of instance 'i2' is unreachable:\n  refused",
                         created_time=now - 1),
    ]
    lines = events_table(events, now=now).splitlines()
    assert lines[0].split() == ["EVENT", "OPERATION", "STATUS", "INSTANCE", "METHOD", "LOCATION", "TOKENS",
                                "CHUNKS", "SIZE", "CREATED", "ERROR"]
    assert len(lines) == 4
    # Every column starts at the same place on every line.
    for header in ("STATUS", "LOCATION", "SIZE", "CREATED"):
        col = lines[0].index(header)
        assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines[1:]), header
    assert "253.5 KiB -> 31.2 KiB (8.1x smaller)" in lines[2] and "1m ago" in lines[2]
    assert "31.2 KiB -> 253.5 KiB" in lines[1] and "x smaller" not in lines[1] and "x)" not in lines[1]
    assert lines[3].endswith("worker 0 of instance 'i2' is unreachable: refused")
    assert events_table([]) == "no events"
    long_error = events_table([common_pb2.Event(event_id="x", error="e" * 200)], now=now).splitlines()[1]
    assert long_error.endswith("e" * 59 + "…") and "e" * 60 not in long_error


def test_workers_table() -> None:
    workers = [pb.WorkerInfo(instance_id="lmcache_default_instance", worker_id=0, ip="127.0.0.1", port=8001,
                             state="up", chunk_size=256, methods=["cachegen", "int8"], locations=["LocalCPUBackend"],
                             last_heartbeat_time=99.0)]
    header, row = workers_table(workers, now=100.0).splitlines()
    assert header.split() == ["INSTANCE", "WORKER", "ADDRESS", "STATE", "CHUNK", "METHODS", "LOCATIONS", "LAST",
                              "HEARTBEAT"]
    assert row.split() == ["lmcache_default_instance", "0", "127.0.0.1:8001", "up", "256", "cachegen,int8",
                           "LocalCPUBackend", "1s", "ago"]
    assert workers_table([]) == "no workers registered"


def test_event_summary() -> None:
    ev = common_pb2.Event(event_id="Compress-a", operation=common_pb2.COMPRESS, status=common_pb2.COMPLETED,
                          instance_id="inst", method="cachegen", location="LocalCPUBackend", num_tokens=300,
                          chunks_total=2, chunks_done=2, bytes_before=2048, bytes_after=512, created_time=50.0,
                          finished_time=50.25, workers=[common_pb2.WorkerResult(
                              worker_id=0, status=common_pb2.COMPLETED, chunks_total=2, chunks_done=2)])
    text = event_summary(ev, now=60.0)
    assert text.splitlines() == [
        "event:     Compress-a",
        "operation: COMPRESS (cachegen)",
        "where:     inst / LocalCPUBackend",
        "status:    COMPLETED",
        "tokens:    300 (2/2 chunks done)",
        "size:      2.0 KiB -> 512 B (4.0x smaller)",
        "took:      0.25 s (created 10s ago)",
        "worker 0:  COMPLETED, 2/2 chunks",
    ]


def test_help_is_plain_text() -> None:
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    texts += [sp.format_help() for sp in sub.choices.values()]
    for text in texts:
        assert "``" not in text and "''" not in text and "%(" not in text, text
    assert "examples:" in texts[0] and "kvmesh events" in texts[0]


def test_cli_queries(controller: ControllerThread) -> None:
    controller.register("inst", 0, port=8001)
    p = kvmesh(controller, "workers", "--json")
    assert p.returncode == 0, p.stderr
    infos = json.loads(p.stdout)["worker_infos"]
    assert [(w["instance_id"], w["port"]) for w in infos] == [("inst", 8001)]
    p = kvmesh(controller, "workers")
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()
    assert header.startswith("INSTANCE") and row.split()[:4] == ["inst", "0", "127.0.0.1:8001", "up"]
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
    p = kvmesh(controller, "events", "--limit", "1", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["events"][0]["event_id"] == event_id
    p = kvmesh(controller, "events", "--limit", "1")
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()
    assert header.split()[:3] == ["EVENT", "OPERATION", "STATUS"] and row.split()[:2] == [event_id, "CLEAR"]
    p = kvmesh(controller, "event", event_id, "--json")
    event = json.loads(p.stdout)["event"]
    assert p.returncode == 0 and event["operation"] == "CLEAR"
    # 64-bit counts are JSON numbers here (protobuf's JSON mapping would make them strings).
    assert event["bytes_before"] == 0 and event["bytes_after"] == 0
    p = kvmesh(controller, "event", event_id)
    assert p.returncode == 0 and p.stdout.splitlines()[:2] == [f"event:     {event_id}", "operation: CLEAR"]
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
