"""Technicians' Modbus commands: ``read``, ``scan``, ``decode`` and ``write``.

They work with the agent's config file or without one: the bus is then given on the command
line (``--serial-port`` or ``--host``) and the points by ``--profile`` or ``--point``.
Nothing here publishes or touches the buffer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusPoint
    from drivers.modbus.driver import ModbusBus

F = Callable[..., Any]


@dataclass
class BusOptions:
    """Where the bus is, from the command line."""

    serial_port: str | None
    host: str | None
    port: int | None
    rtu_over_tcp: bool
    framing: str
    baudrate: str
    parity: str
    stopbits: str
    bytesize: str
    local_echo: bool
    timeout: float

    @property
    def given(self) -> bool:
        return self.serial_port is not None or self.host is not None

    def make(self, baudrate: int | None = None, parity: str | None = None) -> ModbusBus:
        """The bus object (call inside the event loop)."""
        from drivers.modbus.driver import LineBus, ModbusTcpBus
        from drivers.modbus.line import SerialLine

        if self.serial_port is not None:
            line = SerialLine(
                self.serial_port,
                self.framing,
                baudrate or int(self.baudrate.split(",")[0]),
                parity or self.parity.split(",")[0],
                int(self.stopbits),
                int(self.bytesize),
                local_echo=self.local_echo,
            )
            return LineBus(line, self.timeout)
        assert self.host is not None
        port = self.port or 502
        if self.rtu_over_tcp or self.framing == "ascii":
            return LineBus(SerialLine(f"{self.host}:{port}", self.framing, tcp=True), self.timeout)
        return ModbusTcpBus(self.host, port, self.timeout)


def _duration(text: str) -> float:
    from drivers.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def bus_options(timeout: str = "500ms", lists: bool = False) -> Callable[[F], F]:
    """Options naming a bus; the command receives ``bus: BusOptions``."""
    many = " (comma-separated to try several)" if lists else ""

    def decorate(f: F) -> F:
        opts = [
            click.option("--serial-port", help="Serial device or pyserial URL of an RS-485 line."),
            click.option("--host", help="Or: a Modbus TCP device or TCP-to-RS-485 converter."),
            click.option(
                "--port",
                type=click.IntRange(1, 65535),
                default=None,
                help="TCP port with --host [502].",
            ),
            click.option(
                "--rtu-over-tcp",
                is_flag=True,
                help="--host passes RTU frames through (serial server in transparent mode).",
            ),
            click.option(
                "--framing", type=click.Choice(["rtu", "ascii"]), default="rtu", show_default=True
            ),
            click.option("--baudrate", default="9600", show_default=True, help=f"Baud rate{many}."),
            click.option("--parity", default="N", show_default=True, help=f"N, E or O{many}."),
            click.option(
                "--stopbits", type=click.Choice(["1", "2"]), default="1", show_default=True
            ),
            click.option(
                "--bytesize", type=click.Choice(["7", "8"]), default="8", show_default=True
            ),
            click.option("--local-echo", is_flag=True, help="The adapter echoes each request."),
            click.option(
                "--timeout",
                "timeout_text",
                default=timeout,
                show_default=True,
                help="How long to wait for each reply.",
            ),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def take_bus_options(kw: dict[str, Any], lists: bool = False) -> BusOptions:
    """Pop the :func:`bus_options` values out of a command's keyword arguments."""
    opts = BusOptions(
        kw.pop("serial_port"),
        kw.pop("host"),
        kw.pop("port"),
        kw.pop("rtu_over_tcp"),
        kw.pop("framing"),
        kw.pop("baudrate"),
        kw.pop("parity").upper(),
        kw.pop("stopbits"),
        kw.pop("bytesize"),
        kw.pop("local_echo"),
        _duration(kw.pop("timeout_text")),
    )
    if opts.serial_port is not None and opts.host is not None:
        raise click.UsageError("give --serial-port or --host, not both")
    host = opts.host or ""
    if host.count(":") == 1 and host.rsplit(":", 1)[1].isdigit():
        name, port = host.rsplit(":", 1)
        raise click.BadParameter(
            f"{host!r}: give the port on its own: --host {name} --port {port}",
            param_hint="--host",
        )
    for b in opts.baudrate.split(","):
        if not b.strip().isdigit() or int(b) < 50:
            raise click.BadParameter(
                f"baud rate {b!r}: write a number such as 9600", param_hint="--baudrate"
            )
    if "," in opts.baudrate + opts.parity and not lists:
        raise click.BadParameter("one baud rate and one parity here")
    for p in opts.parity.split(","):
        if p not in ("N", "E", "O"):
            raise click.BadParameter(f"parity {p!r}: N, E or O", param_hint="--parity")
    return opts


