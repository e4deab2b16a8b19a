"""Every MQTT topic of the platform contract, built in one place (``docs/mqtt.md``).

Topics are ``{prefix}/{gateway_id}/{kind}[/{device_id}[/{rule_id}]]``; downlink commands
``{prefix}/{gateway_id}/cmd/{name}[/response]``. Every level but the
prefix's is an id of the safe set (letters, digits, ``-``, ``_``, ``.``), checked by the
config, so no level can hold a wildcard (``+``, ``#``), a ``/`` or a NUL (MQTT 3.1.1
section 4.7.1, MQTT 5.0 section 4.7.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from drivers.names import NAME_PATTERN

ONLINE = b"online"
OFFLINE = b"offline"


def status_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/status``: retained ``online``/``offline`` (also the last will)."""
    return f"{prefix}/{gateway_id}/status"


def telemetry_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/telemetry/{device_id}``: one message per device poll."""
    return f"{prefix}/{gateway_id}/telemetry/{device_id}"


def event_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/events/{device_id}``: alarm events (raise/clear/ack) and
    seismic events (start/end), QoS 1, with ``seq``, published ahead of any backlog."""
    return f"{prefix}/{gateway_id}/events/{device_id}"


def alarm_state_topic(prefix: str, gateway_id: str, device_id: str, rule_id: str) -> str:
    """``{prefix}/{gateway_id}/alarms/{device_id}/{rule_id}``: retained current state of
    one alarm, republished after every reconnect."""
    return f"{prefix}/{gateway_id}/alarms/{device_id}/{rule_id}"


def waveform_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/waveform/{device_id}``: the waveform excerpt of a seismic
    event, QoS 1, with ``seq``."""
    return f"{prefix}/{gateway_id}/waveform/{device_id}"


def notice_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/notice``: gateway notices (a buffer moved aside, readings
    dropped by the buffer cap), QoS 1, with ``seq``, alarm priority."""
    return f"{prefix}/{gateway_id}/notice"


def health_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/health``: retained JSON with the buffer's pending count,
    drops, publishing counters, disk writes per hour and GPIO state."""
    return f"{prefix}/{gateway_id}/health"


def info_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/info``: retained "birth certificate" of the gateway (software
    version, config hash, boot id, start time, devices and their points)."""
    return f"{prefix}/{gateway_id}/info"


def availability_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/availability/{device_id}``: retained ``online``/``offline``
    state of one device, with the reason and since when."""
    return f"{prefix}/{gateway_id}/availability/{device_id}"


def command_filter(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/cmd/+``: the topic filter of the downlink command requests
    (subscribed with QoS 1; ``+`` matches exactly one level, MQTT 3.1.1 section 4.7.1.3)."""
    return f"{prefix}/{gateway_id}/cmd/+"


def command_topic(prefix: str, gateway_id: str, name: str) -> str:
    """``{prefix}/{gateway_id}/cmd/{name}``: requests of command ``name`` (the platform
    publishes them)."""
    return f"{prefix}/{gateway_id}/cmd/{name}"


def command_response_topic(prefix: str, gateway_id: str, name: str) -> str:
    """``{prefix}/{gateway_id}/cmd/{name}/response``: the answers to requests of command
    ``name``, QoS 1, not retained, without ``seq`` (not buffered)."""
    return f"{prefix}/{gateway_id}/cmd/{name}/response"


def command_name_of(topic: str, prefix: str, gateway_id: str) -> str | None:
    """The command named by request topic ``topic`` (``{prefix}/{gateway_id}/cmd/{name}``
    with ``name`` an id of the safe set), or None. Pure."""
    head = f"{prefix}/{gateway_id}/cmd/"
    if not topic.startswith(head):
        return None
    name = topic[len(head) :]
    return name if _ID.fullmatch(name) else None


@dataclass(frozen=True, slots=True)
class TopicKind:
    """One kind of topic of the contract.

    Attributes:
        name: the kind (``telemetry``, ``events``, ...), the level after the gateway id.
        ids: how many id levels follow it (device id, rule id).
        qos: the QoS it is published with.
        retained: published retained (a zero-length retained publish clears it).
        sequenced: its payloads carry the gateway-wide ``seq`` (they go through the buffer).
        schemas: the payload kinds it carries (``docs/schemas/{kind}.v{N}.json``).
    """

    name: str
    ids: int
    qos: int
    retained: bool
    sequenced: bool
    schemas: tuple[str, ...]


TOPIC_KINDS: dict[str, TopicKind] = {
    k.name: k
    for k in (
        TopicKind("status", 0, 1, True, False, ("status",)),
        TopicKind("info", 0, 1, True, False, ("info",)),
        TopicKind("health", 0, 1, True, False, ("health",)),
        TopicKind("notice", 0, 1, False, True, ("notice",)),
        TopicKind("telemetry", 1, 1, False, True, ("telemetry", "telemetry_compact")),
        TopicKind("events", 1, 1, False, True, ("alarm_event", "seismic_event")),
        TopicKind("waveform", 1, 1, False, True, ("waveform",)),
        TopicKind("availability", 1, 1, True, False, ("availability",)),
        TopicKind("alarms", 2, 1, True, False, ("alarm_state",)),
        TopicKind("cmd", 1, 1, False, False, ("command_request",)),
    )
}
"""Every topic kind under ``{prefix}/{gateway_id}/``."""

COMMAND_RESPONSE = TopicKind("cmd", 2, 1, False, False, ("command_response",))
"""``cmd/{name}/response`` (and, with an MQTT 5 Response Topic, the topics below it)."""


_ID = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic of the contract taken apart."""

    gateway_id: str
    kind: TopicKind
    ids: tuple[str, ...]


def parse_topic(topic: str, prefix: str) -> ParsedTopic | None:
    """Take ``topic`` apart as ``{prefix}/{gateway_id}/{kind}/{ids…}``; None when it is not
    a topic of this contract under ``prefix`` (an unknown kind, the wrong number of levels,
    a level that is not an id of the safe set). Pure."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    if len(levels) < 2:
        return None
    kind = TOPIC_KINDS.get(levels[1])
    if kind is not None and kind.name == "cmd" and len(levels) >= 4 and levels[3] == "response":
        kind, levels = COMMAND_RESPONSE, levels[:4]
    if kind is None or len(levels) != 2 + kind.ids:
        return None
    if not all(_ID.fullmatch(level) for level in (levels[0], *levels[2:])):
        return None
    return ParsedTopic(levels[0], kind, tuple(levels[2:]))
