"""Modbus polling: buses, block planning and decoding.

One :class:`ModbusTcpBus` per TCP endpoint (:mod:`drivers.modbus.tcp`), one
:class:`LineBus` per serial line (:mod:`drivers.modbus.line`); requests on a bus run one at
a time. Points of a device are read in contiguous blocks (one request per block).
Reconnecting is owned by the caller (the agent's bus task), so that there is exactly one
backoff policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import add, mul
from typing import TYPE_CHECKING

from drivers.base import GOOD, PointResult
from drivers.codec import (
    STRUCT_CODES,
    UNPACK_FROM,
    DecodeError,
    decode_bytes,
    decode_string,
    non_finite_quality,
    raw_pattern,
    register_bit,
    registers_to_bytes,
    scale_value,
)
from drivers.modbus.line import (
    ExceptionReply,
    FrameError,
    LineCounters,
    SerialLine,
    data_to_values,
    read_pdu,
    write_pdu,
)
from drivers.modbus.spec import BIT_TABLES, MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ
from drivers.modbus.tcp import MbapClient

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusPoint


log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""Modbus exception codes, Modbus Application Protocol V1.1b3, clause 7."""

FUNCTION_CODES = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}


Step = tuple["ModbusPoint", int, int, Callable[[bytes, int], tuple[int | float]] | None]
"""How :func:`decode_block` reads one point of a block: (point, first and end byte offset
in the block's bytes, ``unpack_from`` when a plain unpack of those bytes is the raw value)."""


def _step(point: ModbusPoint, start: int) -> Step:
    lo = 2 * (point.address - start)
    hi = lo + 2 * point.register_count
    plain = point.table not in BIT_TABLES and not point.invalid_values
    plain = plain and (point.byte_order == "ABCD" or (hi - lo == 2 and point.byte_order == "CDAB"))
    return point, lo, hi, UNPACK_FROM.get(str(point.type)) if plain else None


_RAW_BOUND = {"uint16": 2**16, "int16": 2**15, "uint32": 2**32, "int32": 2**31}
_RAW_BOUND |= {"uint64": 2**64, "int64": 2**63}
"""Largest magnitude of an integer register type's raw value (floats have none)."""

Scaling = tuple[str, int | float, int | float, int | None, int]
"""How :func:`decode_block`'s whole-block path makes a point's value from its raw value:
(point name, scale, offset, decimals, kind); kind :data:`EXACT` is ``raw × scale + offset``
in integers, :data:`FINITE` ``float(raw) × scale + offset`` that cannot overflow (then
rounded to ``decimals``), :data:`CHECKED` the same for a raw value that may be NaN or ±Inf
(float types) or a product that may overflow: checked for finiteness first. Each kind gives
exactly what :func:`drivers.codec.scale_value` and the non-finite check give."""
EXACT, FINITE, CHECKED = 0, 1, 2


def _scaling(point: ModbusPoint) -> Scaling:
    scale, offset = point.scale, point.offset
    bound = _RAW_BOUND.get(str(point.type))
    if bound is not None and isinstance(scale, int) and isinstance(offset, int):
        return point.name, scale, offset, point.decimals, EXACT
    try:
        safe = bound is not None and bound * abs(scale) + abs(offset) < 1e300
    except OverflowError:  # an integer scale too large for a float, beside a float offset
        safe = False
    return point.name, scale, offset, point.decimals, FINITE if safe else CHECKED


@dataclass(frozen=True, slots=True)
class WholeBlock:
    """A block whose points are all plain numbers (big-endian order, no 'no value'
    markers) at increasing, non-overlapping offsets: one ``struct`` unpacks all of their
    raw values at once (gaps skipped as pad bytes), in the order of ``scalings``.

    ``kind``: the :data:`Scaling` kind of every point when it is the same for all (and,
    for :data:`FINITE`, all round or none does), else None; ``names``, ``scales``,
    ``offsets`` and ``decimals`` then hold the points' figures in order (floats for
    FINITE), so that the block's values are made by ``map`` with no Python code per point.
    """

    unpack_from: Callable[[bytes], tuple[int | float, ...]]
    size: int
    """Bytes the format reads from the start of the block."""
    scalings: tuple[Scaling, ...]
    kind: int | None
    names: tuple[str, ...]
    scales: tuple[int | float, ...]
    offsets: tuple[int | float, ...]
    decimals: tuple[int, ...] | None


