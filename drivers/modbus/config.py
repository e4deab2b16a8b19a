"""Config models of the Modbus driver: points, devices and device profiles.

Addresses are zero-based PDU addresses as sent on the wire (Modbus Application Protocol
V1.1b3, clause 4.3): a register a manual calls "40001" or "register 1" is ``address: 0``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from drivers.codec import REGISTER_COUNT, ByteOrder, DataType
from drivers.common import DisplayName, Duration, HostName, Name, StrictModel, at_least
from drivers.modbus.line import min_frame_gap
from drivers.modbus.spec import BIT_TABLES, MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ, Table

__all__ = ["BIT_TABLES", "MAX_BITS_PER_READ", "MAX_REGISTERS_PER_READ", "Table"]


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
    bit: int | None = Field(
        default=None, ge=0, le=15, description="For type bit: 0 = least significant bit"
    )
    invalid_values: list[int] = Field(
        default_factory=list,
        description="Raw values the device sends for 'no value' (e.g. 0x7FFF, 0x80000000), "
        "compared before scaling; such a reading has quality 'invalid'",
    )
    decimal_point: int | Name | None = Field(
        default=None,
        description="Divide by 10^n: n given here (0..9), or the name of the device's point "
        "(register) that holds n, as many level and pressure transmitters have",
    )
    counter: bool = Field(
        default=False,
        description="A running total (uint16/32/64): each reading also carries 'delta', the "
        "increase since the previous poll, across roll-over and device resets",
    )
    max_delta: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Counter points: the largest believable increase between two polls; "
        "a larger one gives quality 'counter_jump' and no delta, and counting goes on "
        "from the new value",
    )
    length: int | None = Field(
        default=None, ge=1, le=250, description="For type string: characters (2 per register)"
    )
    writable: bool = Field(
        default=False,
        description="The platform may write this point with the 'write' command (a coil, or "
        "a holding register of a numeric type; needs 'min' and 'max' for registers)",
    )
    min: int | float | None = Field(
        default=None, allow_inf_nan=False, description="Writable points: least value written"
    )
    max: int | float | None = Field(
        default=None, allow_inf_nan=False, description="Writable points: greatest value written"
    )
    modicon: str | None = Field(
        default=None,
        alias="register",
        description="Modicon register number instead of table+address: 40001 / 400001 "
        "(holding), 30001 (input), 10001 (discrete input), 00001 (coil)",
    )

    @model_validator(mode="before")
    @classmethod
    def _modicon(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("register") is None:
            return data
        if "address" in data or "table" in data:
            raise ValueError("give either 'register' (Modicon number) or 'table' + 'address'")
        table, address = modicon_address(data["register"])
        return {**data, "register": str(data["register"]), "table": table, "address": address}

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
                f"{self.table} registers hold 16-bit words: use an integer type, or type "
                "'bit' with 'bit: 0..15' for one bit of a register"
            )
        if (dtype == "bit") != (self.bit is not None):
            raise ValueError(
                "type 'bit' needs 'bit: 0..15' (0 = least significant), and 'bit' needs type 'bit'"
            )
        if self.invalid_values and dtype in ("bool", "bit", "string"):
            raise ValueError("invalid_values apply to numeric register types only")
        if (dtype == "string") != (self.length is not None):
            raise ValueError(
                "type 'string' needs 'length' (characters), and 'length' needs type 'string'"
            )
        if self.counter and (
            dtype not in ("uint16", "uint32", "uint64") or self.scale != 1 or self.offset != 0
        ):
            raise ValueError("counter: true needs an unscaled uint16, uint32 or uint64 point")
        if self.max_delta is not None and not self.counter:
            raise ValueError("max_delta applies to counter points only (counter: true)")
        if isinstance(self.decimal_point, int) and not 0 <= self.decimal_point <= 9:
            raise ValueError(f"decimal_point {self.decimal_point} is outside 0..9")
        if self.decimal_point is not None and dtype in ("bool", "bit", "string"):
            raise ValueError("decimal_point applies to numeric register types only")
        if dtype == "string" and (self.scale != 1 or self.offset != 0 or self.decimals):
            raise ValueError("scale, offset and decimals do not apply to type 'string'")
        need = self.register_count
        if self.count is not None and self.count != need:
            raise ValueError(
                f"count {self.count} does not match type {dtype} (needs exactly {need}); "
                "remove 'count' or fix the type"
            )
        if self.address + need - 1 > 65535:
            raise ValueError(f"address {self.address} + {need} register(s) runs past 65535")
        self._check_writable()
        return self

    def _check_writable(self) -> None:
        """``writable``: a coil (FC 5), or a holding register (FC 6/16) of a numeric type
        with ``min`` ≤ ``max`` in engineering units (Modbus Application Protocol V1.1b3,
        6.5, 6.6, 6.12); no register holding a bit, text, a counter or a decimal-point
        reference (a write could not be read back the way it was meant)."""
        limits = self.min is not None or self.max is not None
        if not self.writable:
            if limits:
                raise ValueError("'min' and 'max' limit writes: they need 'writable: true'")
            return
        if self.table == "coil":
            if limits:
                raise ValueError("a writable coil is on or off: leave out 'min' and 'max'")
            return
        if self.table != "holding":
            raise ValueError(
                f"a {self.table} cannot be written (Modbus writes coils and holding "
                "registers only): remove 'writable'"
            )
        if self.type in ("bit", "string") or self.counter or self.decimal_point is not None:
            raise ValueError(
                "writable registers hold a plain number: not type bit or string, not a "
                "counter, no decimal_point"
            )
        if self.min is None or self.max is None:
            raise ValueError(
                "a writable register needs 'min' and 'max' (engineering units): the "
                "'write' command refuses values outside them"
            )
        if self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")

    __plain_computed__: ClassVar[tuple[str, ...]] = ("register_count",)

    @property
    def register_count(self) -> int:
        """Registers (or bits, for bit tables) this point occupies."""
        if self.type == "string":
            return -(-(self.length or 0) // 2)
        return 1 if self.type in (None, "bool", "bit") else REGISTER_COUNT[self.type]


_MODICON_TABLES = {"0": "coil", "1": "discrete_input", "3": "input", "4": "holding"}


def modicon_address(register: object) -> tuple[str, int]:
    """Turn a Modicon register number into ``(table, zero-based PDU address)``.

    ``40001`` (5 digits: 1–9999) and ``400001`` (6 digits: 1–65536) are holding register 1,
    PDU address 0; the first digit names the table (0 coil, 1 discrete input, 3 input
    register, 4 holding register). Source: Modicon convention as described in the Modbus
    Application Protocol V1.1b3, clause 4.4 ("Modbus Addressing model": data element
    numbered X is addressed in the PDU as X-1).

    Raises:
        ValueError: not a 5- or 6-digit number with a known first digit, or number 0.
    """
    text = str(register).strip()
    if isinstance(register, int) and not isinstance(register, bool) and 0 < register < 10000:
        text = f"{register:05d}"  # YAML drops the leading zeros of coil numbers 00001..09999
    if not text.isdigit() or len(text) not in (5, 6) or text[0] not in _MODICON_TABLES:
        raise ValueError(
            f"register {register!r} is not a Modicon number: write 5 or 6 digits starting "
            "with 4 (holding), 3 (input), 1 (discrete input) or 0 (coil), e.g. '40001'"
        )
    number = int(text[1:])
    limit = 9999 if len(text) == 5 else 65536
    if number == 0:
        raise ValueError(
            f"register {register!r}: Modicon numbers count from 1 (here 1..{limit}); "
            f"{text[0]}{'0' * (len(text) - 1)} does not exist"
        )
    if number > limit:
        highest = f"{text[0]}{limit:0{len(text) - 1}d}"
        raise ValueError(f"register {register!r} is past the last one, {highest}")
    return _MODICON_TABLES[text[0]], number - 1


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


def check_decimal_point_refs(points: list[ModbusPoint], where: str) -> None:
    """A ``decimal_point`` that names a point must name an integer point of the same
    device (or profile)."""
    by_name = {p.name: p for p in points}
    for p in points:
        ref = p.decimal_point
        if isinstance(ref, str):
            target = by_name.get(ref)
            if target is None or target.type not in ("uint16", "int16"):
                raise ValueError(
                    f"point {p.name!r}: decimal_point {ref!r} must name a uint16/int16 point "
                    f"of {where}"
                )


class ModbusProfile(StrictModel):
    """A device model's register map, shared by every device of that model."""

    name: Name
    description: str = Field(description="Which kind of device this models and its source")
    address_base: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Added to every point's address, for maps written relative to a base "
        "the device lets you configure (e.g. 'Base + 207'); a device may set its own",
    )
    points: list[ModbusPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ModbusProfile:
        _check_unique_names(self.points, f"profile {self.name!r}")
        check_decimal_point_refs(self.points, f"profile {self.name!r}")
        return self


MAX_RETRIES = 5
RETRIES_HELP = (
    "Times a request is sent again within one poll after a timeout, CRC or frame error, if "
    "the device answered its previous poll and the retry can end within the poll interval"
)


class ModbusDevice(StrictModel):
    """What every Modbus device has, whatever its transport."""

    id: Name = Field(description="Device id, unique on the gateway; used in MQTT topics")
    name: DisplayName | None = Field(
        default=None, description="Text for people (any Unicode); in payloads, never in topics"
    )
    unit_id: int = Field(default=1, ge=1, le=247, strict=True, description="Modbus unit id (1–247)")
    poll_interval: Annotated[Duration, at_least("50ms")] = Field(
        default=1.0, description="e.g. '200ms', '1s', '1min'"
    )
    timeout: Annotated[Duration, at_least("10ms")] = Field(
        default=1.0, description="Response timeout per request"
    )
    retries: int = Field(
        default=0,
        ge=0,
        le=MAX_RETRIES,
        strict=True,
        description=RETRIES_HELP + "; default 0 on Modbus TCP",
    )
    profile: Name | None = Field(default=None, description="Register map from the profile dir")
    points: list[ModbusPoint] = Field(default_factory=list)
    max_gap: int = Field(
        default=0,
        ge=0,
        le=MAX_REGISTERS_PER_READ - 2,
        description="Unused registers a request may span to read neighbouring points together "
        "(0: never ask for an address no point names)",
    )
    max_registers: int = Field(
        default=MAX_REGISTERS_PER_READ,
        ge=1,
        le=MAX_REGISTERS_PER_READ,
        description="Most registers per request, for devices that accept fewer than 125",
    )

    overrides: dict[Name, dict[str, Any]] = Field(
        default_factory=dict,
        description="Changes to points of the profile: {point name: {key: value, ...}}",
    )
    omit: list[Name] = Field(
        default_factory=list, description="Points of the profile this device does not have"
    )
    address_base: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="This device's base address, when it differs from its profile's",
    )

    @model_validator(mode="after")
    def _check(self) -> ModbusDevice:
        if self.profile is None and not self.points:
            raise ValueError("a device needs 'points' or a 'profile'")
        if self.profile is None and (self.overrides or self.omit or self.address_base is not None):
            raise ValueError(
                "'overrides', 'omit' and 'address_base' change a profile: name one with 'profile'"
            )
        _check_unique_names(self.points, f"device {self.id!r}")
        check_decimal_point_refs(self.points, f"device {self.id!r}")
        for p in self.points:
            if p.table not in BIT_TABLES and p.register_count > self.max_registers:
                raise ValueError(
                    f"point {p.name!r} needs {p.register_count} registers but max_registers "
                    f"is {self.max_registers}: one request cannot read it"
                )
        return self

    @property
    def bus(self) -> str:
        """The bus this device sits on; devices with the same bus share one connection."""
        raise NotImplementedError


