"""Config models of the Modbus driver: points, devices and device profiles.

Addresses are zero-based PDU addresses as sent on the wire (Modbus Application Protocol
V1.1b3, clause 4.3): a register a manual calls "40001" or "register 1" is ``address: 0``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from drivers.codec import REGISTER_COUNT, ByteOrder, DataType
from drivers.common import Duration, StrictModel, at_least

Table = Literal["holding", "input", "coil", "discrete_input"]
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

MAX_REGISTERS_PER_READ = 125
"""FC 03/04 read at most 125 registers (Modbus Application Protocol V1.1b3, 6.3 and 6.4)."""
MAX_BITS_PER_READ = 2000
"""FC 01/02 read at most 2000 bits (Modbus Application Protocol V1.1b3, 6.1 and 6.2)."""


class ModbusPoint(StrictModel):
    """One measured quantity of a Modbus device.

    ``type`` defaults to ``bool`` for coils and discrete inputs and to ``uint16`` for
    registers. ``count`` may be given for documentation, but it must equal the register count
    of ``type`` (a float32 needs exactly 2 registers): a mismatch is a config error, never a
    zero-filled read.
    """

    name: Name = Field(description="Point name, unique within the device")
    table: Table = Field(
        default="holding",
        description="holding (FC 03), input (FC 04), coil (FC 01) or discrete_input (FC 02)",
    )
    address: int = Field(ge=0, le=65535, description="Zero-based PDU address")
    type: DataType | None = Field(default=None, description="Data type of the value")
    byte_order: ByteOrder = Field(default="ABCD", description="ABCD, CDAB, BADC or DCBA")
    count: int | None = Field(
        default=None, ge=1, le=4, description="Registers used; derived from type when omitted"
    )
    scale: int | float = Field(
        default=1, allow_inf_nan=False, description="value = raw × scale + offset"
    )
    offset: int | float = Field(
        default=0, allow_inf_nan=False, description="value = raw × scale + offset"
    )
    decimals: int | None = Field(default=None, ge=0, le=9, description="Round to N decimals")
    unit: str | None = Field(default=None, max_length=32, description="Engineering unit")
    description: str | None = Field(default=None, description="Free text for people")

    @model_validator(mode="after")
    def _check_type(self) -> ModbusPoint:
        is_bit = self.table in BIT_TABLES
        dtype = self.type
        if dtype is None:
            object.__setattr__(self, "type", "bool" if is_bit else "uint16")
            dtype = self.type
        if is_bit and dtype != "bool":
            raise ValueError(f"a {self.table} holds one bit: type must be 'bool', not {dtype!r}")
        if not is_bit and dtype == "bool":
            raise ValueError(
                f"{self.table} registers hold 16-bit words: use an integer type, not 'bool'"
            )
        need = self.register_count
        if self.count is not None and self.count != need:
            raise ValueError(
                f"count {self.count} does not match type {dtype} (needs exactly {need}); "
                "remove 'count' or fix the type"
            )
        if self.address + need - 1 > 65535:
            raise ValueError(f"address {self.address} + {need} register(s) runs past 65535")
        return self

    @property
    def register_count(self) -> int:
        """Registers (or bits, for bit tables) this point occupies."""
        return 1 if self.type in (None, "bool") else REGISTER_COUNT[self.type]


def _check_unique_names(points: list[ModbusPoint], where: str) -> None:
    """Raise ``duplicate_point`` with the index of the second occurrence in ``ctx`` (so a
    config loader can point at that point's line)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(points):
        if p.name in seen:
            raise PydanticCustomError(
                "duplicate_point",
                "point name '{name}' appears twice in {where} (also points[{first}])",
                {"name": p.name, "where": where, "index": i, "first": seen[p.name]},
            )
        seen[p.name] = i


class ModbusProfile(StrictModel):
    """A device model's register map, shared by every device of that model."""

    name: Name
    description: str = Field(description="Which kind of device this models and its source")
    points: list[ModbusPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ModbusProfile:
        _check_unique_names(self.points, f"profile {self.name!r}")
        return self


class ModbusTcpDevice(StrictModel):
    """A Modbus device reached over TCP (a native Modbus TCP device or a TCP-to-RS-485
    converter; devices sharing ``host:port`` share one connection, the bus)."""

    id: Name = Field(description="Device id, unique on the gateway; used in MQTT topics")
    driver: Literal["modbus_tcp"] = "modbus_tcp"
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=1, le=247, description="Modbus unit id (1–247)")
    poll_interval: Annotated[Duration, at_least("50ms")] = Field(
        default=1.0, description="e.g. '200ms', '1s', '1min'"
    )
    timeout: Annotated[Duration, at_least("10ms")] = Field(
        default=1.0, description="Response timeout per request"
    )
    profile: Name | None = Field(default=None, description="Register map from the profile dir")
    points: list[ModbusPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ModbusTcpDevice:
        if self.profile is None and not self.points:
            raise ValueError("a device needs 'points' or a 'profile'")
        _check_unique_names(self.points, f"device {self.id!r}")
        return self

    @property
    def bus(self) -> str:
        """The bus this device sits on: its TCP endpoint."""
        return f"tcp://{self.host}:{self.port}"