def _whole_block(steps: Sequence[Step]) -> WholeBlock | None:
    fmt, at = [">"], 0
    for point, lo, hi, unpack_from in steps:
        if unpack_from is None or lo < at:
            return None
        if lo > at:
            fmt.append(f"{lo - at}x")
        fmt.append(STRUCT_CODES[str(point.type)])
        at = hi
    if not steps:
        return None
    packed = struct.Struct("".join(fmt))
    scalings = tuple(_scaling(s[0]) for s in steps)
    kinds = {s[4] for s in scalings}
    rounded = {s[3] is not None for s in scalings}
    kind = kinds.pop() if len(kinds) == 1 and len(rounded) == 1 else None
    names = tuple(s[0] for s in scalings)
    if kind == FINITE:
        scales: tuple[int | float, ...] = tuple(float(s[1]) for s in scalings)
        offsets: tuple[int | float, ...] = tuple(float(s[2]) for s in scalings)
    else:
        scales, offsets = tuple(s[1] for s in scalings), tuple(s[2] for s in scalings)
    decimals = tuple(s[3] for s in scalings if s[3] is not None) if rounded == {True} else None
    return WholeBlock(packed.unpack_from, at, scalings, kind, names, scales, offsets, decimals)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``start``."""

    table: str
    start: int
    count: int
    points: tuple[ModbusPoint, ...]
    steps: tuple[Step, ...] = field(init=False, repr=False, compare=False)
    """Worked out once, used at every poll: see :data:`Step`."""
    whole: WholeBlock | None = field(init=False, repr=False, compare=False)
    """The block's points read with one unpack (None: point by point, :data:`Step`)."""
    decimal_points: bool = field(init=False, repr=False, compare=False)
    """Whether a point of the block has a ``decimal_point`` (:func:`apply_decimal_points`)."""

    def __post_init__(self) -> None:
        steps = tuple(_step(p, self.start) for p in self.points)
        object.__setattr__(self, "steps", steps)
        scaled = any(p.decimal_point is not None for p in self.points)
        object.__setattr__(self, "decimal_points", scaled)
        whole = _whole_block(steps) if self.table not in BIT_TABLES else None
        object.__setattr__(self, "whole", whole)


def plan_blocks(
    points: Sequence[ModbusPoint], max_gap: int = 0, max_registers: int = MAX_REGISTERS_PER_READ
) -> list[Block]:
    """Group points into as few read requests as the limits allow.

    Points of one table are merged while the unused addresses between them are at most
    ``max_gap`` and the block stays within ``max_registers`` registers (at most 125,
    Modbus Application Protocol V1.1b3 6.3/6.4) or 2000 bits (6.1/6.2). With the default
    ``max_gap=0`` no address between points is ever asked for, which any device accepts.
    """
    blocks: list[Block] = []
    ordered = sorted(points, key=lambda p: (p.table, p.address))
    cur: list[ModbusPoint] = []
    start = end = 0
    table = ""
    for p in ordered:
        limit = MAX_BITS_PER_READ if p.table in BIT_TABLES else max_registers
        p_end = p.address + p.register_count
        if (
            cur
            and p.table == table
            and p.address <= end + max_gap
            and max(end, p_end) - start <= limit
        ):
            cur.append(p)
            end = max(end, p_end)
            continue
        if cur:
            blocks.append(Block(table, start, end - start, tuple(cur)))
        cur, table, start, end = [p], p.table, p.address, p_end
    if cur:
        blocks.append(Block(table, start, end - start, tuple(cur)))
    return blocks


def decode_point(point: ModbusPoint, words: Sequence[int] | Sequence[bool]) -> PointResult:
    """Turn the raw words (or bits) of one point into a :class:`PointResult`.

    Pure function. NaN and ±Inf become bad quality (``nan``/``inf``) with ``value=None``.
    """
    if point.table in BIT_TABLES:
        return PointResult(point.name, bool(words[0]))
    try:
        wire = registers_to_bytes([int(w) for w in words])
    except DecodeError as exc:
        return PointResult(point.name, None, "decode_error", str(exc))
    return _decode_wire(point, wire)


