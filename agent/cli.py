"""The ``edge-agent`` command: what technicians and systemd run.

Exit codes follow sysexits.h: 0 ok, 78 (EX_CONFIG) invalid config, 1 runtime failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import click

from agent import __version__

EX_CONFIG = 78


def setup_logging(level: str) -> None:
    """Log to stderr, one line per event; no timestamp under journald (it adds its own)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(
        level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr, force=True
    )
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _load_or_exit(path: str) -> object:
    from agent.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        n = len(exc.issues)
        click.echo(f"{path}: {n} problem{'s' if n != 1 else ''} found", err=True)
        sys.exit(EX_CONFIG)


config_option = click.option(
    "--config",
    "-c",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="The agent's YAML config file.",
)


@click.group()
@click.version_option(__version__, prog_name="edge-agent")
def main() -> None:
    """Lifeline Edge Agent: Modbus sensors -> durable buffer -> MQTT."""


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
def validate(config_file: str) -> None:
    """Check CONFIG_FILE and print every problem as FILE:LINE:COL: key.path: message."""
    from agent.config.loader import config_notes
    from agent.config.model import AgentConfig

    cfg = _load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    for note in config_notes(config_file):
        click.echo(str(note), err=True)
    points = sum(len(d.points) for d in cfg.devices)
    click.echo(
        f"{config_file}: OK (gateway {cfg.gateway_id}, {len(cfg.devices)} device(s), "
        f"{points} point(s))"
    )


@main.command()
@config_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Overrides log_level of the config.",
)
def run(config_file: str, log_level: str | None) -> None:
    """Poll, buffer and publish until SIGTERM/SIGINT."""
    from agent.app import run_agent
    from agent.buffer import BufferError, StateDirError
    from agent.config.model import AgentConfig

    cfg = _load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    setup_logging(log_level or cfg.log_level)
    try:
        code = asyncio.run(run_agent(cfg))
    except BufferError as exc:
        logging.getLogger("agent").critical("%s", exc)
        code = EX_CONFIG if isinstance(exc, StateDirError) else 1
    sys.exit(code)


