"""``kvmesh``: a command-line client for every controller operation, over gRPC.

``events`` and ``workers`` print tables and ``event`` a summary, for people (``--json`` for the
gateway's JSON); the other commands print JSON. Byte counts are numbers (JSON) or sizes with units
(tables), and a ratio is shown only for a compress, where it means something. Errors are JSON on
stderr with a non-zero exit. ``compress``/``decompress --wait`` follow the event with a progress bar on
stderr and exit 1 when the event does not complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc
from google.protobuf import descriptor
from google.protobuf import message as pb_message

from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.core.channels import channel as mesh_channel
from kvmesh.core.security import SecuritySettings

from .gateway import message_to_json

DEFAULT_INSTANCE = "lmcache_default_instance"
DEFAULT_LOCATION = "LocalCPUBackend"
_TERMINAL = {common_pb2.COMPLETED, common_pb2.FAILED, common_pb2.CANCELLED}


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def parse_tokens(text: str) -> list[int]:
    """Tokens from ``1,2,3`` / ``1 2 3``, a JSON list, or a JSON object with a ``tokens`` list (``/tokenize``)."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"tokens are not valid JSON: {err}") from None
        if isinstance(data, dict):
            data = data.get("tokens")
        if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
            raise UsageError("tokens JSON must be a list of integers (or an object with one under \"tokens\")")
        return data
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise UsageError(f"tokens must be integers: {err}") from None


def _tokens(args: argparse.Namespace, required: bool = True) -> list[int]:
    if args.tokens is not None and args.tokens_file is not None:
        raise UsageError("give --tokens or --tokens-file, not both")
    if args.tokens is not None:
        return parse_tokens(args.tokens)
    if args.tokens_file is not None:
        if args.tokens_file == "-":
            return parse_tokens(sys.stdin.read())
        try:
            with open(args.tokens_file, encoding="utf-8") as f:
                return parse_tokens(f.read())
        except OSError as err:
            raise UsageError(f"cannot read {args.tokens_file}: {err}") from None
    if required:
        raise UsageError("tokens are required: --tokens 1,2,3, --tokens-file FILE, or --tokens-file - (stdin JSON)")
    return []


def _position(text: str, name: str) -> list[str]:
    instance, sep, location = text.rpartition(":")
    if not sep or not instance or not location:
        raise UsageError(f"{name} must be INSTANCE_ID:LOCATION, got {text!r}")
    return [instance, location]


class ProgressBar:
    """Event progress on ``out``: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self._out = out
        self._tty = out.isatty()
        self._width = width

    def update(self, ev: common_pb2.Event) -> None:
        total = ev.chunks_total
        frac = ev.chunks_done / total if total else (1.0 if ev.status in _TERMINAL else 0.0)
        filled = int(round(frac * self._width))
        bar = "#" * filled + "." * (self._width - filled)
        line = (f"[{bar}] {ev.chunks_done}/{total} chunks, {size_change(ev)} "
                f"{common_pb2.EventStatus.Name(ev.status)}")
        if self._tty:
            self._out.write("\r\033[K" + line)
            if ev.status in _TERMINAL:
                self._out.write("\n")
        else:
            self._out.write(line + "\n")
        self._out.flush()


# ---- output for people: sizes, ratios, ages, tables ------------------------------------------------

_INT64_TYPES = frozenset({descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64})


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def size_change(ev: common_pb2.Event) -> str:
    """``253.4 KiB -> 31.3 KiB (8.1x smaller)``: the ratio only for a compress, where it means one."""
    if not ev.bytes_before and not ev.bytes_after:
        return "-"
    text = f"{human_bytes(ev.bytes_before)} -> {human_bytes(ev.bytes_after)}"
    if ev.operation == common_pb2.COMPRESS and ev.bytes_after:
        text += f" ({ev.bytes_before / ev.bytes_after:.1f}x smaller)"
    return text


def age(unix_seconds: float, now: float | None = None) -> str:
    """How long ago: ``4s ago``, ``12m ago``, ``3h ago``, ``2d ago`` (``-`` for an unset time)."""
    if unix_seconds <= 0:
        return "-"
    secs = max(0.0, (time.time() if now is None else now) - unix_seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in ``right`` aligned right."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), *(line(r) for r in rows)])


def _shorten(text: str, width: int = 60) -> str:
    """One line of at most ``width`` characters (a table cell)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def events_table(events: Sequence[common_pb2.Event], now: float | None = None) -> str:
    """``kvmesh events``: one row per event, newest first as the controller lists them."""
    if not events:
        return "no events"
    rows = []
    for ev in events:
        target = f" -> {ev.target_instance_id}:{ev.target_location}" if ev.operation == common_pb2.MOVE else ""
        rows.append([ev.event_id, common_pb2.Operation.Name(ev.operation), common_pb2.EventStatus.Name(ev.status),
                     ev.instance_id, ev.method or "-", (ev.location or "-") + target, str(ev.num_tokens),
                     f"{ev.chunks_done}/{ev.chunks_total}", size_change(ev), age(ev.created_time, now),
                     _shorten(ev.error) if ev.error else ""])
    return format_table(["EVENT", "OPERATION", "STATUS", "INSTANCE", "METHOD", "LOCATION", "TOKENS", "CHUNKS",
                         "SIZE", "CREATED", "ERROR"], rows, right=frozenset({6, 7}))