class ModbusTcpDevice(ModbusDevice):
    """A Modbus device reached over TCP (a native Modbus TCP device or a TCP-to-RS-485
    converter; devices sharing ``host:port`` share one connection, the bus)."""

    driver: Literal["modbus_tcp"] = "modbus_tcp"
    host: HostName
    port: int = Field(default=502, ge=1, le=65535)

    __plain_computed__: ClassVar[tuple[str, ...]] = ("bus",)

    @property
    def bus(self) -> str:
        """The bus this device sits on: its TCP endpoint."""
        return f"tcp://{self.host}:{self.port}"


Baudrate = Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]


class _LineOptions(StrictModel):
    """Framing and timing of a half-duplex Modbus line (serial, or RTU over TCP)."""

    framing: Literal["rtu", "ascii"] = Field(
        default="rtu", description="rtu (binary, CRC) or ascii (':' hex LRC CR LF)"
    )
    frame_gap: Duration | None = Field(
        default=None,
        description="Silence kept before each request; default and floor 3.5 character times "
        "(1.75 ms above 19200 baud); longer for slow devices",
    )
    connect_pause: Annotated[Duration, at_least("0s")] = Field(
        default=0.0, description="Silence after opening the port before the first request"
    )


class ModbusRtuDevice(ModbusDevice, _LineOptions):
    """A Modbus RTU (or ASCII) device on a serial line (RS-485 adapter). Devices on one
    ``serial_port`` share the line and must agree on its settings (Modbus over Serial Line
    V1.02, 2.5.1: 8 data bits, even parity by default; many sensors ship 9600 8N1)."""

    driver: Literal["modbus_rtu"]
    retries: int = Field(
        default=1,
        ge=0,
        le=MAX_RETRIES,
        strict=True,
        description=RETRIES_HELP + "; default 1 on a serial line",
    )
    serial_port: str = Field(
        min_length=1,
        description="Serial device (/dev/ttyUSB0, /dev/serial/by-id/...) or pyserial URL "
        "(rfc2217://host:port, spy:///dev/ttyUSB0)",
    )
    baudrate: Baudrate = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    local_echo: bool = Field(
        default=False,
        description="The adapter echoes each request (two-wire RS-485 with the receiver on)",
    )

    @model_validator(mode="after")
    def _gap(self) -> ModbusRtuDevice:
        floor = min_frame_gap(self.baudrate, self.parity, self.stopbits, self.bytesize)
        if self.frame_gap is not None and self.frame_gap < floor - 1e-9:
            raise ValueError(
                f"frame_gap {self.frame_gap * 1000:g}ms is shorter than 3.5 character times at "
                f"{self.baudrate} baud ({floor * 1000:.2f}ms): leave it out or make it longer"
            )
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("bus", "line_settings")

    @property
    def bus(self) -> str:
        """The bus this device sits on: its serial port."""
        return f"serial:{self.serial_port}"

    @property
    def line_settings(self) -> tuple[object, ...]:
        """Settings every device of one line must share: (baudrate, parity, stopbits,
        bytesize, framing, local_echo)."""
        return (
            self.baudrate,
            self.parity,
            self.stopbits,
            self.bytesize,
            self.framing,
            self.local_echo,
        )


class ModbusRtuOverTcpDevice(ModbusDevice, _LineOptions):
    """A Modbus RTU (or ASCII) device behind a serial device server that passes RTU frames
    through a TCP port unchanged ("transparent" mode, no Modbus TCP conversion). Devices
    behind one ``host:port`` share its RS-485 line: one request at a time."""

    driver: Literal["modbus_rtu_over_tcp"]
    retries: int = Field(
        default=1,
        ge=0,
        le=MAX_RETRIES,
        strict=True,
        description=RETRIES_HELP + "; default 1 on a serial line",
    )
    host: HostName
    port: int = Field(ge=1, le=65535, description="The server's raw TCP port for the line")

    __plain_computed__: ClassVar[tuple[str, ...]] = ("bus", "line_settings")

    @property
    def bus(self) -> str:
        """The bus this device sits on: the server's TCP endpoint."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def line_settings(self) -> tuple[object, ...]:
        """Settings every device behind one endpoint must share: (framing,)."""
        return (self.framing,)