# -- read --------------------------------------------------------------------------------------


def parse_point_spec(spec: str) -> ModbusPoint:
    """``NAME=TABLE:ADDRESS[:TYPE[:BYTE_ORDER]]``, e.g. ``level=holding:0:float32:CDAB``."""
    from pydantic import ValidationError

    from drivers.modbus.config import ModbusPoint

    name, eq, rest = spec.partition("=")
    parts = rest.split(":")
    if not eq or len(parts) < 2:
        raise click.BadParameter(
            f"{spec!r}: write NAME=TABLE:ADDRESS[:TYPE[:BYTE_ORDER]], "
            "e.g. level=holding:0:float32:CDAB",
            param_hint="--point",
        )
    doc: dict[str, Any] = {"name": name, "table": parts[0], "address": parts[1]}
    if len(parts) > 2:
        doc["type"] = parts[2]
    if len(parts) > 3:
        doc["byte_order"] = parts[3]
    try:
        doc["address"] = int(parts[1], 0)
        return ModbusPoint.model_validate(doc)
    except (ValueError, ValidationError) as exc:
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise click.BadParameter(f"{spec!r}: {msg}", param_hint="--point") from None


def shipped_profiles_dir() -> Path:
    """The profiles that come with the agent: ``config/profiles`` of this repository, or
    where an install put them (``{prefix}/share/edge-agent/profiles``); a config may name
    this directory as its ``profiles_dir`` wherever the config lives."""
    from agent.config.loader import shipped_profiles_dir as shipped

    return shipped()


def default_profile_dirs() -> list[Path]:
    """Where ``--profile`` looks when no ``--profiles-dir`` is given."""
    return [
        Path("profiles"),
        Path("config/profiles"),
        Path("/etc/edge-agent/profiles"),
        shipped_profiles_dir(),
    ]


def find_profile(name: str, directory: str | None) -> list[ModbusPoint]:
    from agent.config.loader import load_profiles

    searched = [Path(directory)] if directory else default_profile_dirs()
    dirs = [d for d in searched if d.is_dir()]
    known: set[str] = set()
    for d in dirs:
        profiles = load_profiles(d)
        if name in profiles.valid:
            return list(profiles.valid[name].points)
        known |= set(profiles.valid)
    raise click.BadParameter(
        f"no profile {name!r} (known: {', '.join(sorted(known)) or 'none'}; looked in "
        f"{', '.join(map(str, searched))}): give the directory of your profiles with "
        "--profiles-dir",
        param_hint="--profile",
    )


async def read_table(
    bus: ModbusBus,
    unit_id: int,
    points: Sequence[ModbusPoint],
    timeout: float | None,
    max_gap: int = 0,
    max_registers: int = 125,
    retries: int = 0,
) -> list[tuple[ModbusPoint, str, Any]]:
    """Poll once: ``(point, raw registers as hex, result)`` per point, in point order;
    ``retries`` failed requests are sent again (as the agent would, without its poll
    interval to keep)."""
    from pymodbus.exceptions import ModbusException

    from drivers.modbus.config import BIT_TABLES
    from drivers.modbus.driver import (
        Block,
        RetryBudget,
        apply_decimal_points,
        decode_block,
        plan_blocks,
    )
    from drivers.modbus.line import ExceptionReply, FrameError

    raw: dict[str, str] = {}
    results: dict[str, Any] = {}
    ordered: list[ModbusPoint] = []
    unsent: list[Any] = []
    retry = RetryBudget(retries, float("inf"))

    async def read(block: Block, narrow: bool) -> list[Any]:
        """One block with its raw words; refused with an exception: point by point, so
        that the points the device has still show their raw registers."""
        try:
            words = await bus.read_raw(unit_id, block, timeout, retry)
        except ExceptionReply:
            if narrow and len(block.points) > 1:
                out: list[Any] = []
                for p in block.points:
                    out += await read(Block(block.table, p.address, p.register_count, (p,)), False)
                return out
            words = None
        except (FrameError, TimeoutError, OSError, ModbusException):
            words = None
        if words is None or len(words) < block.count:
            return await bus.read_block(unit_id, block, timeout)
        for p in block.points:
            off = p.address - block.start
            if block.table in BIT_TABLES:
                raw[p.name] = str(int(bool(words[off])))
            else:
                raw[p.name] = " ".join(f"{int(w):04X}" for w in words[off : off + p.register_count])
        return decode_block(block, words)

    for block in plan_blocks(points, max_gap, max_registers):
        ordered += block.points
        unsent += await read(block, True)
    for r in apply_decimal_points(ordered, unsent):
        results[r.point] = r
    return [(p, raw.get(p.name, ""), results[p.name]) for p in points]


