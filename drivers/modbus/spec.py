"""Modbus facts the running agent needs without the config models (:mod:`drivers.plain`):
tables and the most a request may read."""

from __future__ import annotations

from typing import Literal

Table = Literal["holding", "input", "coil", "discrete_input"]
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})

MAX_REGISTERS_PER_READ = 125
"""FC 03/04 read at most 125 registers (Modbus Application Protocol V1.1b3, 6.3 and 6.4)."""
MAX_BITS_PER_READ = 2000
"""FC 01/02 read at most 2000 bits (Modbus Application Protocol V1.1b3, 6.1 and 6.2)."""
