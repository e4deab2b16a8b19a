"""A Modbus TCP device simulator serving profiles' register maps (pymodbus server).

Used by ``edge-agent demo`` and by the tests. Each simulated device is one unit id; only the
registers its points occupy exist, so any other address answers exception 2 (illegal data
address), as a real device does. Values follow curves of time (a rising flood level, a gas
pressure with a slow swing) and are encoded with the same codec the agent decodes with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymodbus import FramerType
from pymodbus.datastore import ModbusDeviceContext, ModbusServerContext, ModbusSparseDataBlock
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from drivers.codec import encode_registers, to_big_endian
from drivers.modbus.config import BIT_TABLES, ModbusPoint

Curve = Callable[[float], float | int | bool]
_FC = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}


def raw_for(
    point: ModbusPoint, value: float | int | bool | str, decimal_point: int = 0
) -> list[int] | list[bool]:
    """Registers (or bits) a device holds for engineering ``value`` (inverse of decoding);
    ``decimal_point`` is the n of a point with a ``decimal_point`` setting."""
    if point.table in BIT_TABLES:
        return [bool(value)]
    if point.type == "bit":
        assert point.bit is not None
        return [(1 << point.bit) if value else 0]
    if point.type == "string":
        data = str(value).encode().ljust(2 * point.register_count, b"\0")
        data = to_big_endian(data, point.byte_order)  # its own inverse
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    assert point.type is not None and point.type != "bool"
    raw: float | int = (float(value) * 10**decimal_point - point.offset) / point.scale
    if not point.type.startswith("float"):
        raw = round(raw)
    return encode_registers(raw, point.type, point.byte_order)


@dataclass
class SimDevice:
    """One simulated unit: its points, curves and data store."""

    unit_id: int
    points: dict[str, ModbusPoint]
    curves: dict[str, Curve] = field(default_factory=dict)
    context: ModbusDeviceContext | None = None


def _sparse(points: list[ModbusPoint], table: str) -> ModbusSparseDataBlock:
    values: dict[int, int | bool] = {}
    for p in points:
        if p.table == table:
            for i in range(p.register_count):
                # pymodbus's device context adds 1 to every wire address
                values[p.address + i + 1] = False if table in BIT_TABLES else 0
    return ModbusSparseDataBlock(values or {65536: 0}, mutable=False)


class ModbusSimulator:
    """A pymodbus TCP server on ``host:port`` (port 0 picks a free one) with devices."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tick: float = 0.1,
        serial_port: str | None = None,
        baudrate: int = 9600,
    ) -> None:
        self.host = host
        self.port = port
        self.serial_port = serial_port
        """Serve Modbus RTU on this serial port (e.g. one end of a pty pair) instead of TCP."""
        self.baudrate = baudrate
        self.tick = tick
        self.devices: dict[int, SimDevice] = {}
        self.requests: list[tuple[int, int, int, int]] = []
        """Every request received: (unit id, function code, address, count)."""
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: ModbusServerContext | None = None

    def add_device(
        self, unit_id: int, points: list[ModbusPoint], curves: dict[str, Curve] | None = None
    ) -> SimDevice:
        """Serve ``points`` as unit ``unit_id``; ``curves`` map point names to f(t)."""
        ctx = ModbusDeviceContext(
            co=_sparse(points, "coil"),
            di=_sparse(points, "discrete_input"),
            hr=_sparse(points, "holding"),
            ir=_sparse(points, "input"),
        )
        dev = SimDevice(unit_id, {p.name: p for p in points}, dict(curves or {}), ctx)
        self.devices[unit_id] = dev
        return dev

    def set_value(self, unit_id: int, point: str, value: float | int | bool | str) -> None:
        """Store engineering ``value`` for ``point`` (encoded like the real device would)."""
        dev = self.devices[unit_id]
        p = dev.points[point]
        n = p.decimal_point if isinstance(p.decimal_point, int) else 0
        if isinstance(p.decimal_point, str):  # as set in the device's decimal-point register
            ref = dev.points[p.decimal_point]
            assert dev.context is not None
            n = int(dev.context.getValues(_FC[ref.table], ref.address, 1)[0])  # type: ignore[index]
        self.set_raw(unit_id, p.table, p.address, raw_for(p, value, n))

    def set_raw(
        self, unit_id: int, table: str, address: int, values: list[int] | list[bool]
    ) -> None:
        """Store raw register values (or bits) at zero-based ``address``, creating the
        registers if the device did not have them (the Modbus master still cannot)."""
        ctx = self.devices[unit_id].context
        assert ctx is not None
        block = ctx.store[{"coil": "c", "discrete_input": "d", "holding": "h", "input": "i"}[table]]
        assert isinstance(block, ModbusSparseDataBlock)
        block.mutable = True
        try:
            ctx.setValues(_FC[table], address, list(values))
        finally:
            block.mutable = False

    def set_online(self, unit_id: int, online: bool) -> None:
        """Take unit ``unit_id`` off the line or put it back. Off the line, pymodbus answers
        for it as a TCP-to-RS-485 converter does for a unit with its power cut: exception
        11, gateway target device failed to respond (MODBUS Application Protocol V1.1b3,
        clause 7). Call it on the simulator's thread (:meth:`call`) once serving."""
        assert self._context is not None
        devices = self._context._devices  # pymodbus keeps the units in this dict
        if online:
            devices[unit_id] = self.devices[unit_id].context
        else:
            devices.pop(unit_id, None)

    def _trace(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests.append(
                (
                    int(pdu.dev_id),
                    int(pdu.function_code),
                    int(getattr(pdu, "address", -1)),
                    int(getattr(pdu, "count", 0)),
                )
            )
        return pdu

    def _apply_curves(self, t: float) -> None:
        for dev in self.devices.values():
            for name, curve in dev.curves.items():
                self.set_value(dev.unit_id, name, curve(t))

    async def _run_curves(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_curves(loop.time() - self._t0)
            await asyncio.sleep(self.tick)

    async def start(self) -> None:
        """Start serving (in the running loop); sets :attr:`port` when it was 0."""
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        context = ModbusServerContext(
            devices={u: d.context for u, d in self.devices.items()}, single=False
        )
        self._context = context
        if self.serial_port is not None:
            self._server = ModbusSerialServer(
                context,
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                trace_pdu=self._trace,
            )
        else:
            self._server = ModbusTcpServer(
                context, address=(self.host, self.port), trace_pdu=self._trace
            )
        await self._server.serve_forever(background=True)
        if self.serial_port is None and self.port == 0:
            self.port = int(self._server.transport.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._t0 = asyncio.get_running_loop().time()
        self._apply_curves(0.0)
        self._task = asyncio.create_task(self._run_curves(), name="sim-curves")

    async def stop(self) -> None:
        """Stop serving and close all connections."""
        if self._task is not None:
            self._task.cancel()
        if self._server is not None:
            await self._server.shutdown()

    def start_thread(self) -> None:
        """Run the server on its own thread and loop (for synchronous callers)."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="modbus-sim", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("simulator did not start")

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the simulator's thread (thread-safe register changes)."""
        assert self._loop is not None
        done = threading.Event()

        def wrapped() -> None:
            fn()
            done.set()

        self._loop.call_soon_threadsafe(wrapped)
        done.wait(5)

    def stop_thread(self) -> None:
        """Stop a server started with :meth:`start_thread`."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


# -- realistic curves for the demo ---------------------------------------------------------


def flood_level(t: float, base: float = 0.08, rise: float = 0.9, tau: float = 120.0) -> float:
    """A rainstorm flood: level (m) rising from ``base`` towards ``base + rise`` with time
    constant ``tau`` (s), with a small surface ripple."""
    return base + rise * (1 - math.exp(-t / tau)) + 0.004 * math.sin(2.1 * t)


def gas_pressure(t: float, setpoint: float = 300.0) -> float:
    """Medium-pressure main downstream of a regulator (kPa): slow demand swing around the
    regulator setpoint."""
    return setpoint + 6.0 * math.sin(2 * math.pi * t / 60.0) + 0.4 * math.sin(7.3 * t)