def print_table(rows: list[tuple[ModbusPoint, str, Any]]) -> int:
    """Print one line per point; return how many were not good."""
    bad = 0
    for p, raw, r in rows:
        value = "" if r.value is None else str(r.value)
        where = f"{p.table} {p.address}"
        line = f"  {p.name:<20} {where:<18} {raw:<20} {value:>18} {p.unit or '':<6} {r.quality}"
        if r.error:
            line += f"  ({r.error})"
            bad += 1
        click.echo(line.rstrip())
    return bad


def bus_counters(bus: ModbusBus) -> str:
    """One line with the bus's counters (requests, timeouts, CRC errors, garbage bytes,
    frame errors, retries) for this command's requests."""
    counts = ", ".join(f"{k} {v}" for k, v in bus.counters.as_dict().items())
    return f"  bus {bus.name}: {counts}"


@click.command()
@click.option(
    "--config",
    "-c",
    "config_file",
    type=click.Path(dir_okay=False),
    help="The agent's config: read its devices.",
)
@click.option("--device", "device_ids", multiple=True, help="Only this device (repeatable).")
@bus_options()
@click.option("--unit", "unit_id", type=click.IntRange(1, 247), default=1, show_default=True)
@click.option("--profile", help="Without --config: the device's profile (its register map).")
@click.option("--profiles-dir", type=click.Path(file_okay=False), help="Where --profile looks.")
@click.option(
    "--point",
    "point_specs",
    multiple=True,
    help="Without --config: NAME=TABLE:ADDRESS[:TYPE[:BYTE_ORDER]] (repeatable).",
)
def read(**kw: Any) -> None:
    """Poll devices once and print each point: table and address, raw registers (hex),
    value, unit and quality, then the bus's counters (requests, timeouts, CRC errors,
    garbage bytes skipped, frame errors, retries). Nothing is published.

    With --config: every device of the config (or --device). Without: the bus given by
    --serial-port or --host, unit --unit, points from --profile and/or --point.
    """
    from agent.cli import load_or_exit

    bus_opts = take_bus_options(kw)
    config_file, device_ids = kw["config_file"], kw["device_ids"]
    jobs: list[
        tuple[str, Callable[[], ModbusBus], int, list[ModbusPoint], float | None, int, int, int]
    ]
    if config_file:
        from agent.app import make_bus
        from agent.config.model import AgentConfig

        if bus_opts.given or kw["profile"] or kw["point_specs"]:
            raise click.UsageError("with --config, the bus and points come from the config")
        cfg = load_or_exit(config_file)
        assert isinstance(cfg, AgentConfig)
        unknown = set(device_ids) - {d.id for d in cfg.devices}
        if unknown:
            raise click.BadParameter(f"no device {', '.join(sorted(unknown))} in {config_file}")
        from drivers.modbus.config import ModbusDevice

        chosen = [d for d in cfg.devices if not device_ids or d.id in device_ids]
        for d in chosen:
            if not isinstance(d, ModbusDevice):
                click.echo(f"{d.id}  ({d.bus}): a {d.driver} device, not read here", err=True)
        jobs = [
            (
                f"{d.id}  ({d.bus}, unit {d.unit_id})",
                lambda d=d: make_bus([d]),  # type: ignore[misc]
                d.unit_id,
                list(d.points),
                d.timeout,
                d.max_gap,
                d.max_registers,
                d.retries,
            )
            for d in chosen
            if isinstance(d, ModbusDevice)
        ]
    else:
        if not bus_opts.given:
            raise click.UsageError("give --config, or a bus (--serial-port or --host)")
        points = find_profile(kw["profile"], kw["profiles_dir"]) if kw["profile"] else []
        points += [parse_point_spec(s) for s in kw["point_specs"]]
        if not points:
            raise click.UsageError("say what to read: --profile and/or --point")
        names = [p.name for p in points]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise click.BadParameter(f"point name(s) used twice: {', '.join(sorted(dup))}")
        unit = kw["unit_id"]
        jobs = [(f"unit {unit}", bus_opts.make, unit, points, None, 0, 125, 0)]

    async def poll() -> int:
        bad = 0
        for title, make, unit_id, points, timeout, gap, most, retries in jobs:
            bus = make()
            connected = await bus.connect()
            click.echo(f"{title}" if config_file else f"{title}  ({bus.name})")
            if not connected:
                why = f": {bus.last_error}" if bus.last_error else ""
                click.echo(f"  cannot connect to {bus.name}{why}")
                bad += 1
                continue
            try:
                rows = await read_table(bus, unit_id, points, timeout, gap, most, retries)
                bad += print_table(rows)
            finally:
                bus.close()
            click.echo(bus_counters(bus))
        return 0 if bad == 0 else 1

    sys.exit(asyncio.run(poll()))


