"""The platform's side of the contract: every message checked against the JSON Schemas in
``docs/schemas/`` (the files a platform would use).

Two validators: ``fastjsonschema`` compiles each schema to Python (about 50 µs per
telemetry message, so a subscriber keeps up with a backlog draining at thousands of
messages per second), and the reference implementation ``jsonschema`` (draft 2020-12,
about 400 µs) checks the schemas themselves and words the error of a message the fast one
refused. The schemas use only keywords both read alike (those of draft 7);
``tests/test_contract.py`` checks that they agree.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator

from agent.contract.compact import inflate, is_deflated
from agent.contract.topics import parse_topic

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def _load(schema: str) -> Any:
    kind, _, version = schema.partition("/")
    return json.loads((SCHEMA_DIR / f"{kind}.v{version}.json").read_text(encoding="utf-8"))


@cache
def validator(schema: str) -> Draft202012Validator:
    """The reference validator of ``schema`` (``"{kind}/{version}"``), from its file."""
    doc = _load(schema)
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


@cache
def fast_validator(schema: str) -> Any:
    """The compiled validator of ``schema``: raises ``JsonSchemaException`` when invalid."""
    return fastjsonschema.compile(_load(schema))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 section 6)")


def problem(topic: str, payload: bytes, prefix: str = "lifeline") -> str | None:
    """What is wrong with a message the platform received (or, on ``cmd/{name}``, sent),
    or None: not JSON (telemetry may be a zlib stream of JSON: ``mqtt.compression``), no
    or an unknown ``schema`` (a command request may leave it out), a schema this topic
    does not carry, or the schema's objections.
    Topics outside the contract (``prefix`` not matching) are not judged."""
    parsed = parse_topic(topic, prefix)
    if parsed is None:
        return None
    kind = parsed.kind
    if not payload:
        return None if kind.retained else f"{topic}: empty payload"
    if kind.name == "status":
        instance: Any = payload.decode("utf-8", "replace")
        schema = "status/1"
    else:
        if kind.name == "telemetry" and is_deflated(payload):  # mqtt.compression: zlib
            try:
                payload = inflate(payload)
            except ValueError as exc:
                return f"{topic}: {exc}: {payload[:200]!r}"
        try:
            instance = json.loads(payload, parse_constant=_no_constant)
        except ValueError as exc:
            return f"{topic}: not JSON ({exc}): {payload[:200]!r}"
        schema = instance.get("schema") if isinstance(instance, dict) else None
        if schema is None and kind.schemas == ("command_request",):
            schema = "command_request/1"  # a request may leave its schema out
        if not isinstance(schema, str) or schema.partition("/")[0] not in kind.schemas:
            return f"{topic}: schema {schema!r} is not one of {kind.schemas}: {payload[:200]!r}"
    try:
        fast_validator(schema)(instance)
    except FileNotFoundError:
        return f"{topic}: no schema file for {schema!r}"
    except fastjsonschema.JsonSchemaException as exc:
        errors = sorted(validator(schema).iter_errors(instance), key=lambda e: list(e.path))
        where = "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:3]) or str(exc)
        return f"{topic}: {where}: {payload[:300]!r}"
    device = instance.get("device") if isinstance(instance, dict) else None
    if parsed.kind.name == "cmd":
        return None  # a command's ids are its name (and "response"), not a device
    if parsed.ids and device not in (None, parsed.ids[0]):
        return f"{topic}: device {device!r} in a message on another device's topic"
    return None
