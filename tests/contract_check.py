"""The platform's side of the contract: every message checked against the JSON Schemas in
``docs/schemas/`` (the files a platform would use), with the reference validator
(``jsonschema``, draft 2020-12)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from agent.contract.topics import parse_topic

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


@cache
def validator(schema: str) -> Draft202012Validator:
    """The validator of ``schema`` (``"{kind}/{version}"``), from its file."""
    kind, _, version = schema.partition("/")
    doc = json.loads((SCHEMA_DIR / f"{kind}.v{version}.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 section 6)")


def problem(topic: str, payload: bytes, prefix: str = "lifeline") -> str | None:
    """What is wrong with a message the platform received, or None: not JSON, no or an
    unknown ``schema``, a schema this topic does not carry, or the schema's objections.
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
        try:
            instance = json.loads(payload, parse_constant=_no_constant)
        except ValueError as exc:
            return f"{topic}: not JSON ({exc}): {payload[:200]!r}"
        schema = instance.get("schema") if isinstance(instance, dict) else None
        if not isinstance(schema, str) or schema.partition("/")[0] not in kind.schemas:
            return f"{topic}: schema {schema!r} is not one of {kind.schemas}: {payload[:200]!r}"
    try:
        v = validator(schema)
    except FileNotFoundError:
        return f"{topic}: no schema file for {schema!r}"
    errors = sorted(v.iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        where = "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:3])
        return f"{topic}: {where}: {payload[:300]!r}"
    device = instance.get("device") if isinstance(instance, dict) else None
    if parsed.ids and device not in (None, parsed.ids[0]):
        return f"{topic}: device {device!r} in a message on another device's topic"
    return None