# -- scan --------------------------------------------------------------------------------------


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


@click.command()
@bus_options(timeout="200ms", lists=True)
@click.option(
    "--units",
    "units_text",
    default="1-247",
    show_default=True,
    help="Unit ids to try, e.g. 1-247 or 1,5,10-20.",
)
@click.option(
    "--address",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Holding register to ask each unit for.",
)
def scan(**kw: Any) -> None:
    """Find which unit ids answer on a bus, and with --baudrate 9600,19200 --parity N,E at
    which line settings. A unit answers if it replies at all, even with a Modbus exception
    (except 10/11, which a gateway sends for an absent unit)."""
    from drivers.modbus.config import ModbusPoint
    from drivers.modbus.driver import plan_blocks

    bus_opts = take_bus_options(kw, lists=True)
    if not bus_opts.given:
        raise click.UsageError("give either --serial-port or --host")
    units = _units(kw["units_text"])
    address = kw["address"]
    blocks = plan_blocks([ModbusPoint(name="probe", address=address)])
    settings: list[tuple[int | None, str | None]] = [(None, None)]
    if bus_opts.serial_port is not None:
        settings = [
            (int(b), p) for b in bus_opts.baudrate.split(",") for p in bus_opts.parity.split(",")
        ]
    several = len(settings) > 1

    async def run() -> tuple[str, list[tuple[int, str]]]:
        found: list[tuple[int, str]] = []
        name = ""
        tries = [(s, u) for s in settings for u in units]
        with click.progressbar(
            tries,
            label="scanning",
            show_eta=True,
            item_show_func=lambda t: f"unit {t[1]}" if t else None,
            file=sys.stderr,
        ) as bar:
            bus = None
            current: tuple[int | None, str | None] | None = None
            for (baud, parity), unit in bar:
                if (baud, parity) != current:
                    if bus is not None:
                        bus.close()
                    current = (baud, parity)
                    bus = bus_opts.make(baud, parity)
                    name = bus.name
                    if not await bus.connect():
                        raise click.ClickException(f"cannot open {bus.name}: {bus.last_error}")
                assert bus is not None
                (r,) = await bus.read_device(unit, blocks)
                at = f" at {baud} {parity}" if several else ""
                if r.quality == "good":
                    found.append((unit, f"answers{at}: register {address} = {r.value}"))
                elif r.quality in ("exception", "unsupported") and r.exception_code not in (
                    10,
                    11,
                ):
                    found.append(
                        (
                            unit,
                            f"answers{at} (present; it refused register {address} with "
                            f"exception {r.exception_code}: try another --address to read "
                            "a value)",
                        )
                    )
            if bus is not None:
                bus.close()
        return name, found

    name, found = asyncio.run(run())
    for unit, what in found:
        click.echo(f"unit {unit}: {what}")
    click.echo(f"{len(found)} unit(s) answered on {name}")
    sys.exit(0 if found else 1)


