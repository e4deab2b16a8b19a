"""What kind of device a config object describes, told by its values (its ``driver``),
so that the same test holds for a validated model and for its plain twin in the running
agent (:mod:`drivers.plain`). No pydantic here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from drivers.modbus.config import (
        ModbusDevice,
        ModbusRtuDevice,
        ModbusRtuOverTcpDevice,
        ModbusTcpDevice,
    )
    from drivers.seismic_config import SeismicDevice
    from drivers.serial_config import SerialLineDevice

MODBUS_DRIVERS = frozenset({"modbus_tcp", "modbus_rtu", "modbus_rtu_over_tcp"})


def driver_of(dev: Any) -> str:
    """A device's ``driver`` (``modbus_tcp`` when left out: the default)."""
    return str(getattr(dev, "driver", ""))


def is_modbus(dev: Any) -> TypeGuard[ModbusDevice]:
    """A Modbus device, whatever its transport."""
    return driver_of(dev) in MODBUS_DRIVERS


def is_modbus_tcp(dev: Any) -> TypeGuard[ModbusTcpDevice]:
    """A Modbus TCP device."""
    return driver_of(dev) == "modbus_tcp"


def is_modbus_rtu(dev: Any) -> TypeGuard[ModbusRtuDevice]:
    """A Modbus RTU/ASCII device on a serial port."""
    return driver_of(dev) == "modbus_rtu"


def is_modbus_rtu_over_tcp(dev: Any) -> TypeGuard[ModbusRtuOverTcpDevice]:
    """A Modbus RTU/ASCII device behind a transparent serial device server."""
    return driver_of(dev) == "modbus_rtu_over_tcp"


def on_a_line(dev: Any) -> TypeGuard[ModbusRtuDevice | ModbusRtuOverTcpDevice]:
    """A Modbus device on a half-duplex line (serial, or RTU over TCP)."""
    return driver_of(dev) in ("modbus_rtu", "modbus_rtu_over_tcp")


def is_serial_line(dev: Any) -> TypeGuard[SerialLineDevice]:
    """A text-line sensor on a serial port."""
    return driver_of(dev) == "serial_line"


def is_seismic(dev: Any) -> TypeGuard[SeismicDevice]:
    """A strong-motion sensor."""
    return driver_of(dev) == "seismic"
