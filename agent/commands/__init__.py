"""Downlink commands from the platform, allow-listed (``docs/mqtt.md``, Commands).

:mod:`agent.commands.parse` takes requests apart and judges them (pure);
:class:`agent.commands.service.Commands` takes them in, runs them at most once and
answers; :meth:`~agent.commands.service.Commands.execute` is the entry point every
output format maps its own requests onto.
"""

from agent.commands.service import Commands

__all__ = ["Commands"]