# -- decode ------------------------------------------------------------------------------------


def _word(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number (write 0x077A or 1914)") from None
    if not 0 <= value <= 0xFFFF:
        raise click.BadParameter(f"{text!r} is not a 16-bit register value (0..65535)")
    return value


def address_hint(table: str, address: int) -> str:
    """How a zero-based protocol address is numbered elsewhere, and the off-by-one to try
    (Modbus Application Protocol V1.1b3, 4.4: element X is addressed as X-1)."""
    digit = {"holding": "4", "input": "3", "discrete_input": "1", "coil": "0"}[table]
    one = address + 1
    modicon = f"{digit}{one:04d}" if one <= 9999 else f"{digit}{one:05d}"
    text = (
        f"address {address} (zero-based, as sent) is {table} register {one} counting from 1, "
        f"Modicon {modicon}."
    )
    if address > 0:
        text += (
            f" If the device's manual lists this value at {address} and the numbers above do "
            f"not match its display, its list counts from 1: try address {address - 1}."
        )
    return text


@click.command()
@click.argument("words", nargs=-1)
@bus_options()
@click.option("--unit", "unit_id", type=click.IntRange(1, 247), default=1, show_default=True)
@click.option(
    "--address", type=click.IntRange(0, 65535), default=None, help="Read live from this address."
)
@click.option("--count", type=click.IntRange(1, 4), default=2, show_default=True)
@click.option(
    "--table", type=click.Choice(["holding", "input"]), default="holding", show_default=True
)
def decode(words: tuple[str, ...], **kw: Any) -> None:
    """Show register WORDS (hex 0x077A or decimal) as every type in every byte order, or
    read them live (--address with --serial-port/--host) and show them so.

    For matching the value on a device's display: find it in the table, then use that
    type and byte order (and the address hint) in the config.
    """
    from drivers.codec import BYTE_ORDERS, decode_all
    from drivers.modbus.config import ModbusPoint
    from drivers.modbus.driver import plan_blocks

    bus_opts = take_bus_options(kw)
    address, table = kw["address"], kw["table"]
    if words and (bus_opts.given or address is not None):
        raise click.UsageError("give register WORDS, or --address and a bus to read them live")
    if words:
        regs = [_word(w) for w in words]
    else:
        if address is None or not bus_opts.given:
            raise click.UsageError(
                "give register WORDS (e.g. 0x077A 0x429B), or --address with --serial-port "
                "or --host to read them live"
            )
        points = [
            ModbusPoint(name=f"r{i}", table=table, address=address + i) for i in range(kw["count"])
        ]
        block = plan_blocks(points)[0]

        async def fetch() -> list[int]:
            bus = bus_opts.make()
            if not await bus.connect():
                raise click.ClickException(f"cannot connect to {bus.name}: {bus.last_error}")
            try:
                return [int(w) for w in await bus.read_raw(kw["unit_id"], block, None)]
            except Exception as exc:  # ExceptionReply, FrameError, TimeoutError, OSError
                from drivers.modbus.driver import describe_error

                raise click.ClickException(
                    f"reading {table} {address}..{address + len(points) - 1} of unit "
                    f"{kw['unit_id']} on {bus.name}: {describe_error(exc)}"
                ) from None
            finally:
                bus.close()

        regs = asyncio.run(fetch())
    click.echo("registers: " + " ".join(f"0x{r:04X}" for r in regs))
    click.echo(f"{'type':<8}" + "".join(f"{o:>26}" for o in BYTE_ORDERS))
    for dtype, values in decode_all(regs):
        cells = []
        for order in BYTE_ORDERS:
            v = values[order]
            cells.append(f"{v:>26.10g}" if isinstance(v, float) else f"{v:>26}")
        click.echo(f"{dtype:<8}" + "".join(cells))
    if address is not None:
        click.echo(address_hint(table, address))


# -- write -------------------------------------------------------------------------------------


def values_to_write(
    table: str, values: Sequence[str], data_type: str, byte_order: str
) -> list[int] | list[bool]:
    """Raw register words (or coil states) for VALUES given as text."""
    from drivers.codec import DecodeError, encode_registers

    if table == "coil":
        states = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}
        try:
            return [states[v.lower()] for v in values]
        except KeyError as exc:
            raise click.BadParameter(f"coil value {exc.args[0]!r}: write on/off or 1/0") from None
    words: list[int] = []
    for v in values:
        try:
            number: int | float = float(v) if data_type.startswith("float") else int(v, 0)
            words += encode_registers(number, data_type, byte_order)  # type: ignore[arg-type]
        except (ValueError, DecodeError, OverflowError) as exc:
            raise click.BadParameter(f"{v!r} as {data_type}: {exc}") from None
    return words


