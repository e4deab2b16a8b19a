"""Config: YAML in, typed models out, errors at file:line:col."""

from agent.config.loader import ConfigError, ConfigIssue, load_config
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
