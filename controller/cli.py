"""``kvmesh``: a command-line client for every controller operation, over gRPC.

Prints JSON (the gateway's shape) on stdout; errors as JSON on stderr with a non-zero exit.
``compress``/``decompress --wait`` follow the event with a progress bar on stderr and exit 1 when
the event does not complete.

    kvmesh compress --tokens 128000,849,21435 --wait
    kvmesh lookup --tokens-file prompt.json
    kvmesh events --limit 5
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import grpc

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
        ratio = f" ({ev.bytes_before / ev.bytes_after:.2f}x)" if ev.bytes_after else ""
        line = (f"[{bar}] {ev.chunks_done}/{total} chunks {ev.bytes_before} -> {ev.bytes_after} bytes{ratio} "
                f"{common_pb2.EventStatus.Name(ev.status)}")
        if self._tty:
            self._out.write("\r\033[K" + line)
            if ev.status in _TERMINAL:
                self._out.write("\n")
        else:
            self._out.write(line + "\n")
        self._out.flush()


def _emit(msg: object) -> None:
    print(json.dumps(message_to_json(msg), indent=2))  # type: ignore[arg-type]


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
                print(json.dumps(message_to_json(update)), flush=True)
            last = update.event
        if not args.ndjson:
            _emit(last)
        return 0 if last.status == common_pb2.COMPLETED else 1
    _emit(simple[cmd]())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmesh", description=__doc__.splitlines()[0])
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

    def waiting(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--wait-timeout", type=float, default=None, help="give up watching after this many seconds")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, default_method in (("compress", "cachegen"), ("decompress", "")):
        sp = sub.add_parser(name, help=f"{name} the chunks of tokens (answers at once; --wait to follow)")
        instance(sp)
        location(sp)
        sp.add_argument("--method", default=default_method,
                        help="codec method (default: %(default)r" + (", any" if not default_method else "") + ")")
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
    for name, helptext in (("check-finish", "an event's status"), ("event", "the full event")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("event_id")
    sp = sub.add_parser("watch", help="follow an event to its end")
    sp.add_argument("event_id")
    sp.add_argument("--ndjson", action="store_true", help="print every update as a JSON line")
    waiting(sp)
    sp = sub.add_parser("workers", help="registered workers")
    instance(sp, default="all")
    sp.add_argument("--worker-ids", type=lambda s: [int(x) for x in s.split(",") if x], help="e.g. 0,1")
    sp = sub.add_parser("instance", help="the instance registered at an ip")
    sp.add_argument("--ip", required=True)
    sp = sub.add_parser("events", help="recent events, newest first")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--instance-id", default="")
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
