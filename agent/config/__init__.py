"""Config: YAML in, typed models out, errors at file:line:col.

The names are loaded on first use: the running agent imports the models only (its config
was read and checked in a process of its own, :mod:`agent.config.isolated`), never the
YAML loader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config.issues import ConfigError, ConfigIssue
    from agent.config.loader import load_config
    from agent.config.model import AgentConfig, BufferConfig, MqttConfig, TlsConfig

__all__ = [
    "AgentConfig",
    "BufferConfig",
    "ConfigError",
    "ConfigIssue",
    "MqttConfig",
    "TlsConfig",
    "load_config",
]

_HOME = {
    "AgentConfig": "agent.config.model",
    "BufferConfig": "agent.config.model",
    "MqttConfig": "agent.config.model",
    "TlsConfig": "agent.config.model",
    "ConfigError": "agent.config.issues",
    "ConfigIssue": "agent.config.issues",
    "load_config": "agent.config.loader",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'agent.config' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
