"""One task per bus: poll each device on its own interval, on the monotonic clock.

A bus is one TCP endpoint (a Modbus TCP device, or a TCP-to-RS-485 converter shared by
several unit ids) or one serial line (RS-485, Modbus RTU). The bus task owns reconnecting
(backoff with jitter); while the bus is down every due device still produces a poll with
quality ``no_connection``, so the platform sees the gap as data, not as silence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.readings import now_ms
from drivers.base import GOOD, ONLY_GOOD, QUALITY, PointResult
from drivers.modbus.driver import Block, ModbusBus, RetryBudget, plan_blocks

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusDevice


log = logging.getLogger(__name__)

PollSink = Callable[["ModbusDevice", int, list[PointResult]], None]
"""Receives (device, acquisition time in UTC ms, one result per point) after every poll."""

COMM_QUALITIES = frozenset({"timeout", "no_connection"})
UNANSWERED = frozenset({"timeout", "no_connection", "frame_error"})
"""Qualities of a point the device gave no usable answer for."""
CYCLE_SLACK_S = 0.002
"""Devices due within this much of the first due one are polled in the same cycle."""
BACKOFF_AFTER = 3
"""Consecutive failed polls after which a device is asked less often."""
BACKOFF_FIRST_S = 1.0
"""First pause (or the poll interval, if longer); it doubles with every further failure."""
BACKOFF_MAX_S = 60.0
"""Longest pause between two requests to a device that does not answer."""
UNSUPPORTED_RETRY_S = 600.0
"""A point the device rejected with exception 1 or 2 (quality ``unsupported``) is asked
again after this long; meanwhile its polls say so without a request (case 017)."""
HANDOVER_S = 0.005
"""Within a long cycle, polls are handed to the buffer at least this often."""
JOBS_MAX = 4
"""Most jobs (downlink commands: a write, a poll now) waiting for one bus; more are
refused with :class:`BusBusy`."""
STUCK_SLACK_S = 2.0
"""A poll counts as stuck once no request of it has ended for the longest device timeout
on its bus, any ``connect_pause``, and this much more (a busy gateway's scheduling)."""


class BusBusy(Exception):
    """The bus already has :data:`JOBS_MAX` jobs waiting."""


Job = Callable[["BusPoller"], Awaitable[Any]]
"""Work done on the bus between two polls (it may use :attr:`BusPoller.bus` freely)."""


@dataclass(eq=False)
class DeviceState:
    """Scheduling and health of one device on a bus. Compared by identity (a state is
    the running state of one device, never equal to another: ``in`` must not compare
    whole device configs, once per device and cycle)."""

    device: ModbusDevice
    blocks: list[Block]
    next_due: float = 0.0
    failing: bool = False
    failed_polls: int = 0
    bad_points: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    backoff: float = 0.0
    retry_at: float = 0.0
    last_quality: str = "timeout"
    unsupported: dict[str, tuple[float, PointResult]] = field(default_factory=dict)
    """Points the device rejected as unsupported: name → (retry time, last result)."""
    bridging: bool = True
    """False once the device refused a request spanning unused registers."""
    overruns: int = 0
    """Poll cycles of this device skipped because the previous poll ended after its next
    due time (the bus is busier than the poll intervals allow)."""
    answered: bool = True
    """Whether the device answered anything at its last poll: only then are failed
    requests retried (a device that stopped answering costs one timeout per poll)."""
    interval_override: tuple[float, float] | None = None
    """(poll interval s, until monotonic s) set by :meth:`BusPoller.set_interval`."""

    def interval(self, now: float) -> float:
        """The poll interval in force at monotonic time ``now`` (s)."""
        o = self.interval_override
        if o is not None and now < o[1]:
            return o[0]
        self.interval_override = None
        return self.device.poll_interval

    def __post_init__(self) -> None:
        self.addresses = {p.name: p.address for p in self.device.points}

    def replan(self) -> None:
        """Plan the requests again without the unsupported points (and without bridging
        gaps once the device refused that)."""
        dev = self.device
        points = [p for p in dev.points if p.name not in self.unsupported]
        self.blocks = plan_blocks(points, dev.max_gap if self.bridging else 0, dev.max_registers)


class BusPoller:
    """Polls every device of one bus.

    Args:
        name: bus name for logs (``tcp://host:port``).
        bus: the driver object.
        devices: devices on this bus.
        sink: called synchronously after each poll (must not block).
    """

    def __init__(
        self, name: str, bus: ModbusBus, devices: Sequence[ModbusDevice], sink: PollSink
    ) -> None:
        self.name = name
        self.bus = bus
        self.sink = sink
        now = time.monotonic()
        self.states = [
            DeviceState(d, plan_blocks(d.points, d.max_gap, d.max_registers), now) for d in devices
        ]
        self._next_connect = 0.0
        self._backoff = 1.0
        self._bus_down_logged = False
        self.on_cycle_end: Callable[[], None] = lambda: None
        """Called after each cycle of polls (the buffer writer commits then)."""
        self.busy_since: float | None = None
        """Monotonic time (s) the poll under way began; None between polls."""
        self.busy_device = ""
        """The device of the poll under way."""
        self._jobs: collections.deque[tuple[Job, asyncio.Future[Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self.stuck_after = (
            max(d.timeout for d in devices)
            + max(getattr(d, "connect_pause", 0.0) for d in devices)
            + STUCK_SLACK_S
        )
        """Seconds without an ended request, within a poll, after which :meth:`stuck`
        reports the bus (every request and connect is bounded by a device timeout)."""

    def stuck(self, now: float) -> str | None:
        """Why this bus makes no progress at monotonic time ``now`` (s), or None.

        Progress is any request that ended (a reply, an exception, a timeout) or a poll
        that began or ended; a driver stuck inside a read makes none, so after
        :attr:`stuck_after` seconds the answer names the bus and device. A bus waiting for
        its next poll is never stuck."""
        since = self.busy_since
        if since is None:
            return None
        idle = now - max(since, self.bus.progress_at)
        if idle <= self.stuck_after:
            return None
        return (
            f"bus {self.name}: the poll of {self.busy_device} has had no request end for "
            f"{idle:.0f} s (a device timeout is at most {self.stuck_after - STUCK_SLACK_S:g} s)"
        )

    def update(self, devices: Sequence[ModbusDevice]) -> None:
        """A config reload: poll these devices from now on, on the same bus connection.

        A device whose settings are unchanged keeps its state and its schedule (no gap in
        its poll timing); a new or changed one starts afresh, due at once (polled in the
        bus's next cycle). A device left out is not polled again; a poll of it already in
        progress still ends and reaches the sink.
        """
        now = time.monotonic()
        kept = {st.device.id: st for st in self.states}
        states = []
        for d in devices:
            st = kept.get(d.id)
            if st is None or st.device != d:
                st = DeviceState(d, plan_blocks(d.points, d.max_gap, d.max_registers), now)
            states.append(st)
        self.states = states
        self.stuck_after = (
            max(d.timeout for d in devices)
            + max(getattr(d, "connect_pause", 0.0) for d in devices)
            + STUCK_SLACK_S
        )

    def state_of(self, dev_id: str) -> DeviceState | None:
        """The state of device ``dev_id`` on this bus, or None."""
        return next((st for st in self.states if st.device.id == dev_id), None)

    def submit(self, job: Job) -> asyncio.Future[Any]:
        """Run ``job`` on this bus before its next poll (between two polls, so that a
        request never interleaves with a poll's); return the future of its result.

        Raises:
            BusBusy: :data:`JOBS_MAX` jobs already wait.
        """
        if len(self._jobs) >= JOBS_MAX:
            raise BusBusy(f"bus {self.name} already has {JOBS_MAX} commands waiting")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.append((job, fut))
        self._wake.set()
        return fut

    def set_interval(self, dev_id: str, interval: float, duration: float) -> bool:
        """Poll ``dev_id`` every ``interval`` seconds for the next ``duration`` seconds,
        then on its configured interval again (a restart or a reload that changes the
        device ends it too); False for a device not on this bus."""
        st = self.state_of(dev_id)
        if st is None:
            return False
        now = time.monotonic()
        st.interval_override = (interval, now + duration)
        st.next_due = min(st.next_due, now + interval)
        self._wake.set()
        return True

    async def ensure_connected(self) -> bool:
        """Connect the bus if it is down and its backoff allows; whether it is up."""
        return await self._ensure_connected()

    async def _run_jobs(self) -> None:
        while self._jobs:
            job, fut = self._jobs.popleft()
            if fut.done():  # its caller gave up
                continue
            self.busy_since, self.busy_device = time.monotonic(), "a command"
            try:
                result = await job(self)
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as exc:  # the job's own error, handed to its caller
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
            finally:
                self.busy_since = None
            self.on_cycle_end()

    async def _ensure_connected(self) -> bool:
        if self.bus.connected:
            return True
        now = time.monotonic()
        if now < self._next_connect:
            return False
        ok = await self.bus.connect()
        if ok:
            if self._bus_down_logged:
                log.info("bus %s: connected again", self.name)
            else:
                log.info("bus %s: connected", self.name)
            self._bus_down_logged = False
            self._backoff = 1.0
            return True
        if not self._bus_down_logged:
            why = f": {self.bus.last_error}" if self.bus.last_error else ""
            log.warning(
                "bus %s: cannot connect%s; retrying with backoff (devices: %s)",
                self.name,
                why,
                ", ".join(s.device.id for s in self.states),
            )
            self._bus_down_logged = True
        self._next_connect = now + random.uniform(0.5, 1.0) * self._backoff
        self._backoff = min(self._backoff * 2, 30.0)
        return False

    async def poll_once(self, st: DeviceState) -> list[PointResult]:
        """Poll one device now and hand the results to the sink.

        A device that failed :data:`BACKOFF_AFTER` polls in a row is asked less and less
        often (up to :data:`BACKOFF_MAX_S`): meanwhile its polls are published as bad
        quality without a request, so a dead meter does not take its timeout out of every
        cycle of the devices sharing its line.

        A request that fails with a timeout, CRC or frame error is sent again at once, up
        to the device's ``retries`` per poll, when the device answered its previous poll
        and the retry, run to its timeout, ends within the poll interval
        (:class:`drivers.modbus.driver.RetryBudget`): a noise burst costs no reading, and
        a device that stopped answering costs the others at most one retry once.
        """
        dev = st.device
        ts = now_ms()
        now = time.monotonic()
        self.busy_since, self.busy_device = now, dev.id
        try:
            results = await self._poll_results(st, now)
        finally:
            self.busy_since = None
        self._log_health(st, results)
        self.sink(dev, ts, results)
        return results

    async def _poll_results(self, st: DeviceState, now: float) -> list[PointResult]:
        dev = st.device
        if st.failing and now < st.retry_at:
            results = [
                PointResult(
                    p.name,
                    None,
                    st.last_quality,
                    f"not asked: no answer in the last {st.failed_polls} polls; next try "
                    f"in {st.retry_at - now:.0f}s",
                )
                for p in dev.points
            ]
        elif await self._ensure_connected():
            results = await self._read(st, now)
            self._schedule_retry(st, results)
        else:
            results = [
                PointResult(p.name, None, "no_connection", f"bus {self.name} is not connected")
                for p in dev.points
            ]
        return results

    async def _read(self, st: DeviceState, now: float) -> list[PointResult]:
        """Read a device, leaving out points it does not support until their retry time."""
        dev = st.device
        if any(t <= now for t, _ in st.unsupported.values()):
            st.unsupported = {n: v for n, v in st.unsupported.items() if v[0] > now}
            st.replan()
        retry = RetryBudget(dev.retries if st.answered else 0, now + dev.poll_interval)
        results = (
            await self.bus.read_device(dev.unit_id, st.blocks, dev.timeout, retry)
            if st.blocks
            else []
        )
        st.answered = not results or any(r.quality not in UNANSWERED for r in results)
        if st.bridging and any(
            b.count > sum(p.register_count for p in b.points) for b in self.bus.narrowed
        ):
            st.bridging = False
            st.replan()
            log.warning(
                "device %s (bus %s, unit %d) refuses requests that span unused registers; "
                "its points are read without bridging gaps from now on (max_gap: 0 says so "
                "in the config)",
                dev.id,
                self.name,
                dev.unit_id,
            )
        if "unsupported" in set(map(QUALITY, results)):
            every = f"asked again every {UNSUPPORTED_RETRY_S / 60:g} min"
            results = [
                PointResult(r.point, None, r.quality, f"{r.error}; {every}", r.exception_code)
                if r.quality == "unsupported"
                else r
                for r in results
            ]
            for r in results:
                if r.quality == "unsupported":
                    st.unsupported[r.point] = (now + UNSUPPORTED_RETRY_S, r)
            st.replan()
        if st.unsupported:
            asked = {r.point for r in results}
            results += [r for n, (_, r) in st.unsupported.items() if n not in asked]
        return results

    def _schedule_retry(self, st: DeviceState, results: list[PointResult]) -> None:
        if results and all(r.quality in COMM_QUALITIES for r in results):
            st.last_quality = results[0].quality
            if st.failed_polls + 1 >= BACKOFF_AFTER:
                first = max(st.device.poll_interval, BACKOFF_FIRST_S)
                st.backoff = min(max(st.backoff * 2, first), BACKOFF_MAX_S)
                st.retry_at = time.monotonic() + st.backoff
        else:
            st.backoff = 0.0
            st.retry_at = 0.0

    def _log_health(self, st: DeviceState, results: list[PointResult]) -> None:
        dev = st.device
        where = f"device {dev.id} (bus {self.name}, unit {dev.unit_id})"
        if results and all(r.quality in COMM_QUALITIES for r in results):
            st.failed_polls += 1
            if not st.failing:
                st.failing = True
                log.warning(
                    "%s: %s: %s; readings are published with bad quality until it answers again",
                    where,
                    results[0].quality,
                    results[0].error,
                )
            else:
                log.debug("%s: still failing (%d polls)", where, st.failed_polls)
            return
        if st.failing:
            log.info("%s: answering again after %d failed polls", where, st.failed_polls)
            st.failing = False
            st.failed_polls = 0
        if not st.bad_points and set(map(QUALITY, results)) <= ONLY_GOOD:
            return  # the common poll: nothing was bad, nothing is
        addresses = st.addresses
        for r in results:
            prev = st.bad_points.get(r.point)
            if r.quality == GOOD:
                if prev is not None:
                    log.info(
                        "%s point %s (address %d): good again", where, r.point, addresses[r.point]
                    )
                    del st.bad_points[r.point]
            elif prev != r.quality:
                st.bad_points[r.point] = r.quality
                log.warning(
                    "%s point %s (address %d): %s: %s",
                    where,
                    r.point,
                    addresses[r.point],
                    r.quality,
                    r.error,
                )

    async def run(self) -> None:
        """Poll until cancelled. Missed cycles are skipped, not bunched up.

        A cancellation is honoured even when a library swallowed it: pymodbus waits with
        ``asyncio.wait_for``, which on Python 3.11 loses a cancellation that arrives as the
        reply completes (the stop would then never end).
        """
        task = asyncio.current_task()
        assert task is not None
        try:
            while True:
                await self._run_jobs()
                first = min(s.next_due for s in self.states)
                delay = first - time.monotonic()
                if delay > 0:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    else:
                        continue  # a job, or a changed interval
                # one cycle: every device due now, then one hand-over (one transaction)
                horizon = time.monotonic() + CYCLE_SLACK_S
                handed = time.monotonic()
                for st in sorted(self.states, key=lambda s: s.next_due):
                    if st.next_due > horizon:
                        break
                    if st not in self.states:  # left out by a reload during this cycle
                        continue
                    await self.poll_once(st)
                    if task.cancelling():  # a library swallowed our cancellation
                        raise asyncio.CancelledError
                    if time.monotonic() - handed > HANDOVER_S:  # long cycles: keep latency low
                        self.on_cycle_end()
                        handed = time.monotonic()
                    now = time.monotonic()
                    interval = st.interval(now)
                    st.next_due += interval
                    if st.next_due <= now:
                        missed = int((now - st.next_due) // interval) + 1
                        st.next_due += missed * interval
                        st.overruns += missed
                    o = st.interval_override
                    if o is not None and st.next_due > o[1]:
                        st.next_due = max(o[1], now)  # back to the configured interval
                    if self._jobs:
                        await self._run_jobs()
                self.on_cycle_end()
        finally:
            for _, fut in self._jobs:
                fut.cancel()
            self._jobs.clear()
            self.bus.close()
