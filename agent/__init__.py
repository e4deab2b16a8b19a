"""Lifeline Edge Agent: poll field devices, buffer every reading durably, publish via MQTT."""

__version__ = "0.1.0"
