"""Pure, byte-based decoding of Modbus register values.

Every function here works on the bytes as they travel on the wire, never on host-endian
integers, so results are identical on ARM (Raspberry Pi) and x86.

Register layout (Modbus Application Protocol Specification V1.1b3, clause 4.2 "Data
Encoding"): each 16-bit register travels big-endian, high byte first. How a device spreads a
multi-register value across registers is vendor-specific; it is named here by the order in
which the value's bytes appear on the wire, with ``A`` the most significant byte:

========  ======================================  =====================================
order     wire bytes of a 32-bit value            also called
========  ======================================  =====================================
``ABCD``  A B C D                                 big-endian, high word first
``CDAB``  C D A B                                 word swap, low word first
``BADC``  B A D C                                 byte swap within each register
``DCBA``  D C B A                                 little-endian
========  ======================================  =====================================

For 16-bit types only the byte swap matters (``ABCD``/``CDAB`` read ``AB``; ``BADC``/``DCBA``
read ``BA``). For 64-bit types the same rule extends to four registers: ``CDAB`` reverses the
register order, ``BADC`` swaps the bytes inside each register.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Final, Literal

DataType = Literal[
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float32",
    "uint64",
    "int64",
    "float64",
    "bool",
    "bit",
    "string",
]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

REGISTER_COUNT: Final[dict[str, int]] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
    "uint64": 4,
    "int64": 4,
    "float64": 4,
}
"""Number of 16-bit registers each register data type occupies."""

_STRUCT: Final[dict[str, str]] = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
    "uint64": ">Q",
    "int64": ">q",
    "float64": ">d",
}

Value = int | float | bool


class DecodeError(ValueError):
    """Registers cannot be decoded as the configured type (wrong count, bad value range)."""


def registers_to_bytes(registers: Sequence[int]) -> bytes:
    """Return the wire bytes of ``registers`` (each 0..65535, sent high byte first).

    Raises:
        DecodeError: a register is outside 0..65535.
    """
    try:
        return struct.pack(f">{len(registers)}H", *registers)
    except struct.error as exc:
        raise DecodeError(f"register value out of range 0..65535 in {list(registers)}") from exc


def to_big_endian(wire: bytes, byte_order: ByteOrder) -> bytes:
    """Reorder wire bytes of a multi-register value into big-endian (``ABCD``) order.

    Args:
        wire: the bytes as received, an even number of them.
        byte_order: how the device lays the value out (see the module table).
    Returns:
        the same bytes, most significant first.
    """
    if byte_order == "ABCD":
        return wire
    words = [wire[i : i + 2] for i in range(0, len(wire), 2)]
    if byte_order == "CDAB":
        return b"".join(reversed(words))
    if byte_order == "BADC":
        return b"".join(w[::-1] for w in words)
    return wire[::-1]  # DCBA


def decode_registers(
    registers: Sequence[int], data_type: DataType, byte_order: ByteOrder = "ABCD"
) -> int | float:
    """Decode the raw value of one point from its registers.

    Args:
        registers: exactly ``REGISTER_COUNT[data_type]`` register values (0..65535).
        data_type: one of the register types in :data:`REGISTER_COUNT`. ``float32`` and
            ``float64`` are IEEE 754 binary32/binary64, never scaled integers.
        byte_order: ``ABCD``, ``CDAB``, ``BADC`` or ``DCBA``.
    Returns:
        an ``int`` for integer types, a ``float`` for IEEE types (may be NaN or ±Inf).
    Raises:
        DecodeError: the register count does not match the type (no zero-padding, ever),
            or the type is not a register type.
    """
    return decode_bytes(registers_to_bytes(registers), data_type, byte_order)


STRUCT_CODES: Final = {name: fmt[1:] for name, fmt in _STRUCT.items()}
"""Register type → its :mod:`struct` format character (big-endian when after ``>``)."""

_UNPACK = {name: struct.Struct(fmt).unpack for name, fmt in _STRUCT.items()}
UNPACK_FROM: Final = {name: struct.Struct(fmt).unpack_from for name, fmt in _STRUCT.items()}
"""Register type → ``unpack_from(buffer, offset)`` of its big-endian (``ABCD``) bytes: what
:func:`decode_bytes` does, for callers that read many points from one block's bytes."""


def decode_bytes(wire: bytes, data_type: DataType, byte_order: ByteOrder = "ABCD") -> int | float:
    """Decode one point from its wire bytes (2 per register, as received).

    Same contract as :func:`decode_registers`, for callers that hold a whole block's bytes.

    Raises:
        DecodeError: the byte count does not match the type, or not a register type.
    """
    unpack = _UNPACK.get(data_type)
    if unpack is None:
        raise DecodeError(f"type {data_type!r} is not a register type")
    need = REGISTER_COUNT[data_type]
    if len(wire) != 2 * need:
        raise DecodeError(f"{data_type} needs exactly {need} register(s), got {len(wire) / 2:g}")
    if byte_order != "ABCD":
        wire = to_big_endian(wire, byte_order)
    value: int | float = unpack(wire)[0]
    return value