def _decode_wire(point: ModbusPoint, wire: bytes) -> PointResult:
    try:
        if point.type == "bit":
            assert point.bit is not None
            return PointResult(point.name, register_bit(wire, point.bit, point.byte_order))
        if point.type == "string":
            return PointResult(point.name, decode_string(wire, point.byte_order))
        assert point.type is not None and point.type != "bool"
        raw = decode_bytes(wire, point.type, point.byte_order)
    except DecodeError as exc:
        return PointResult(point.name, None, "decode_error", str(exc))
    if point.invalid_values:
        pattern = raw_pattern(wire, point.byte_order)
        if pattern in point.invalid_values or raw in point.invalid_values:
            return PointResult(
                point.name, None, "invalid", f"device sent its 'no value' marker 0x{pattern:X}"
            )
    value = scale_value(raw, point.scale, point.offset, point.decimals)
    if isinstance(value, float):
        bad = non_finite_quality(value)
        if bad is not None:
            return PointResult(point.name, None, bad, f"device sent {value!r}")
    return PointResult(point.name, value)


def decode_block(block: Block, words: Sequence[int] | Sequence[bool]) -> list[PointResult]:
    """Decode every point of ``block`` from the words (or bits) read for the whole block.

    The block's registers are turned into wire bytes once; each point decodes its slice.
    """
    if block.table in BIT_TABLES:
        return [PointResult(p.name, bool(words[p.address - block.start])) for p in block.points]
    try:
        wire = registers_to_bytes(words)
    except DecodeError as exc:
        return _bad(block.points, "decode_error", str(exc))
    out: list[PointResult] = []
    size = len(wire)
    whole = block.whole
    if whole is not None and whole.size <= size:
        return _decode_whole(whole, wire)
    for p, lo, hi, unpack_from in block.steps:
        if unpack_from is None or hi > size:
            out.append(_decode_wire(p, wire[lo:hi]))
            continue
        # what _decode_wire does for a plain numeric point, without slicing the bytes
        value = scale_value(unpack_from(wire, lo)[0], p.scale, p.offset, p.decimals)
        if isinstance(value, float):
            bad = non_finite_quality(value)
            if bad is not None:
                out.append(PointResult(p.name, None, bad, f"device sent {value!r}"))
                continue
        out.append(PointResult(p.name, value))
    return out


def _decode_whole(whole: WholeBlock, wire: bytes) -> list[PointResult]:
    """:func:`decode_block`'s loop for a :class:`WholeBlock`: the same results, one unpack
    and no function call per point (the per-reading path of a large fleet)."""
    raws = whole.unpack_from(wire)
    if whole.kind == EXACT:  # raw × scale + offset in integers
        values: Iterable[int | float] = map(add, map(mul, raws, whole.scales), whole.offsets)
        return list(map(PointResult, whole.names, values))
    if whole.kind == FINITE:  # float(raw) × scale + offset, rounded where asked
        # (int × float converts the int as float() does, CPython's float_mul; scales and
        # offsets are floats here, so every value is a float)
        values = map(add, map(mul, raws, whole.scales), whole.offsets)
        if whole.decimals is not None:
            values = map(round, values, whole.decimals)
        return list(map(PointResult, whole.names, values))
    out: list[PointResult] = []
    append = out.append
    isfinite = math.isfinite
    for (name, scale, offset, decimals, kind), raw in zip(whole.scalings, raws, strict=True):
        if kind == EXACT:
            append(PointResult(name, raw * scale + offset))
            continue
        value = float(raw) * scale + offset
        if kind == CHECKED and not isfinite(value):
            bad = "nan" if math.isnan(value) else "inf"
            append(PointResult(name, None, bad, f"device sent {value!r}"))
            continue
        append(PointResult(name, value if decimals is None else round(value, decimals)))
    return out


def describe_error(exc: BaseException) -> str:
    """A line for people about a failed request (exception replies by code and name)."""
    if isinstance(exc, ExceptionReply):
        return f"exception {exc.code} ({EXCEPTION_NAMES.get(exc.code, 'unknown exception')})"
    if isinstance(exc, TimeoutError):
        return f"no response{': ' + str(exc) if str(exc) else ''}"
    return str(exc) or type(exc).__name__


def _bad(
    points: Sequence[ModbusPoint], quality: str, error: str, code: int | None = None
) -> list[PointResult]:
    return [PointResult(p.name, None, quality, error, code) for p in points]


@dataclass(slots=True)
class RetryBudget:
    """The retries one poll of a device may still make.

    A request that failed with a timeout, a CRC error or a frame error is sent again at
    once (in the device's own turn on the bus: no other device's request comes between)
    while ``left`` is above 0, the bus is still connected, and the retry, were it to run
    to its full timeout, would end by ``until`` (monotonic seconds: the end of the
    device's poll interval), so a retry never makes a device late for its own next poll.

    Attributes:
        left: retries still allowed in this poll (``retries`` of the device's config).
        until: ``time.monotonic()`` by which every retry must be over.
    """

    left: int
    until: float