def workers_table(workers: Sequence[pb.WorkerInfo], now: float | None = None) -> str:
    """``kvmesh workers``: one row per registered worker."""
    if not workers:
        return "no workers registered"
    rows = [[w.instance_id, str(w.worker_id), f"{w.ip}:{w.port}", w.state, str(w.chunk_size),
             ",".join(w.methods), ",".join(w.locations), age(w.last_heartbeat_time, now)] for w in workers]
    return format_table(["INSTANCE", "WORKER", "ADDRESS", "STATE", "CHUNK", "METHODS", "LOCATIONS",
                         "LAST HEARTBEAT"], rows, right=frozenset({1, 4}))


def event_summary(ev: common_pb2.Event, now: float | None = None) -> str:
    """``kvmesh event ID``: the event as labelled lines."""
    where = f"{ev.instance_id} / {ev.location}" if ev.location else ev.instance_id
    if ev.operation == common_pb2.MOVE:
        where += f" -> {ev.target_instance_id} / {ev.target_location}"
    lines = [("event", ev.event_id),
             ("operation", common_pb2.Operation.Name(ev.operation) + (f" ({ev.method})" if ev.method else "")),
             ("where", where),
             ("status", common_pb2.EventStatus.Name(ev.status)),
             ("tokens", f"{ev.num_tokens} ({ev.chunks_done}/{ev.chunks_total} chunks done)"),
             ("size", size_change(ev))]
    if ev.finished_time and ev.created_time:
        lines.append(("took", f"{ev.finished_time - ev.created_time:.2f} s (created {age(ev.created_time, now)})"))
    else:
        lines.append(("created", age(ev.created_time, now)))
    for w in ev.workers:
        lines.append((f"worker {w.worker_id}", f"{common_pb2.EventStatus.Name(w.status)}, "
                      f"{w.chunks_done}/{w.chunks_total} chunks" + (f": {w.error}" if w.error else "")))
    if ev.error:
        lines.append(("error", ev.error))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines)


