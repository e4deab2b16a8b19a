"""Every MQTT topic of the platform contract, built in one place (see ``docs/mqtt.md``)."""

from __future__ import annotations

ONLINE = b"online"
OFFLINE = b"offline"


def status_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/{gateway_id}/status``: retained ``online``/``offline`` (also the last will)."""
    return f"{prefix}/{gateway_id}/status"


def telemetry_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/telemetry/{device_id}``: one message per device poll."""
    return f"{prefix}/{gateway_id}/telemetry/{device_id}"


def event_topic(prefix: str, gateway_id: str, device_id: str) -> str:
    """``{prefix}/{gateway_id}/events/{device_id}``: alarm events (raise/clear/ack), QoS 1,
    with ``seq``, published ahead of any telemetry backlog."""
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
