"""Downlink commands: take requests in (bounded), judge them, run them at most once, answer.

The entry point of every format is :meth:`Commands.execute` (a request object in, a
response object out); :meth:`Commands.offer` is the MQTT intake of the native format
(``{prefix}/{gateway_id}/cmd/{name}``, ``docs/mqtt.md``, Commands).

Order of judgement (each refusal answered with its ``reason``, none of them runs anything):

1. unknown command, malformed request (:func:`agent.commands.parse.parse_request`);
2. an ``id`` already carried out: answered with the first response (``"duplicate":
   true``), whatever else is true of the request now (a QoS 1 redelivery, a retained
   request delivered again after a restart); one whose run never ended (the process
   stopped during it) is refused as ``interrupted``, never run again;
3. a retained request (RETAIN flag set on delivery: it was stored by the broker before
   this session subscribed, so its sender is not waiting for it now);
4. not in ``commands.allow`` (``ping`` is always allowed);
5. too old or from the future (:func:`agent.commands.parse.judge_age`);
6. the command's own checks against the config (device, point, limits, bounds).

Then its ``id`` is committed to the buffer's database before it runs, and its response
after: it runs at most once, even across a crash (ids are kept a day, at most
:data:`agent.buffer.COMMANDS_KEPT`).

Intake is bounded: a token bucket (``commands.rate``/``commands.burst``) and a queue of
:data:`QUEUE_MAX` requests, both checked in O(1) as each PUBLISH is read; what exceeds
them is dropped and counted (a ``commands_dropped`` notice at most every
:data:`DROP_REPORT_S`). One worker runs the requests one after another; a command that
uses a Modbus bus runs on the bus's own task between two polls
(:meth:`agent.poller.BusPoller.submit`), so polling keeps its timing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.buffer import BufferError
from agent.commands.parse import (
    ALARMS_MAX,
    CORRELATION_MAX,
    Refusal,
    Request,
    interval_args,
    judge_age,
    parse_request,
    request_id_of,
    response_topic_allowed,
    write_words,
)
from agent.contract import payloads
from agent.contract.telemetry import MAX_SAFE_INTEGER, telemetry_body
from agent.contract.topics import command_filter, command_name_of, command_response_topic
from agent.mqtt import Inbound
from agent.poller import BusBusy, BusPoller
from agent.readings import iso_ms, now_ms
from agent.supervise import where_raised
from drivers.base import PointResult
from drivers.kinds import is_modbus
from drivers.modbus.driver import Block, decode_point, describe_error
from drivers.modbus.line import ExceptionReply, FrameError

if TYPE_CHECKING:
    from agent.app import Agent
    from drivers.modbus.config import ModbusDevice, ModbusPoint

log = logging.getLogger(__name__)

QUEUE_MAX = 16
"""Requests waiting for the worker; more are dropped (``queue_full``). With the 64 KiB
packet limit (:data:`agent.mqtt.MAX_INBOUND_PACKET`) at most 1 MiB waits."""
DROP_REPORT_S = 60.0
"""Dropped requests are logged and sent as a notice at most this often."""
RUN_TIMEOUT_S = 30.0
"""Longest a command waits for its bus (or a reload) before it is answered ``failed``."""
STORE_TIMEOUT_S = 10.0
"""Longest the buffer's database may take to remember an id; slower: ``busy``, not run."""
REMEMBER_MS = 86_400_000
"""Ids are remembered this long (a day)."""

Action = Callable[[], Awaitable[dict[str, Any] | Refusal]]


