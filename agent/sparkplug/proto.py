"""The Sparkplug B payload as protobuf messages, built from descriptors at import.

Source: Eclipse Sparkplug Specification v3.0.0, chapter 6 "Payloads" (6.4, Sparkplug B
payload definition: ``Payload``, ``Payload.Metric``, ``Payload.PropertySet``,
``Payload.PropertyValue``; field names, numbers and types as the specification's
``sparkplug_b.proto``, package ``org.eclipse.tahu.protobuf``, proto2). Only the members this
agent reads or writes are declared: a decoder built from the full ``.proto`` reads these
messages unchanged, and members not declared here (templates, data sets, metadata) are kept
as unknown fields when a message carrying them is parsed.

The messages are built with the ``protobuf`` package's descriptor API, so that no generated
code has to be kept in step with the installed runtime. Importing this module imports
``google.protobuf``: only the ``sparkplug_b`` format does (``agent.sparkplug.node``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"

# Sparkplug data types (specification 6.4.16, "Data Types")
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12

QUALITY_BAD = 0
QUALITY_GOOD = 192
"""Values of the ``Quality`` property (specification 6.4.9, "Quality Codes": 0 BAD,
192 GOOD, 500 STALE; a property value of type Int32 in ``int_value``)."""

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_FIELDS: dict[str, list[tuple[str, int, int, int, str | None, int | None]]] = {
    # (name, number, label, type, message type, oneof index)
    "PropertyValue": [
        ("type", 1, _OPT, _F.TYPE_UINT32, None, None),
        ("is_null", 2, _OPT, _F.TYPE_BOOL, None, None),
        ("int_value", 3, _OPT, _F.TYPE_UINT32, None, 0),
        ("long_value", 4, _OPT, _F.TYPE_UINT64, None, 0),
        ("float_value", 5, _OPT, _F.TYPE_FLOAT, None, 0),
        ("double_value", 6, _OPT, _F.TYPE_DOUBLE, None, 0),
        ("boolean_value", 7, _OPT, _F.TYPE_BOOL, None, 0),
        ("string_value", 8, _OPT, _F.TYPE_STRING, None, 0),
        ("propertyset_value", 9, _OPT, _F.TYPE_MESSAGE, "PropertySet", 0),
    ],
    "PropertySet": [
        ("keys", 1, _REP, _F.TYPE_STRING, None, None),
        ("values", 2, _REP, _F.TYPE_MESSAGE, "PropertyValue", None),
    ],
    "Metric": [
        ("name", 1, _OPT, _F.TYPE_STRING, None, None),
        ("alias", 2, _OPT, _F.TYPE_UINT64, None, None),
        ("timestamp", 3, _OPT, _F.TYPE_UINT64, None, None),
        ("datatype", 4, _OPT, _F.TYPE_UINT32, None, None),
        ("is_historical", 5, _OPT, _F.TYPE_BOOL, None, None),
        ("is_transient", 6, _OPT, _F.TYPE_BOOL, None, None),
        ("is_null", 7, _OPT, _F.TYPE_BOOL, None, None),
        ("properties", 9, _OPT, _F.TYPE_MESSAGE, "PropertySet", None),
        ("int_value", 10, _OPT, _F.TYPE_UINT32, None, 0),
        ("long_value", 11, _OPT, _F.TYPE_UINT64, None, 0),
        ("float_value", 12, _OPT, _F.TYPE_FLOAT, None, 0),
        ("double_value", 13, _OPT, _F.TYPE_DOUBLE, None, 0),
        ("boolean_value", 14, _OPT, _F.TYPE_BOOL, None, 0),
        ("string_value", 15, _OPT, _F.TYPE_STRING, None, 0),
        ("bytes_value", 16, _OPT, _F.TYPE_BYTES, None, 0),
    ],
}


def _build() -> Any:
    file = descriptor_pb2.FileDescriptorProto(
        name="lifeline_sparkplug_b.proto", package=PACKAGE, syntax="proto2"
    )
    payload = file.message_type.add(name="Payload")
    for name, fields in _FIELDS.items():
        msg = payload.nested_type.add(name=name)
        if any(f[5] is not None for f in fields):
            msg.oneof_decl.add(name="value")
        for fname, number, label, ftype, type_name, oneof in fields:
            field = msg.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name is not None:
                field.type_name = f".{PACKAGE}.Payload.{type_name}"
            if oneof is not None:
                field.oneof_index = oneof
    for fname, number, label, ftype, type_name in (
        ("timestamp", 1, _OPT, _F.TYPE_UINT64, None),
        ("metrics", 2, _REP, _F.TYPE_MESSAGE, "Metric"),
        ("seq", 3, _OPT, _F.TYPE_UINT64, None),
        ("uuid", 4, _OPT, _F.TYPE_STRING, None),
        ("body", 5, _OPT, _F.TYPE_BYTES, None),
    ):
        field = payload.field.add(name=fname, number=number, label=label, type=ftype)
        if type_name is not None:
            field.type_name = f".{PACKAGE}.Payload.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


Payload: Any = _build()
"""The ``Payload`` message class (``Payload()``, ``.SerializeToString()``,
``Payload.FromString(data)``)."""


def set_value(metric: Any, datatype: int, value: int | float | bool | str) -> None:
    """Put ``value`` into the member of ``metric`` that carries ``datatype``
    (specification 6.4.16: Int8–Int32 and UInt8–UInt32 in ``int_value``, 64-bit integers in
    ``long_value``, negative integers as their two's complement of the type's width).

    Raises:
        TypeError, ValueError: ``value`` does not fit ``datatype``.
    """
    if datatype == BOOLEAN:
        if not isinstance(value, bool):
            raise TypeError(f"not a boolean: {value!r}")
        metric.boolean_value = value
    elif datatype == STRING:
        if not isinstance(value, str):
            raise TypeError(f"not a string: {value!r}")
        metric.string_value = value
    elif datatype == DOUBLE:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"not a number: {value!r}")
        metric.double_value = float(value)
    elif datatype in (INT64, UINT64):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"not an integer: {value!r}")
        low = -(2**63) if datatype == INT64 else 0
        high = 2**63 - 1 if datatype == INT64 else 2**64 - 1
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range for its data type")
        metric.long_value = value & (2**64 - 1)
    else:
        raise ValueError(f"data type {datatype} is not written by this agent")