UNSUPPORTED_CODES = frozenset({1, 2})
"""Exception codes meaning "this device has no such point" (illegal function, illegal data
address) when a single point is asked for: quality ``unsupported``."""


class ModbusBus(ABC):
    """One physical bus (a TCP endpoint or a serial line) shared by one or more devices
    (unit ids); requests on it run one at a time (the bus task owns it).

    Subclasses implement :meth:`_read_values` and the connection methods and set
    :attr:`name`.

    Attributes:
        narrowed: blocks of the last :meth:`read_device` call that were answered with an
            exception and re-read point by point.
    """

    name: str
    narrowed: list[Block]
    timeout: float
    """Default seconds to wait for each reply."""
    last_error: str = ""
    """Why the last :meth:`connect` failed (empty when unknown)."""
    progress_at: float = 0.0
    """Monotonic time (s) the last request of :meth:`read_block` ended: a reply, an
    exception reply, a timeout or a lost connection. A driver stuck inside a request
    leaves it behind (the agent's watchdog looks at it)."""

    @property
    @abstractmethod
    def counters(self) -> LineCounters:
        """Requests, timeouts, CRC errors, garbage bytes, frame errors and retries on this
        bus since it was made."""
        raise NotImplementedError

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while the connection (or the serial port) is open."""
        raise NotImplementedError

    @abstractmethod
    async def connect(self) -> bool:
        """Open the connection once; return whether it is up. Never raises."""
        raise NotImplementedError

    @abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent)."""
        raise NotImplementedError

    @abstractmethod
    async def _read_values(
        self, unit_id: int, block: Block, timeout: float | None
    ) -> Sequence[int] | Sequence[bool]:
        """Read one block: registers as 16-bit ints, bits as bools.

        Raises:
            ExceptionReply: a Modbus exception reply.
            FrameError: a reply that does not fit the request.
            TimeoutError: no reply in time.
            OSError: the connection is gone (ConnectionError) or cannot be used.
        """
        raise NotImplementedError

    async def read_raw(
        self,
        unit_id: int,
        block: Block,
        timeout: float | None = None,
        retry: RetryBudget | None = None,
    ) -> Sequence[int] | Sequence[bool]:
        """Read one block's raw registers (or bits) without decoding (technicians' tools),
        sent again after a failure as ``retry`` allows.

        Raises:
            ExceptionReply, FrameError, TimeoutError, OSError: as :meth:`_read_values`.
        """
        return await self._read_retrying(unit_id, block, timeout, retry)

    @abstractmethod
    async def write(
        self,
        unit_id: int,
        table: str,
        address: int,
        values: Sequence[int] | Sequence[bool],
        timeout: float | None = None,
    ) -> None:
        """Write coils or holding registers (function code 5, 6, 15 or 16).

        Raises:
            ExceptionReply, FrameError, TimeoutError, OSError: as :meth:`_read_values`.
        """
        raise NotImplementedError

    async def _read_retrying(
        self, unit_id: int, block: Block, timeout: float | None, retry: RetryBudget | None
    ) -> Sequence[int] | Sequence[bool]:
        """:meth:`_read_values`, sent again after a timeout, CRC or frame error while
        ``retry`` allows (see :class:`RetryBudget`)."""
        while True:
            try:
                return await self._read_values(unit_id, block, timeout)
            except (TimeoutError, FrameError) as exc:
                task = asyncio.current_task()
                if (
                    retry is None
                    or retry.left <= 0
                    or (task is not None and task.cancelling())
                    or not self.connected
                    or time.monotonic() + (timeout or self.timeout) > retry.until
                ):
                    raise
                retry.left -= 1
                self.counters.retries += 1
                log.debug(
                    "%s unit %d: %s; sending the request again",
                    self.name,
                    unit_id,
                    describe_error(exc),
                )

    async def read_block(
        self,
        unit_id: int,
        block: Block,
        timeout: float | None = None,
        retry: RetryBudget | None = None,
    ) -> list[PointResult]:
        """Read one block; on an exception reply, narrow it to single points.

        Returns one :class:`PointResult` per point of the block, never raises for device
        faults: timeouts give quality ``timeout``; a Modbus exception quality ``exception``
        (with the code and its name), or ``unsupported`` for a single point answered with
        exception 1 or 2; a garbled or mismatched reply (a bad CRC included)
        ``frame_error``; a lost connection ``no_connection``. A failed request is sent
        again as ``retry`` allows (None: never).
        """
        fc = FUNCTION_CODES[block.table]
        try:
            try:
                words = await self._read_retrying(unit_id, block, timeout, retry)
            finally:
                self.progress_at = time.monotonic()
        except ExceptionReply as exc:
            code = exc.code
            if len(block.points) > 1:
                # One unsupported address must not cost the valid points of the block.
                self.narrowed.append(block)
                out: list[PointResult] = []
                for p in block.points:
                    single = Block(block.table, p.address, p.register_count, (p,))
                    out.extend(await self.read_block(unit_id, single, timeout, retry))
                return out
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            what = f"exception {code} ({name}) to FC {fc:02d} at address {block.start}"
            if code in UNSUPPORTED_CODES:
                return _bad(block.points, "unsupported", f"device does not have it: {what}", code)
            return _bad(block.points, "exception", what, code)
        except FrameError as exc:
            return _bad(block.points, "frame_error", str(exc))
        except (TimeoutError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # ours, not the device's timeout
                raise asyncio.CancelledError from None
            if isinstance(exc, TimeoutError):
                detail = f": {exc}" if str(exc) else ""
                return _bad(block.points, "timeout", f"no response from unit {unit_id}{detail}")
            return _bad(block.points, "no_connection", f"{self.name}: {exc}")
        # bits come padded to whole bytes (Modbus Application Protocol V1.1b3, 6.1/6.2)
        longest = -(-block.count // 8) * 8 if block.table in BIT_TABLES else block.count
        if not block.count <= len(words) <= longest:
            what = "short" if len(words) < block.count else "long"
            return _bad(
                block.points,
                "frame_error",
                f"{what} reply from unit {unit_id}: asked {block.count} "
                f"{'bits' if block.table in BIT_TABLES else 'registers'} at address "
                f"{block.start}, got {len(words)}; nothing of it is used",
            )
        return decode_block(block, words)

    async def read_device(
        self,
        unit_id: int,
        blocks: Sequence[Block],
        timeout: float | None = None,
        retry: RetryBudget | None = None,
    ) -> list[PointResult]:
        """Read every block of one device in order (``timeout`` per request, seconds; the
        bus's default when ``None``); failed requests are sent again as ``retry`` allows,
        the budget shared by every block of this poll.

        After a timeout or a lost connection (once the retries are spent) the remaining
        blocks are not tried in this cycle (they get the same bad quality), so a dead
        device costs one timeout per poll, plus the retries its budget allows.
        """
        self.narrowed = []
        out: list[PointResult] = []
        failed: PointResult | None = None
        for block in blocks:
            if failed is not None:
                out.extend(_bad(block.points, failed.quality, failed.error or ""))
                continue
            results = await self.read_block(unit_id, block, timeout, retry)
            out.extend(results)
            if (
                results
                and results[0].quality in ("timeout", "no_connection")
                and all(r.quality == results[0].quality for r in results)
            ):
                failed = results[0]
        if not any(b.decimal_points for b in blocks):
            return out
        return apply_decimal_points([p for b in blocks for p in b.points], out)


class ModbusTcpBus(ModbusBus):
    """A Modbus TCP endpoint (MBAP framing): a Modbus TCP device or a TCP-to-RS-485 gateway,
    through :class:`drivers.modbus.tcp.MbapClient` (late replies discarded by transaction
    id; a timeout keeps the connection for the other units).

    Args:
        host, port: the endpoint.
        timeout: default seconds to wait for each response (and for the connection).
    """

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.name = f"tcp://{host}:{port}"
        self.narrowed = []
        self.timeout = timeout
        self._client = MbapClient(host, port, timeout)

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def counters(self) -> LineCounters:
        return self._client.counters

    async def connect(self) -> bool:
        try:
            await self._client.connect()
        except TimeoutError:
            self.last_error = f"no answer within {self.timeout:g} s"
            return False
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            log.debug("connect %s failed: %s", self.name, exc)
            return False
        return True

    def close(self) -> None:
        self._client.close()

    async def _read_values(
        self, unit_id: int, block: Block, timeout: float | None
    ) -> Sequence[int] | Sequence[bool]:
        request = bytes([unit_id]) + read_pdu(block.table, block.start, block.count)
        data = await self._client.transact(request, self.timeout if timeout is None else timeout)
        return data_to_values(request[1], block.count, data)

    async def write(
        self,
        unit_id: int,
        table: str,
        address: int,
        values: Sequence[int] | Sequence[bool],
        timeout: float | None = None,
    ) -> None:
        request = bytes([unit_id]) + write_pdu(table, address, values)
        await self._client.transact(request, self.timeout if timeout is None else timeout)


class LineBus(ModbusBus):
    """Modbus RTU or ASCII on a half-duplex line: an RS-485 serial port (a device path or
    a pyserial URL such as ``rfc2217://`` or ``spy://``), or a serial device server's TCP
    port (RTU over TCP). The line discipline (inter-frame gap, flushing, reply checks,
    local echo) is :class:`drivers.modbus.line.SerialLine`'s.

    Args:
        line: the line.
        timeout: default seconds to wait for a reply.
    """

    def __init__(self, line: SerialLine, timeout: float = 1.0) -> None:
        scheme = ("rtu+tcp" if line.framing == "rtu" else "ascii+tcp") if line.tcp else "serial"
        self.name = f"{scheme}:{line.endpoint}" if not line.tcp else f"{scheme}://{line.endpoint}"
        self.line = line
        self.timeout = timeout
        self.narrowed = []

    @property
    def connected(self) -> bool:
        return self.line.connected

    @property
    def counters(self) -> LineCounters:
        return self.line.counters

    async def connect(self) -> bool:
        ok = await self.line.connect()
        self.last_error = self.line.last_error
        return ok

    def close(self) -> None:
        self.line.close()

    async def _read_values(
        self, unit_id: int, block: Block, timeout: float | None
    ) -> Sequence[int] | Sequence[bool]:
        request = bytes([unit_id]) + read_pdu(block.table, block.start, block.count)
        data = await self.line.transact(request, timeout or self.timeout)
        return data_to_values(request[1], block.count, data)

    async def write(
        self,
        unit_id: int,
        table: str,
        address: int,
        values: Sequence[int] | Sequence[bool],
        timeout: float | None = None,
    ) -> None:
        request = bytes([unit_id]) + write_pdu(table, address, values)
        await self.line.transact(request, timeout or self.timeout)


def ModbusRtuBus(
    serial_port: str,
    baudrate: int = 9600,
    parity: str = "N",
    stopbits: int = 1,
    bytesize: int = 8,
    timeout: float = 1.0,
    *,
    framing: str = "rtu",
    frame_gap: float | None = None,
    local_echo: bool = False,
    connect_pause: float = 0.0,
) -> LineBus:
    """A Modbus RTU (or ASCII) serial line: see :class:`LineBus`."""
    line = SerialLine(
        serial_port,
        framing,
        baudrate,
        parity,
        stopbits,
        bytesize,
        frame_gap=frame_gap,
        local_echo=local_echo,
        connect_pause=connect_pause,
    )
    return LineBus(line, timeout)


def apply_decimal_points(
    points: Sequence[ModbusPoint], results: list[PointResult]
) -> list[PointResult]:
    """Divide values by 10^n for points with a ``decimal_point`` (a constant n, or the name
    of the point holding n, read in the same poll). Pure function.

    A point whose decimal-point register is unreadable or outside 0..9 gets quality
    ``decode_error``: a value off by a factor of 10^n must never look good.
    """
    if not any(p.decimal_point is not None for p in points):
        return results
    by_name = {r.point: r for r in results}
    out = []
    for p, r in zip(points, results, strict=True):
        ref = p.decimal_point
        if ref is None or r.quality != GOOD or not isinstance(r.value, int | float):
            out.append(r)
            continue
        if isinstance(ref, int):
            n: object = ref
        else:
            src = by_name.get(ref)
            n = src.value if src is not None and src.quality == GOOD else None
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 9:
            out.append(
                PointResult(
                    p.name, None, "decode_error", f"decimal point from {ref!r} is {n!r}, not 0..9"
                )
            )
            continue
        value = r.value / 10**n
        if p.decimals is not None:
            value = round(value, p.decimals)
        out.append(PointResult(p.name, value))
    return out


__all__ = [
    "GOOD",
    "Block",
    "LineBus",
    "ModbusBus",
    "ModbusRtuBus",
    "ModbusTcpBus",
    "RetryBudget",
    "decode_block",
    "decode_point",
    "plan_blocks",
]