def _json_number(value: Any) -> Any:
    """A read-back value as the telemetry sends it (a string beyond ±(2^53−1))."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INTEGER:
        return str(value)
    return value


class Commands:
    """The downlink commands of one :class:`agent.app.Agent`.

    Args:
        agent: the running agent (its config, pollers, alarms, reloader, buffer, link).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.prefix = agent.cfg.mqtt.topic_prefix
        self.gateway_id = agent.cfg.gateway_id
        self.topic_filter = command_filter(self.prefix, self.gateway_id)
        """What the MQTT link subscribes to."""
        self._queue: collections.deque[tuple[str, Inbound | tuple[dict[str, Any], str]]] = (
            collections.deque()
        )
        self._ready = asyncio.Event()
        self._tokens = float(agent.cfg.commands.burst)
        self._filled_at = time.monotonic()
        self._started = time.monotonic()
        self.dropped: collections.Counter[str] = collections.Counter()
        """Requests dropped at intake since the last report, by cause."""
        self.dropped_total = 0
        self.handled = 0
        """Requests answered (run or refused) since the start."""
        self.executed = 0
        """Requests run (not refused, not duplicates) since the start."""
        self._reported_at = -DROP_REPORT_S

    # -- intake (MQTT) ---------------------------------------------------------------------

    def offer(self, msg: Inbound) -> None:
        """A PUBLISH on the command filter (called as paho reads it; O(1), never blocks):
        queued, or dropped and counted when the rate or the queue is exceeded. A
        zero-length payload (the clearing of a retained request) is no request: ignored."""
        if not msg.payload:
            return
        name = command_name_of(msg.topic, self.prefix, self.gateway_id)
        if name is None:
            self._drop("bad_topic")
            return
        self._enqueue(name, msg)

    def offer_request(self, name: str, request: dict[str, Any], source: str) -> None:
        """A request a format decoded from its own command (a Sparkplug DCMD): queued under
        the same rate and queue bounds as :meth:`offer`, run by :meth:`execute` (so allowed,
        limited and at most once per ``id`` alike); its answer is the ``command`` notice
        (the format has no response message)."""
        self._enqueue(name, (request, source))

    def _enqueue(self, name: str, item: Inbound | tuple[dict[str, Any], str]) -> None:
        cfg = self.agent.cfg.commands
        now = time.monotonic()
        self._tokens = min(cfg.burst, self._tokens + (now - self._filled_at) * cfg.rate)
        self._filled_at = now
        if self._tokens < 1.0:
            self._drop("rate")
            return
        if len(self._queue) >= QUEUE_MAX:
            self._drop("queue_full")
            return
        self._tokens -= 1.0
        self._queue.append((name, item))
        self._ready.set()

    def _drop(self, cause: str) -> None:
        self.dropped[cause] += 1
        self.dropped_total += 1
        if time.monotonic() - self._reported_at >= DROP_REPORT_S:
            self._report_drops()

    def _report_drops(self) -> None:
        if not self.dropped:
            return
        self._reported_at = time.monotonic()
        counts, self.dropped = dict(self.dropped), collections.Counter()
        n = sum(counts.values())
        said = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        message = (
            f"dropped {n} command request(s) unread ({said}): more arrived than "
            "commands.rate/burst allow, or on a topic that names no command"
        )
        log.warning("%s", message)
        self.agent.notice("commands_dropped", message, count=n, reasons=counts)

    async def run(self) -> None:
        """Answer queued requests one after another, until cancelled."""
        while True:
            if not self._queue:
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DROP_REPORT_S):
                        await self._ready.wait()
                if time.monotonic() - self._reported_at >= DROP_REPORT_S:
                    self._report_drops()
                continue
            name, item = self._queue.popleft()
            if isinstance(item, tuple):
                request, source = item
                await self.execute(name, request, source)
            else:
                await self._answer_mqtt(name, item)

    async def _answer_mqtt(self, name: str, msg: Inbound) -> None:
        try:
            doc: Any = json.loads(msg.payload)
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            doc = None
        if doc is None:
            response = self._respond(name, None, Refusal("malformed", "not a JSON object"))
            self._report(name, response, "mqtt")
        else:
            response = await self.execute(name, doc, "mqtt", retained=msg.retain)
        topic = command_response_topic(self.prefix, self.gateway_id, name)
        if msg.response_topic is not None:
            if response_topic_allowed(msg.response_topic, topic):
                topic = msg.response_topic
            else:
                log.warning(
                    "command %s: Response Topic %r is not below %s: answered there instead "
                    "(docs/mqtt.md, Commands)",
                    name,
                    msg.response_topic[:120],
                    topic,
                )
        corr = msg.correlation
        if corr is not None and len(corr) > CORRELATION_MAX:
            corr = None
        if self.agent.link.connected.is_set():
            self.agent.link.publish(topic, payloads.dumps(response), qos=1, correlation=corr)

    # -- the format-independent entry point ------------------------------------------------

    async def execute(
        self, name: str, request: Any, source: str, retained: bool = False
    ) -> dict[str, Any]:
        """Judge and (at most once per ``id``) run one request of command ``name``;
        return the response object (``agent.contract.payloads.command_response``).

        Args:
            name: the command (``ping``, ``read``, ``ack``, ``set_interval``, ``write``,
                ``reload``; anything else is answered ``unknown_command``).
            request: the decoded request (a JSON object; anything else is ``malformed``).
            source: who sent it, for the log and the notice (``mqtt``, a format's name).
            retained: the request was delivered as a retained message.
        """
        try:
            response = await self._execute(name, request, retained)
        except Exception as exc:  # a bug: answered, logged with its place, never fatal
            log.critical("command %s failed: %s at %s", name, type(exc).__name__, where_raised(exc))
            response = self._respond(
                name, request_id_of(request), Refusal("failed", "the gateway failed to run it")
            )
        self._report(name, response, source)
        return response

    def refuse(
        self, name: str, request_id: str | None, refusal: Refusal, source: str
    ) -> dict[str, Any]:
        """A request a format refused before it could reach :meth:`execute` (its own
        envelope was wrong): answered, logged and sent as a notice as :meth:`execute`'s
        refusals are; return the response object."""
        response = self._respond(name, request_id, refusal)
        self._report(name, response, source)
        return response

    async def _execute(self, name: str, request: Any, retained: bool) -> dict[str, Any]:
        req = parse_request(name, request)
        if isinstance(req, Refusal):
            return self._respond(name, request_id_of(request), req)
        buffer = self.agent.buffer
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                seen = await buffer.command_seen(req.id)
        except (TimeoutError, sqlite3.Error, BufferError) as exc:
            return self._respond(name, req.id, self._store_refusal(exc))
        if seen is not None:
            return self._again(req, *seen)
        if retained:
            return self._respond(
                name,
                req.id,
                Refusal(
                    "retained",
                    "a retained request is never run: the broker kept it from before this "
                    "session (publish requests without the retain flag)",
                ),
            )
        cfg = self.agent.cfg.commands
        if name != "ping" and name not in cfg.allow:
            return self._respond(
                name, req.id, Refusal("not_allowed", f"{name} is not in commands.allow")
            )
        now = now_ms()
        trusted = self.agent.clock.synced
        refusal = judge_age(name, req.sent_at_ms, now, trusted, cfg.max_age)
        if refusal is not None:
            return self._respond(name, req.id, refusal)
        action = self._prepare(req)
        if isinstance(action, Refusal):
            return self._respond(name, req.id, action)
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                seen = await buffer.claim_command(
                    req.id, name, now, now - REMEMBER_MS if trusted else None
                )
        except (TimeoutError, sqlite3.Error, BufferError) as exc:
            return self._respond(name, req.id, self._store_refusal(exc))
        if seen is not None:
            return self._again(req, *seen)
        self.executed += 1
        try:
            outcome = await action()
        except Exception as exc:  # a bug in a command: it ran, so its answer is kept
            log.critical("command %s failed: %s at %s", name, type(exc).__name__, where_raised(exc))
            outcome = Refusal("failed", "the gateway failed to run it")
        response = self._respond(name, req.id, outcome)
        with contextlib.suppress(sqlite3.Error, BufferError, TimeoutError):
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await buffer.finish_command(req.id, json.dumps(response))
        return response

    @staticmethod
    def _store_refusal(exc: BaseException) -> Refusal:
        why = "it did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
        return Refusal(
            "busy", f"the request's id cannot be remembered ({why}): not run; send it again"
        )

    def _again(self, req: Request, name: str, stored: str | None) -> dict[str, Any]:
        """The answer to an id seen before: its first response, marked ``duplicate``."""
        if name != req.name:
            return self._respond(
                req.name,
                req.id,
                Refusal("malformed", f"id {req.id!r} was already used by a {name} request"),
            )
        first: Any = None
        with contextlib.suppress(ValueError, TypeError):
            first = json.loads(stored) if stored is not None else None
        if not isinstance(first, dict):
            return self._respond(
                req.name,
                req.id,
                Refusal(
                    "interrupted",
                    "this request began to run but the gateway stopped before it ended; it "
                    "is not run again (check the device, then send a new id)",
                ),
            )
        first["duplicate"] = True
        first["ts"] = iso_ms(now_ms())
        return first

    def _respond(
        self, name: str, request_id: str | None, outcome: dict[str, Any] | Refusal
    ) -> dict[str, Any]:
        if isinstance(outcome, Refusal):
            return payloads.command_response(
                self.gateway_id,
                name[:64],
                request_id,
                now_ms(),
                reason=outcome.reason,
                message=outcome.message,
            )
        return payloads.command_response(
            self.gateway_id, name, request_id, now_ms(), result=outcome, message="done"
        )

    def _report(self, name: str, response: dict[str, Any], source: str) -> None:
        """Log the command and send it as a ``command`` notice."""
        self.handled += 1
        ok = bool(response.get("ok"))
        duplicate = bool(response.get("duplicate", False))
        rid = response.get("id")
        reason = None if ok else response.get("reason")
        said = "done" if ok else f"refused ({reason}: {response.get('message')})"
        if duplicate:
            said = f"answered again with its first response ({'done' if ok else reason})"
        message = f"command {name[:64]} id {rid!r} from {source}: {said}"
        log.info("%s", message)
        self.agent.notice(
            "command",
            message,
            command=name[:64],
            request_id=rid,
            ok=ok,
            reason=reason,
            duplicate=duplicate,
        )

    # -- the commands ------------------------------------------------------------------------

    def _prepare(self, req: Request) -> Action | Refusal:
        """Check ``req`` against the config; the action that runs it, or why not."""
        if req.name == "ping":
            return self._ping
        if req.name == "reload":
            return self._reload
        if req.name == "ack":
            return self._prepare_ack(req.args.get("alarms"))
        found = self._device(req.args["device"])
        if isinstance(found, Refusal):
            return found
        dev, poller = found
        if req.name == "read":
            return lambda: self._read(dev, poller)
        if req.name == "set_interval":
            cfg = self.agent.cfg.commands
            bounds = interval_args(req.args, cfg.min_interval, cfg.max_interval, cfg.max_for)
            if isinstance(bounds, Refusal):
                return bounds
            return lambda: self._set_interval(dev, poller, *bounds)
        point = next((p for p in dev.points if p.name == req.args["point"]), None)
        if point is None:
            return Refusal("unknown_point", f"device {dev.id!r} has no point {req.args['point']!r}")
        words = write_words(point, req.args["value"])
        if isinstance(words, Refusal):
            return words
        return lambda: self._write(dev, poller, point, req.args["value"], words)

    def _device(self, dev_id: str) -> tuple[ModbusDevice, BusPoller] | Refusal:
        dev = next((d for d in self.agent.cfg.devices if d.id == dev_id), None)
        if dev is None:
            return Refusal("unknown_device", f"no device {dev_id!r} on this gateway")
        poller = next((p for p in self.agent.pollers if p.state_of(dev_id) is not None), None)
        if not is_modbus(dev) or poller is None:
            return Refusal(
                "unsupported", f"device {dev_id!r} is not a polled Modbus device: it streams"
            )
        return dev, poller

    async def _ping(self) -> dict[str, Any]:
        return {"uptime_s": round(time.monotonic() - self._started, 1)}

    def _prepare_ack(self, keys: Any) -> Action | Refusal:
        known = {a.key for a in self.agent.alarms.alarms}
        if keys is not None:
            if (
                not isinstance(keys, list)
                or len(keys) > ALARMS_MAX
                or not all(isinstance(k, str) for k in keys)
            ):
                return Refusal("malformed", f"'alarms' is a list of at most {ALARMS_MAX} names")
            unknown = [k for k in keys if k not in known]
            if unknown:
                return Refusal(
                    "unknown_alarm", f"no alarm {unknown[0][:129]!r} (alarms are device/rule)"
                )

        async def ack() -> dict[str, Any]:
            changed = self.agent.acknowledge("platform", keys)
            return {"acknowledged": changed}

        return ack

    async def _on_bus(self, poller: BusPoller, job: Callable[[BusPoller], Awaitable[Any]]) -> Any:
        """Run ``job`` on ``poller``'s task; raises :class:`BusBusy`, TimeoutError."""
        fut = poller.submit(job)
        async with asyncio.timeout(RUN_TIMEOUT_S):
            return await fut

    async def _read(self, dev: ModbusDevice, poller: BusPoller) -> dict[str, Any] | Refusal:
        async def job(p: BusPoller) -> tuple[int, list[PointResult]]:
            st = p.state_of(dev.id)
            if st is None:
                raise LookupError(dev.id)
            ts = now_ms()
            return ts, await p.poll_once(st)

        try:
            ts, results = await self._on_bus(poller, job)
        except BusBusy as exc:
            return Refusal("busy", str(exc))
        except TimeoutError:
            return Refusal("failed", f"the bus did not get to it within {RUN_TIMEOUT_S:g} s")
        except LookupError:
            return Refusal("unknown_device", f"device {dev.id!r} was removed by a reload")
        body = telemetry_body(
            self.gateway_id, dev.id, ts, results, {p.name: p.unit for p in dev.points}
        )
        doc = json.loads(body)
        return {"device": dev.id, "ts": doc["ts"], "points": doc["points"]}

    async def _set_interval(
        self, dev: ModbusDevice, poller: BusPoller, interval: float, lasting: float
    ) -> dict[str, Any] | Refusal:
        if not poller.set_interval(dev.id, interval, lasting):
            return Refusal("unknown_device", f"device {dev.id!r} was removed by a reload")
        log.info(
            "device %s: polled every %g s for %g s, then every %g s again",
            dev.id,
            interval,
            lasting,
            dev.poll_interval,
        )
        return {
            "device": dev.id,
            "interval_s": interval,
            "for_s": lasting,
            "until": iso_ms(now_ms() + round(lasting * 1000)),
            "configured_s": dev.poll_interval,
        }

    async def _write(
        self,
        dev: ModbusDevice,
        poller: BusPoller,
        point: ModbusPoint,
        value: Any,
        words: list[int] | list[bool],
    ) -> dict[str, Any] | Refusal:
        async def job(p: BusPoller) -> list[int] | list[bool]:
            if not await p.ensure_connected():
                raise ConnectionError(f"bus {p.name} is not connected")
            await p.bus.write(dev.unit_id, point.table, point.address, words, dev.timeout)
            block = Block(point.table, point.address, len(words), (point,))
            back = await p.bus.read_raw(dev.unit_id, block, dev.timeout)
            return list(back)[: len(words)]

        fc = (
            (5 if len(words) == 1 else 15)
            if point.table == "coil"
            else 6
            if len(words) == 1
            else 16
        )
        where = f"{point.table} {point.address} of unit {dev.unit_id} (FC {fc})"
        try:
            back = await self._on_bus(poller, job)
        except BusBusy as exc:
            return Refusal("busy", str(exc))
        except TimeoutError:
            return Refusal(
                "failed",
                f"the bus did not get to it within {RUN_TIMEOUT_S:g} s; if it had begun, the "
                "register may have been written: read it",
            )
        except (ExceptionReply, FrameError, OSError) as exc:
            log.warning("write of %s/%s (%s) failed: %s", dev.id, point.name, where, exc)
            return Refusal("failed", f"writing {where}: {describe_error(exc)}")
        readback = decode_point(point, back)
        log.warning(
            "wrote %s/%s = %r (%s) for the platform; read back %r (%s)",
            dev.id,
            point.name,
            value,
            where,
            readback.value,
            readback.quality,
        )
        return {
            "device": dev.id,
            "point": point.name,
            "requested": value,
            "value": _json_number(readback.value),
            "quality": readback.quality,
        }

    async def _reload(self) -> dict[str, Any] | Refusal:
        reloader = self.agent.reloader
        if reloader is None:
            return Refusal("unsupported", "the agent runs without a config file to reload")
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S * 2):
                applied = await reloader.run_now()
        except TimeoutError:
            return Refusal("failed", "the reload did not end in time")
        if not applied:
            return Refusal(
                "failed", "the config was not reloaded: see the reload_failed notice and the log"
            )
        return {"applied": True, "reloads": reloader.reloads}
