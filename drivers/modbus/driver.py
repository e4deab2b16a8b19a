"""Modbus TCP polling with pymodbus's asyncio client.

One :class:`ModbusTcpBus` per TCP endpoint; requests on a bus run one at a time. Points of a
device are read in contiguous blocks (one request per block). Reconnecting is owned by the
caller (the agent's bus task): pymodbus's own reconnect is switched off
(``reconnect_delay=0``) so that there is exactly one backoff policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from drivers.base import GOOD, PointResult
from drivers.codec import (
    DecodeError,
    decode_bytes,
    decode_string,
    non_finite_quality,
    raw_pattern,
    register_bit,
    registers_to_bytes,
    scale_value,
)
from drivers.modbus.config import (
    BIT_TABLES,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ModbusPoint,
)

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


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``start``."""

    table: str
    start: int
    count: int
    points: tuple[ModbusPoint, ...]


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
        wire = registers_to_bytes([int(w) for w in words])
    except DecodeError as exc:
        return _bad(block.points, "decode_error", str(exc))
    start = block.start
    return [
        _decode_wire(p, wire[2 * (p.address - start) : 2 * (p.address - start + p.register_count)])
        for p in block.points
    ]


def _bad(
    points: Sequence[ModbusPoint], quality: str, error: str, code: int | None = None
) -> list[PointResult]:
    return [PointResult(p.name, None, quality, error, code) for p in points]


class ModbusBus:
    """One physical bus (a TCP endpoint or a serial line) shared by one or more devices
    (unit ids); requests on it run one at a time (the bus task owns it).

    Subclasses only build the pymodbus client (``_client``) and set :attr:`name`.
    """

    name: str
    _client: AsyncModbusTcpClient | AsyncModbusSerialClient

    def _no_disconnect_on_timeouts(self) -> None:
        # Timeouts of one unit on a shared line must not close the connection that the
        # other units still answer on.
        self._client.set_max_no_responses(1_000_000)

    @property
    def connected(self) -> bool:
        """True while the connection (or the serial port) is open."""
        return bool(self._client.connected)

    async def connect(self) -> bool:
        """Open the connection once; return whether it is up. Never raises."""
        try:
            return bool(await self._client.connect())
        except (OSError, ModbusException) as exc:
            log.debug("connect %s failed: %s", self.name, exc)
            return False

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._client.close()

    async def _read(self, table: str, start: int, count: int, unit_id: int) -> object:
        c = self._client
        if table == "holding":
            return await c.read_holding_registers(start, count=count, device_id=unit_id)
        if table == "input":
            return await c.read_input_registers(start, count=count, device_id=unit_id)
        if table == "coil":
            return await c.read_coils(start, count=count, device_id=unit_id)
        return await c.read_discrete_inputs(start, count=count, device_id=unit_id)

    async def read_block(self, unit_id: int, block: Block) -> list[PointResult]:
        """Read one block; on an exception reply, narrow it to single points.

        Returns one :class:`PointResult` per point of the block, never raises for device
        faults: timeouts give quality ``timeout``, exception replies quality ``exception``
        (with the code and its name), a lost connection ``no_connection``.
        """
        try:
            resp = await self._read(block.table, block.start, block.count, unit_id)
        except (TimeoutError, ModbusException, OSError) as exc:
            # pymodbus turns a cancellation into ModbusIOException("Request cancelled
            # outside library"): give the caller its cancellation back.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            if isinstance(exc, TimeoutError | ModbusIOException):
                return _bad(block.points, "timeout", f"no response from unit {unit_id}: {exc}")
            return _bad(block.points, "no_connection", f"{self.name}: {exc}")
        if resp.isError():  # type: ignore[attr-defined]
            code = int(getattr(resp, "exception_code", 0))
            if len(block.points) > 1:
                # One unsupported address must not cost the valid points of the block.
                out: list[PointResult] = []
                for p in block.points:
                    single = Block(block.table, p.address, p.register_count, (p,))
                    out.extend(await self.read_block(unit_id, single))
                return out
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            fc = FUNCTION_CODES[block.table]
            return _bad(
                block.points,
                "exception",
                f"exception {code} ({name}) to FC {fc:02d} at address {block.start}",
                code,
            )
        if block.table in BIT_TABLES:
            words: Sequence[int] | Sequence[bool] = resp.bits  # type: ignore[attr-defined]
        else:
            words = resp.registers  # type: ignore[attr-defined]
        # bits come padded to whole bytes (Modbus Application Protocol V1.1b3, 6.1/6.2)
        longest = -(-block.count // 8) * 8 if block.table in BIT_TABLES else block.count
        if not block.count <= len(words) <= longest:
            what = "short" if len(words) < block.count else "long"
            return _bad(
                block.points,
                "decode_error",
                f"{what} reply from unit {unit_id}: asked {block.count} "
                f"{'bits' if block.table in BIT_TABLES else 'registers'} at address "
                f"{block.start}, got {len(words)}; nothing of it is used",
            )
        return decode_block(block, words)

    async def read_device(self, unit_id: int, blocks: Sequence[Block]) -> list[PointResult]:
        """Read every block of one device in order.

        After a timeout or a lost connection the remaining blocks are not tried in this cycle
        (they get the same bad quality), so a dead device costs one timeout per poll.
        """
        out: list[PointResult] = []
        failed: PointResult | None = None
        for block in blocks:
            if failed is not None:
                out.extend(_bad(block.points, failed.quality, failed.error or ""))
                continue
            results = await self.read_block(unit_id, block)
            out.extend(results)
            if (
                results
                and results[0].quality in ("timeout", "no_connection")
                and all(r.quality == results[0].quality for r in results)
            ):
                failed = results[0]
        return apply_decimal_points([p for b in blocks for p in b.points], out)


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


class ModbusTcpBus(ModbusBus):
    """A Modbus TCP endpoint: a Modbus TCP device or a TCP-to-RS-485 converter.

    Args:
        host, port: the endpoint.
        timeout: seconds to wait for each response.
    """

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.name = f"tcp://{host}:{port}"
        self._client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout, retries=0, reconnect_delay=0, name=self.name
        )
        self._no_disconnect_on_timeouts()


class ModbusRtuBus(ModbusBus):
    """A Modbus RTU serial line (RS-485), opened through pyserial, so ``serial_port`` may
    also be a pyserial URL (``rfc2217://``, ``spy://``, ``socket://``).

    Args:
        serial_port: device path or URL.
        baudrate, parity, stopbits, bytesize: the line settings.
        timeout: seconds to wait for each response.
    """

    def __init__(
        self,
        serial_port: str,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        timeout: float = 1.0,
    ) -> None:
        self.name = f"serial:{serial_port}"
        self._client = AsyncModbusSerialClient(
            serial_port,
            framer=FramerType.RTU,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
            name=self.name,
        )
        self._no_disconnect_on_timeouts()


__all__ = [
    "GOOD",
    "Block",
    "ModbusBus",
    "ModbusRtuBus",
    "ModbusTcpBus",
    "decode_block",
    "decode_point",
    "plan_blocks",
]