@click.command()
@click.argument("values", nargs=-1, required=True)
@bus_options()
@click.option("--unit", "unit_id", type=click.IntRange(1, 247), default=1, show_default=True)
@click.option(
    "--table", type=click.Choice(["holding", "coil"]), default="holding", show_default=True
)
@click.option("--address", type=click.IntRange(0, 65535), required=True, help="Zero-based.")
@click.option(
    "--type",
    "data_type",
    default="uint16",
    show_default=True,
    type=click.Choice(
        ["uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64"]
    ),
)
@click.option(
    "--byte-order",
    type=click.Choice(["ABCD", "CDAB", "BADC", "DCBA"]),
    default="ABCD",
    show_default=True,
)
@click.option(
    "--yes-write",
    is_flag=True,
    help="Really write. Without it, the command only shows what it would write.",
)
def write(values: tuple[str, ...], **kw: Any) -> None:
    """Write VALUES to holding registers (function code 6 or 16) or coils (5 or 15), then
    read them back. Changing a device's settings can stop it measuring or answering:
    nothing is sent without --yes-write.
    """
    bus_opts = take_bus_options(kw)
    if not bus_opts.given:
        raise click.UsageError("give the bus: --serial-port or --host")
    table, address, unit = kw["table"], kw["address"], kw["unit_id"]
    raw = values_to_write(table, values, kw["data_type"], kw["byte_order"])
    most = 1968 if table == "coil" else 123  # FC 15 / FC 16 (Modbus Application Protocol 6.11/6.12)
    if len(raw) > most or address + len(raw) > 65536:
        raise click.BadParameter(
            f"{len(raw)} {'coils' if table == 'coil' else 'registers'} from address {address}: "
            f"at most {most} per request, ending at address 65535"
        )
    shown = (
        " ".join(f"0x{int(w):04X}" for w in raw)
        if table == "holding"
        else " ".join("on" if b else "off" for b in raw)
    )
    what = f"{table} {address}..{address + len(raw) - 1} of unit {unit}: {shown}"
    if not kw["yes_write"]:
        click.echo(f"would write {what}")
        click.echo("nothing sent: add --yes-write to write it")
        sys.exit(2)

    async def go() -> list[int] | list[bool]:
        from drivers.modbus.driver import Block

        bus = bus_opts.make()
        if not await bus.connect():
            raise click.ClickException(f"cannot connect to {bus.name}: {bus.last_error}")
        try:
            await bus.write(unit, table, address, raw)
            back = await bus.read_raw(unit, Block(table, address, len(raw), ()), None)
            return list(back)[: len(raw)]
        except Exception as exc:  # ExceptionReply, FrameError, TimeoutError, OSError
            from drivers.modbus.driver import describe_error

            raise click.ClickException(
                f"writing {what} on {bus.name}: {describe_error(exc)}"
            ) from None
        finally:
            bus.close()

    back = asyncio.run(go())
    click.echo(f"wrote {what}")
    if table == "holding":
        click.echo("read back: " + " ".join(f"0x{int(w):04X}" for w in back))
    else:
        click.echo("read back: " + " ".join("on" if b else "off" for b in back))


COMMANDS = [read, scan, decode, write]