def scale_value(
    raw: int | float, scale: int | float = 1, offset: int | float = 0, decimals: int | None = None
) -> int | float:
    """Apply ``value = raw × scale + offset`` the same way for every numeric type.

    The result stays an ``int`` only when ``raw``, ``scale`` and ``offset`` are all integers;
    any fractional factor yields a ``float`` (the fraction is never truncated back to the
    input type). ``decimals`` rounds the result (``round`` half-to-even on the binary value),
    so ``-1021 × 0.1`` is published as ``-102.1``.
    """
    if isinstance(raw, int) and isinstance(scale, int) and isinstance(offset, int):
        return raw * scale + offset
    value = float(raw) * scale + offset
    if decimals is not None and math.isfinite(value):
        value = round(value, decimals)
    return value


def non_finite_quality(value: float) -> str | None:
    """Return ``"nan"`` or ``"inf"`` for a non-finite float, ``None`` for a usable value.

    JSON (RFC 8259, section 6) has no token for NaN or infinity, so such a value must be
    published as ``null`` with a bad quality instead.
    """
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return None


def encode_registers(
    value: int | float, data_type: DataType, byte_order: ByteOrder = "ABCD"
) -> list[int]:
    """Inverse of :func:`decode_registers`: the register values a device would hold.

    Used by simulators and tests. Integers are range-checked by :mod:`struct`.

    Raises:
        DecodeError: the type is not a register type or the value does not fit.
    """
    fmt = _STRUCT.get(data_type)
    if fmt is None:
        raise DecodeError(f"type {data_type!r} is not a register type")
    try:
        big = struct.pack(fmt, value)
    except struct.error as exc:
        raise DecodeError(f"{value!r} does not fit {data_type}: {exc}") from exc
    # every reordering above is its own inverse
    wire = to_big_endian(big, byte_order)
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


BYTE_ORDERS: Final[tuple[ByteOrder, ...]] = ("ABCD", "CDAB", "BADC", "DCBA")


def decode_all(registers: Sequence[int]) -> list[tuple[str, dict[str, int | float]]]:
    """Every register type that fits in ``registers`` (read from the first one), decoded in
    every byte order: ``[(type, {order: value})]``. For matching a known reading on a
    device's display against raw registers (the technician's decode explorer).

    16-bit types only distinguish ``ABCD`` (as sent) from ``BADC`` (bytes swapped); their
    ``CDAB``/``DCBA`` entries equal those.

    Raises:
        DecodeError: a register is outside 0..65535.
    """
    wire = registers_to_bytes(registers)
    rows: list[tuple[str, dict[str, int | float]]] = []
    for dtype, count in REGISTER_COUNT.items():
        if count > len(registers):
            continue
        part = wire[: 2 * count]
        rows.append(
            (dtype, {order: decode_bytes(part, dtype, order) for order in BYTE_ORDERS})  # type: ignore[arg-type]
        )
    return rows


def raw_pattern(wire: bytes, byte_order: ByteOrder = "ABCD") -> int:
    """The unsigned bit pattern of a value (its bytes reordered to big-endian), as vendors
    write their "no value" markers: ``0x7FFF``, ``0xFFFF``, ``0x80000000``."""
    return int.from_bytes(to_big_endian(wire, byte_order) if byte_order != "ABCD" else wire, "big")


def register_bit(wire: bytes, bit: int, byte_order: ByteOrder = "ABCD") -> bool:
    """Bit ``bit`` (0 = least significant) of one register, after the register's own byte
    order (``BADC``/``DCBA`` swap its two bytes) is applied.

    Raises:
        DecodeError: not exactly one register, or ``bit`` outside 0..15.
    """
    if len(wire) != 2:
        raise DecodeError(f"a bit point reads exactly 1 register, got {len(wire) / 2:g}")
    if not 0 <= bit <= 15:
        raise DecodeError(f"bit {bit} is outside 0..15")
    return bool((raw_pattern(wire, byte_order) >> bit) & 1)


def decode_string(wire: bytes, byte_order: ByteOrder = "ABCD") -> str:
    """Text held in registers, two characters per register, first character in the high
    byte (``ABCD``, as most devices send it) or the low byte (``BADC``). ``CDAB``/``DCBA``
    also reverse the register order, and apply only when a point asks for them: a device's
    numeric word order never applies to text. Trailing NULs and spaces are removed; bytes
    that are not UTF-8 become U+FFFD."""
    if byte_order != "ABCD":
        wire = to_big_endian(wire, byte_order)
    return wire.split(b"\0", 1)[0].decode("utf-8", errors="replace").rstrip()