def _word(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number (write 0x077A or 1914)") from None
    if not 0 <= value <= 0xFFFF:
        raise click.BadParameter(f"{text!r} is not a 16-bit register value (0..65535)")
    return value


@main.command()
@click.argument("words", nargs=-1, required=True)
def decode(words: tuple[str, ...]) -> None:
    """Show register WORDS (hex 0x077A or decimal) as every type in every byte order.

    For matching the value on a device's display: find it in the table, then use that
    type and byte order in the config.
    """
    from drivers.codec import BYTE_ORDERS, decode_all

    regs = [_word(w) for w in words]
    click.echo("registers: " + " ".join(f"0x{r:04X}" for r in regs))
    click.echo(f"{'type':<8}" + "".join(f"{o:>26}" for o in BYTE_ORDERS))
    for dtype, values in decode_all(regs):
        cells = []
        for order in BYTE_ORDERS:
            v = values[order]
            cells.append(f"{v:>26.10g}" if isinstance(v, float) else f"{v:>26}")
        click.echo(f"{dtype:<8}" + "".join(cells))


@main.command()
@config_option
@click.option("--device", "device_ids", multiple=True, help="Only this device (repeatable).")
def read(config_file: str, device_ids: tuple[str, ...]) -> None:
    """Poll every device (or --device) once and print its points; nothing is published."""
    from agent.app import make_bus
    from agent.config.model import AgentConfig
    from drivers.modbus.driver import plan_blocks

    cfg = _load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    unknown = set(device_ids) - {d.id for d in cfg.devices}
    if unknown:
        raise click.BadParameter(f"no device {', '.join(sorted(unknown))} in {config_file}")
    devices = [d for d in cfg.devices if not device_ids or d.id in device_ids]

    async def poll() -> int:
        bad = 0
        for dev in devices:
            bus = make_bus([dev])
            connected = await bus.connect()
            click.echo(f"{dev.id}  ({dev.bus}, unit {dev.unit_id})")
            if not connected:
                click.echo(f"  cannot connect to {dev.bus}")
                bad += 1
                continue
            results = {
                r.point: r
                for r in await bus.read_device(
                    dev.unit_id, plan_blocks(dev.points, dev.max_gap, dev.max_registers)
                )
            }
            bus.close()
            for p in dev.points:
                r = results[p.name]
                value = "" if r.value is None else str(r.value)
                where = f"{p.table} {p.address}"
                line = f"  {p.name:<20} {where:<20} {value:>16} {p.unit or '':<6} {r.quality}"
                if r.error:
                    line += f"  ({r.error})"
                    bad += 1
                click.echo(line)
        return 0 if bad == 0 else 1

    sys.exit(asyncio.run(poll()))


def _units(text: str) -> list[int]:
    units: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            units += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise click.BadParameter(f"{text!r}: write unit ids like 1-247 or 1,5,10-20") from None
    if not units or min(units) < 1 or max(units) > 247:
        raise click.BadParameter(f"{text!r}: unit ids are 1..247")
    return units


@main.command()
@click.option("--serial-port", help="Serial device or pyserial URL of an RS-485 line.")
@click.option("--host", help="Or: a Modbus TCP device / TCP-to-RS-485 converter.")
@click.option("--port", default=502, show_default=True, help="TCP port with --host.")
@click.option("--baudrate", default=9600, show_default=True)
@click.option("--parity", type=click.Choice(["N", "E", "O"]), default="N", show_default=True)
@click.option("--stopbits", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option(
    "--units",
    "units_text",
    default="1-247",
    show_default=True,
    help="Unit ids to try, e.g. 1-247 or 1,5,10-20.",
)
@click.option(
    "--address", default=0, show_default=True, help="Holding register to ask each unit for."
)
@click.option(
    "--timeout",
    "timeout_text",
    default="200ms",
    show_default=True,
    help="How long to wait for each unit.",
)
def scan(
    serial_port: str | None,
    host: str | None,
    port: int,
    baudrate: int,
    parity: str,
    stopbits: str,
    units_text: str,
    address: int,
    timeout_text: str,
) -> None:
    """Find which unit ids answer on a bus. A unit answers if it replies at all, even with
    a Modbus exception (except 10/11, which a gateway sends for an absent unit)."""
    from drivers.common import parse_duration
    from drivers.modbus.config import ModbusPoint
    from drivers.modbus.driver import ModbusBus, ModbusRtuBus, ModbusTcpBus, plan_blocks

    if (serial_port is None) == (host is None):
        raise click.UsageError("give either --serial-port or --host")
    try:
        timeout = parse_duration(timeout_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    units = _units(units_text)
    blocks = plan_blocks([ModbusPoint(name="probe", address=address)])

    async def run() -> tuple[str, list[tuple[int, str]]]:
        bus: ModbusBus  # pymodbus clients need the running loop
        if serial_port is not None:
            bus = ModbusRtuBus(serial_port, baudrate, parity, int(stopbits), 8, timeout)
        else:
            assert host is not None
            bus = ModbusTcpBus(host, port, timeout)
        if not await bus.connect():
            raise click.ClickException(f"cannot open {bus.name}")
        found: list[tuple[int, str]] = []
        with click.progressbar(
            units,
            label=f"scanning {bus.name}",
            show_eta=True,
            item_show_func=lambda u: f"unit {u}" if u else None,
            file=sys.stderr,
        ) as bar:
            for unit in bar:
                (r,) = await bus.read_device(unit, blocks)
                if r.quality == "good":
                    found.append((unit, f"answers: register {address} = {r.value}"))
                elif r.quality == "exception" and r.exception_code not in (10, 11):
                    found.append((unit, f"answers: {r.error}"))
        bus.close()
        return bus.name, found

    name, found = asyncio.run(run())
    for unit, what in found:
        click.echo(f"unit {unit}: {what}")
    click.echo(f"{len(found)} unit(s) answered on {name}")
    sys.exit(0 if found else 1)


@main.command()
@click.option(
    "--duration",
    default=30.0,
    show_default=True,
    help="Seconds to run before stopping (0 = until Ctrl-C).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the demo's config, buffer and broker files.",
)
def demo(duration: float, workdir: str | None) -> None:
    """Run simulated water-level and gas-pressure devices, a broker and the agent, and show
    what the platform receives."""
    from agent.demo import run_demo

    sys.exit(run_demo(duration, Path(workdir) if workdir else None))