def _int64_numbers(desc: descriptor.Descriptor, obj: dict[str, Any]) -> None:
    """protobuf's JSON mapping writes 64-bit integers as strings; people and jq want numbers."""
    for field in desc.fields:
        if field.name not in obj:
            continue
        value = obj[field.name]
        if field.cpp_type in _INT64_TYPES:
            obj[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _int64_numbers(field.message_type, item)


def to_json(msg: pb_message.Message) -> dict[str, Any]:
    """The gateway's JSON of ``msg``, with 64-bit counts as numbers."""
    out = message_to_json(msg)
    _int64_numbers(msg.DESCRIPTOR, out)
    return out


def _emit(msg: pb_message.Message) -> None:
    print(json.dumps(to_json(msg), indent=2))


def watch(stub: controller_pb2_grpc.ControllerStub, event_id: str, timeout: float | None,
          bar: ProgressBar | None) -> common_pb2.Event:
    """Follow an event to its end; the last state seen."""
    last = common_pb2.Event()
    for update in stub.WatchEvent(pb.WatchEventRequest(event_id=event_id), timeout=timeout):
        last = update.event
        if bar is not None:
            bar.update(last)
    return last


def _run(args: argparse.Namespace, stub: controller_pb2_grpc.ControllerStub) -> int:
    t = args.timeout
    cmd = args.command
    if cmd in ("compress", "decompress"):
        req_cls, call = ((pb.CompressRequest, stub.Compress) if cmd == "compress"
                         else (pb.DecompressRequest, stub.Decompress))
        resp = call(req_cls(instance_id=args.instance_id, method=args.method, location=args.location,
                            tokens=_tokens(args)), timeout=t)
        if not args.wait:
            _emit(resp)
            return 0
        bar = None if args.quiet else ProgressBar(sys.stderr)
        ev = watch(stub, resp.event_id, args.wait_timeout, bar)
        _emit(ev)
        return 0 if ev.status == common_pb2.COMPLETED else 1
    simple: dict[str, Callable[[], object]] = {
        "lookup": lambda: stub.Lookup(pb.LookupRequest(tokens=_tokens(args)), timeout=t),
        "clear": lambda: stub.Clear(pb.ClearRequest(instance_id=args.instance_id, location=args.location,
                                                    tokens=_tokens(args, required=False)), timeout=t),
        "pin": lambda: stub.Pin(pb.PinRequest(instance_id=args.instance_id, location=args.location,
                                              tokens=_tokens(args)), timeout=t),
        "unpin": lambda: stub.Unpin(pb.UnpinRequest(instance_id=args.instance_id, location=args.location,
                                                    tokens=_tokens(args)), timeout=t),
        "move": lambda: stub.Move(pb.MoveRequest(old_position=_position(args.source, "--from"),
                                                 new_position=_position(args.target, "--to"),
                                                 tokens=_tokens(args), copy=args.copy), timeout=t),
        "health": lambda: stub.Health(pb.HealthRequest(instance_id=args.instance_id), timeout=t),
        "check-finish": lambda: stub.CheckFinish(pb.CheckFinishRequest(event_id=args.event_id), timeout=t),
        "workers": lambda: stub.QueryWorkerInfo(pb.QueryWorkerInfoRequest(
            instance_id=args.instance_id, worker_ids=args.worker_ids or []), timeout=t),
        "instance": lambda: stub.QueryInstance(pb.QueryInstanceRequest(ip=args.ip), timeout=t),
        "event": lambda: stub.GetEvent(pb.GetEventRequest(event_id=args.event_id), timeout=t),
        "events": lambda: stub.ListEvents(pb.ListEventsRequest(limit=args.limit, instance_id=args.instance_id),
                                          timeout=t),
    }
    if cmd == "watch":
        bar = None if args.quiet else ProgressBar(sys.stderr)
        for update in stub.WatchEvent(pb.WatchEventRequest(event_id=args.event_id), timeout=args.wait_timeout):
            if bar is not None:
                bar.update(update.event)
            if args.ndjson:
                print(json.dumps(to_json(update)), flush=True)
            last = update.event
        if not args.ndjson:
            _emit(last)
        return 0 if last.status == common_pb2.COMPLETED else 1
    resp = simple[cmd]()
    if getattr(args, "json", False) or cmd not in _HUMAN:
        _emit(resp)  # type: ignore[arg-type]
    else:
        print(_HUMAN[cmd](resp))
    return 0


# Commands whose default output is for people (``--json`` for JSON).
_HUMAN: dict[str, Callable[[Any], str]] = {
    "events": lambda resp: events_table(resp.events),
    "workers": lambda resp: workers_table(resp.worker_infos),
    "event": lambda resp: event_summary(resp.event),
}


_DESCRIPTION = """\
kvmesh: a command-line client for every controller operation, over gRPC.

events and workers print tables, event a summary (--json for JSON); the other commands print JSON."""
_EPILOG = """\
examples:
  kvmesh compress --tokens 128000,849,21435 --wait    compress those tokens' KV cache, with progress
  kvmesh decompress --tokens-file prompt.json --wait  tokens from a JSON list or /tokenize's answer
  kvmesh events --limit 5                             the five newest events
  kvmesh event Compress6f0c...                        one event in full
  kvmesh workers                                      every registered worker"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmesh", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", default="localhost:9001", help="controller gRPC address (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds (default: %(default)s)")
    SecuritySettings.add_arguments(p, server=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def tokens(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tokens", help="token ids: 1,2,3 or a JSON list")
        sp.add_argument("--tokens-file", help="file with a JSON list (or /tokenize's answer); - reads stdin")

    def instance(sp: argparse.ArgumentParser, default: str = DEFAULT_INSTANCE) -> None:
        sp.add_argument("--instance-id", default=default, help="instance (default: %(default)s)")

    def location(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--location", default=DEFAULT_LOCATION, help="storage location (default: %(default)s)")

    def output(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print the gateway's JSON instead")

    def waiting(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--wait-timeout", type=float, default=None, help="give up watching after this many seconds")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, default_method in (("compress", "cachegen"), ("decompress", "")):
        sp = sub.add_parser(name, help=f"{name} the chunks of tokens (answers at once; --wait to follow)")
        instance(sp)
        location(sp)
        sp.add_argument("--method", default=default_method,
                        help="codec method (default: %(default)s)" if default_method
                        else "codec method (default: whichever compressed each chunk)")
        tokens(sp)
        sp.add_argument("--wait", action="store_true", help="follow the event to its end with a progress bar")
        waiting(sp)
    sp = sub.add_parser("lookup", help="which instances hold a prefix of tokens")
    tokens(sp)
    for name, helptext in (("clear", "drop chunks (all of the location without tokens)"),
                           ("pin", "pin chunks against eviction"), ("unpin", "unpin chunks")):
        sp = sub.add_parser(name, help=helptext)
        instance(sp)
        location(sp)
        tokens(sp)
    sp = sub.add_parser("move", help="move or copy chunks to another location or instance")
    sp.add_argument("--from", dest="source", required=True, metavar="INSTANCE:LOCATION")
    sp.add_argument("--to", dest="target", required=True, metavar="INSTANCE:LOCATION")
    sp.add_argument("--copy", action="store_true", help="keep the source chunks")
    tokens(sp)
    sp = sub.add_parser("health", help="health of every worker of an instance")
    instance(sp)
    sp = sub.add_parser("check-finish", help="an event's status (JSON)")
    sp.add_argument("event_id")
    sp = sub.add_parser("event", help="one event: what it did, its size before and after, per worker")
    sp.add_argument("event_id")
    output(sp)
    sp = sub.add_parser("watch", help="follow an event to its end")
    sp.add_argument("event_id")
    sp.add_argument("--ndjson", action="store_true", help="print every update as a JSON line")
    waiting(sp)
    sp = sub.add_parser("workers", help="registered workers, as a table")
    instance(sp, default="all")
    sp.add_argument("--worker-ids", type=lambda s: [int(x) for x in s.split(",") if x], help="e.g. 0,1")
    output(sp)
    sp = sub.add_parser("instance", help="the instance registered at an ip")
    sp.add_argument("--ip", required=True)
    sp = sub.add_parser("events", help="recent events, newest first, as a table")
    sp.add_argument("--limit", type=int, default=20, help="at most this many (default: %(default)s)")
    sp.add_argument("--instance-id", default="", help="only this instance's events")
    output(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        security = SecuritySettings.from_args(args)
    except ValueError as err:  # an unreadable token or TLS file
        print(json.dumps({"error": {"code": "USAGE", "message": str(err)}}), file=sys.stderr)
        return 2
    with mesh_channel(args.controller, security) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        try:
            return _run(args, stub)
        except UsageError as err:
            print(json.dumps({"error": {"code": "USAGE", "message": str(err)}}), file=sys.stderr)
            return 2
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            detail = err.details() if hasattr(err, "details") else str(err)
            print(json.dumps({"error": {"code": code.name, "message": detail}}), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
