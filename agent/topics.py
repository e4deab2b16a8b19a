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
