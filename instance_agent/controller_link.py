"""The agent's link to its controller: register, heartbeat, report admits/evictions, re-register.

One task owns the link. It never blocks the agent: every call has a deadline, failures back off
exponentially, and storage events wait in a queue. Whenever the link (re)connects — at start, after
the controller answered ``registered = false`` (it restarted), or after it was unreachable — the
agent registers again and resends its whole index (``full_resync``, in batches of at most
``MAX_EVENTS_PER_REPORT``), which also covers events that could not be delivered meanwhile.

RegisterWorker returns a secret that proves later calls come from this agent: heartbeats, reports
and deregistration carry it, and a re-registration presents it to keep it. A controller that is
slow to answer (a deadline passes) is not a controller that is gone: the link keeps its
registration and retries, and registers again only after ``SLOW_CONTROLLER_S`` of such failures.

Heartbeats go to the controller's heartbeat server when its RegisterWorker answer names one
(``heartbeat_port``, on the host this agent dials): there they are served on a thread of their own,
so that a controller busy with requests never turns this live worker down. With no such port (an
older controller), or when that port cannot be reached, they go to the controller's main address.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import TYPE_CHECKING

import grpc

from kvmesh.api.controller.v1 import controller_pb2, controller_pb2_grpc
from kvmesh.core.channels import aio_channel, channel

from .storage import ADMIT

if TYPE_CHECKING:
    from .agent import InstanceAgent

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
# The controller's default --max-kv-events-per-report; a full resync is sent in batches of it.
MAX_EVENTS_PER_REPORT = 50_000
# Deadlines missed in a row for this long: the controller counts as unreachable, register again.
SLOW_CONTROLLER_S = 30.0
# How a heartbeat port that cannot be reached answers: refused, or dropped until the deadline.
_UNREACHED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def heartbeat_target(controller_target: str, heartbeat_port: int) -> str:
    """Where heartbeats go: the controller's host with its heartbeat port, or its main address when
    it advertised none (0) or its address has no ``:port`` to replace."""
    head, sep, port = controller_target.rpartition(":")
    if heartbeat_port <= 0 or not sep or not port.isdigit() or not head:
        return controller_target
    return f"{head}:{heartbeat_port}"


class ControllerLink:
    def __init__(self, agent: InstanceAgent) -> None:
        from .lifecycle import GRPC_OPTIONS

        self.agent = agent
        self.target = agent.config.controller_pull_url or ""
        self.heartbeat_s = agent.config.lmcache_worker_heartbeat_time
        # A deadline shorter than the heartbeat keeps one slow call from delaying the next beat much.
        self.call_timeout_s = max(1.0, min(5.0, self.heartbeat_s))
        self.registered = False
        # True from the index snapshot of a registration on: events from then on are queued.
        self._collecting = False
        self._failing = False
        self.registrations = 0
        # This registration's secret (never logged); kept across re-registrations to renew it.
        self.secret = ""
        self._slow_since: float | None = None
        self._pending: list[controller_pb2.KVEvent] = []
        self._wake = asyncio.Event()
        self._grpc_options = GRPC_OPTIONS
        self._channel = aio_channel(self.target, agent.config.security, options=GRPC_OPTIONS)
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        # Where heartbeats go (the controller's heartbeat server, else its main address), and the
        # loop's channel there (None: the main channel).
        self.beat_target = self.target
        self._beat_channel: grpc.aio.Channel | None = None
        self._beat_stub = self._stub
        # Heartbeats also go out from a thread of their own, on a blocking channel: an agent whose event
        # loop is busy (hundreds of streams at once, a big tensor converted) is alive, and must not miss
        # its beats and be marked down by load. The loop's own beats stay: they notice a controller
        # that forgot this worker and register again.
        self._beats_stop = threading.Event()
        self._beats: threading.Thread | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvmesh-controller-link")
        self._beats = threading.Thread(target=self._beat_from_thread, name="kvmesh-heartbeats", daemon=True)
        self._beats.start()

    def _beat_from_thread(self) -> None:
        """Every heartbeat interval, while registered, a Heartbeat that needs nothing of the event loop."""
        from .lifecycle import GRPC_OPTIONS

        a = self.agent
        target = ""
        ch: grpc.Channel | None = None
        stub: controller_pb2_grpc.ControllerStub | None = None
        try:
            while not self._beats_stop.wait(self.heartbeat_s):
                secret = self.secret
                if not (self.registered and secret):
                    continue
                if self.beat_target != target or ch is None:  # (re)registered with another heartbeat port
                    if ch is not None:
                        ch.close()
                    target = self.beat_target
                    ch = channel(target, a.config.security, options=GRPC_OPTIONS)
                    stub = controller_pb2_grpc.ControllerStub(ch)
                assert stub is not None
                try:
                    stub.Heartbeat(controller_pb2.HeartbeatRequest(
                        instance_id=a.config.lmcache_instance_id, worker_id=a.worker_id, secret=secret),
                        # A beat a busy controller handles late still counts; one given up on never does.
                        timeout=max(self.call_timeout_s, 2 * self.heartbeat_s))
                except grpc.RpcError as err:  # the loop's link reports and handles failures
                    logger.debug("heartbeat to %s from the heartbeat thread failed: %s", target, err.code())
        finally:
            if ch is not None:
                ch.close()

    def enqueue(self, kind: str, location: str, key: str, token_end: int) -> None:
        """Queue a storage event for the controller (on the agent's loop)."""
        if not self._collecting:
            return  # the full resync of the next registration will carry it
        etype = controller_pb2.ADMIT if kind == ADMIT else controller_pb2.EVICT
        self._pending.append(controller_pb2.KVEvent(type=etype, location=location, chunk_key=key, token_end=token_end))
        self._wake.set()

    async def stop(self) -> None:
        self._beats_stop.set()
        if self._beats is not None:
            await asyncio.to_thread(self._beats.join, self.call_timeout_s + 1.0)
            self._beats = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.registered:
            try:
                await self._stub.DeregisterWorker(controller_pb2.DeregisterWorkerRequest(
                    instance_id=self.agent.config.lmcache_instance_id, worker_id=self.agent.worker_id,
                    secret=self.secret), timeout=2.0)
            except grpc.RpcError as err:
                logger.info("deregistering from %s failed (%s); the controller will time the worker out",
                            self.target, err.code())
        self._set_registered(False)
        await self._use_beat_target(self.target)
        await self._channel.close()

    def _set_registered(self, value: bool) -> None:
        self.registered = value
        self._slow_since = None
        if not value:
            self._collecting = False
        self.agent.metrics.controller_connected.set(1 if value else 0)

    def _registration(self) -> controller_pb2.RegisterWorkerRequest:
        a = self.agent
        peer_port = a.p2p_port or a.grpc_port
        return controller_pb2.RegisterWorkerRequest(
            instance_id=a.config.lmcache_instance_id, worker_id=a.worker_id, ip=a.host, port=a.grpc_port or 0,
            peer_init_url=f"{a.host}:{peer_port}", methods=a.codecs.available(), locations=list(a.locations),
            chunk_size=a.config.chunk_size, heartbeat_interval_seconds=self.heartbeat_s, secret=self.secret,
            model_files=a.model_files())

    async def _register(self) -> None:
        a = self.agent
        resp = await self._stub.RegisterWorker(self._registration(), timeout=self.call_timeout_s)
        self.secret = resp.secret
        await self._use_beat_target(heartbeat_target(self.target, resp.heartbeat_port))
        # Events queued before the snapshot are in it; those after it follow as increments.
        self._pending.clear()
        self._collecting = True
        events = [controller_pb2.KVEvent(type=controller_pb2.ADMIT, location=loc, chunk_key=key, token_end=end)
                  for loc, key, end in a.index_snapshot()]
        # The first batch replaces the controller's index; "more" says further batches follow.
        first = True
        while first or events:
            batch, events = events[:MAX_EVENTS_PER_REPORT], events[MAX_EVENTS_PER_REPORT:]
            await self._stub.ReportKVEvents(controller_pb2.ReportKVEventsRequest(
                instance_id=a.config.lmcache_instance_id, worker_id=a.worker_id, events=batch, full_resync=first,
                more=bool(events), secret=self.secret), timeout=max(self.call_timeout_s, 30.0))
            first = False
        self.registrations += 1
        self._failing = False
        self._set_registered(True)
        logger.info("registered with controller %s as %s/%d (%d chunks resent)", self.target,
                    a.config.lmcache_instance_id, a.worker_id, len(events))

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_EVENTS_PER_REPORT]
            await self._stub.ReportKVEvents(controller_pb2.ReportKVEventsRequest(
                instance_id=self.agent.config.lmcache_instance_id, worker_id=self.agent.worker_id, events=batch,
                secret=self.secret), timeout=self.call_timeout_s)
            del self._pending[:len(batch)]

    async def _use_beat_target(self, target: str) -> None:
        """Send heartbeats (the loop's and the thread's) to ``target`` from now on."""
        if target == self.beat_target:
            return
        old, self._beat_channel = self._beat_channel, None
        self._beat_stub = self._stub
        if target != self.target:
            self._beat_channel = aio_channel(target, self.agent.config.security, options=self._grpc_options)
            self._beat_stub = controller_pb2_grpc.ControllerStub(self._beat_channel)
        self.beat_target = target
        if old is not None:
            await old.close()

    async def _heartbeat(self) -> None:
        request = controller_pb2.HeartbeatRequest(
            instance_id=self.agent.config.lmcache_instance_id, worker_id=self.agent.worker_id, secret=self.secret)
        try:
            resp = await self._beat_stub.Heartbeat(request, timeout=self.call_timeout_s)
        except grpc.RpcError as err:
            if self.beat_target == self.target or err.code() not in _UNREACHED:
                raise
            # The heartbeat port cannot be reached (a firewall or a Service that does not forward it,
            # which drops rather than refuses: a deadline; a controller restarted on another port):
            # beat at the main address, which also tells whether this worker is still known.
            logger.warning("controller heartbeat server %s unreachable (%s); sending heartbeats to %s",
                           self.beat_target, err.details(), self.target)
            await self._use_beat_target(self.target)
            resp = await self._stub.Heartbeat(request, timeout=self.call_timeout_s)
        if not resp.registered:
            logger.warning("controller %s does not know this worker (it restarted?); registering again", self.target)
            self._set_registered(False)

    async def _run(self) -> None:
        backoff = 0.25
        next_beat = 0.0
        while True:
            try:
                if not self.registered:
                    await self._register()
                    backoff = 0.25
                    next_beat = time.monotonic() + self.heartbeat_s
                await self._flush()
                if time.monotonic() >= next_beat:
                    await self._heartbeat()
                    next_beat = time.monotonic() + self.heartbeat_s
                    if not self.registered:
                        continue
                self._slow_since = None
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as err:
                if self._still_registered_after(err):
                    # Retry soon: the next beat is due now, and unsent reports stay queued.
                    next_beat = 0.0
                    await asyncio.sleep(min(self.heartbeat_s, 1.0) * (0.5 + random.random()))
                    continue
                # One warning per streak of failures (a refusal, e.g. INVALID_ARGUMENT, always warns):
                # a controller that is down for an hour must not flood the log.
                refused = err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if self.registered or refused or not self._failing:
                    logger.warning("controller %s: %s (%s); retrying, and registering again when it answers",
                                   self.target, err.details(), err.code().name)
                else:
                    logger.debug("controller %s still unreachable: %s", self.target, err.code().name)
                self._failing = True
                self._set_registered(False)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception:  # a bug here must not kill the link for good
                logger.exception("controller link error; retrying")
                self._set_registered(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _still_registered_after(self, err: grpc.RpcError) -> bool:
        """True when ``err`` is a missed deadline of a registered link that has not lasted long.

        A controller whose loop is busy answers late; registering again would only add work (a full
        resync) to a controller that still knows this worker, and it does not count the stall as
        this worker's silence.
        """
        if not self.registered or err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return False
        now = time.monotonic()
        if self._slow_since is None:
            self._slow_since = now
            logger.warning("controller %s answers late (a deadline of %.1fs passed); keeping the registration "
                           "and retrying", self.target, self.call_timeout_s)
        return now - self._slow_since < SLOW_CONTROLLER_S
