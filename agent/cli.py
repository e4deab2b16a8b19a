"""The ``edge-agent`` command: what technicians and systemd run.

Exit codes follow sysexits.h: 0 ok, 78 (EX_CONFIG) invalid config, 1 runtime failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import importlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from agent import __version__
from agent.logs import setup_logging

if TYPE_CHECKING:
    from agent.config.model import AgentConfig

EX_CONFIG = 78
UMASK = 0o027
"""``run``: what the agent creates (the buffer, its state directory) is readable by its
own group at most, never by others (umask(2))."""


def load_or_exit(
    path: str, need_secrets: bool = False, meanwhile: Callable[[], object] | None = None
) -> object:
    """The config at ``path``, or its problems printed and exit 78. With ``meanwhile``
    (the running agent): checked in a process of its own while ``meanwhile`` runs here
    (:mod:`agent.config.isolated`)."""
    from agent.config.issues import ConfigError

    try:
        if meanwhile is not None:
            from agent.config.isolated import load_isolated

            return load_isolated(path, need_secrets, meanwhile)
        from agent.config.loader import load_config

        return load_config(path, need_secrets)
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
    type=click.Path(),  # the loader says what is wrong with it (exit 78)
    help="The agent's YAML config file.",
)


class _Commands(click.Group):
    """The commands; those of :mod:`agent.cli_modbus` (``read``, ``scan``, ``decode``,
    ``write``) are imported when one of them is asked for or the commands are listed, so
    that the running agent does not hold them."""

    def _add_modbus(self) -> None:
        from agent.cli_modbus import COMMANDS

        for command in COMMANDS:
            if command.name not in self.commands:
                self.add_command(command)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._add_modbus()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_modbus()
        return super().list_commands(ctx)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="edge-agent")
def main() -> None:
    """Lifeline Edge Agent: Modbus sensors -> durable buffer -> MQTT."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our own messages say it


@main.command()
@click.argument("config_file", type=click.Path())  # the loader says what is wrong
def validate(config_file: str) -> None:
    """Check CONFIG_FILE and print every problem as FILE:LINE:COL: key.path: message."""
    from agent.config.loader import config_notes
    from agent.config.model import AgentConfig

    cfg = load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    notes = config_notes(config_file)
    for note in notes:
        click.echo(str(note), err=True)
    points = sum(len(d.points) for d in cfg.devices)
    warnings = sum(1 for n in notes if n.level == "warning")
    said = f", {warnings} warning{'s' if warnings != 1 else ''} above" if warnings else ""
    click.echo(
        f"{config_file}: OK (gateway {cfg.gateway_id}, {len(cfg.devices)} device(s), "
        f"{points} point(s){said})"
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
    os.umask(UMASK)
    from agent.memory import fix_mmap_threshold

    fix_mmap_threshold()  # large buffers go back to the system when freed
    # a watchdog kill (SIGABRT, systemd.service(5) WatchdogSignal=) shows where it hung;
    # a stderr without a file descriptor (an embedding host) goes without
    with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
        faulthandler.enable()
    loaded = load_or_exit(
        config_file, need_secrets=True, meanwhile=lambda: importlib.import_module("agent.app")
    )
    from agent.app import run_agent
    from agent.buffer import BufferError, StateDirError

    cfg = cast("AgentConfig", loaded)  # its plain twin (drivers.plain)
    # the modules and the config live as long as the process: the collector's full passes
    # need not walk them again and again (gc.freeze)
    gc.freeze()
    setup_logging(log_level or cfg.log_level)
    try:
        code = asyncio.run(run_agent(cfg, config_path=config_file))
    except BufferError as exc:
        logging.getLogger("agent").critical("%s", exc)
        code = EX_CONFIG if isinstance(exc, StateDirError) else 1
    sys.exit(code)


DEFAULT_CONFIG = "/etc/edge-agent/agent.yaml"
"""The config the systemd unit runs with."""


@main.command()
@click.option(
    "--config",
    "-c",
    "config_file",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(),
    help="The agent's config (for its state_dir: where its state file is).",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Read this state file instead of finding it through the config.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print the figures in the Prometheus text format (node exporter's textfile collector).",
)
@click.option(
    "--watch",
    type=click.FloatRange(0.2, 3600),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (2 when not given) until Ctrl-C.",
)
@click.option(
    "--color/--no-color",
    default=None,
    help="Colour (default: on a terminal unless NO_COLOR is set).",
)
def status(
    config_file: str,
    state_file: str | None,
    as_json: bool,
    prometheus: bool,
    watch: float | None,
    color: bool | None,
) -> None:
    """What the running agent is doing, from the state file it writes every second (no
    broker needed): uplink, buffer, clock, each device with its last values, active
    alarms and outputs. Exit code 0 healthy, 1 degraded (uplink down, a device offline,
    buffer in memory, clock not synchronised: each reason on a line), 2 not running."""
    if as_json and prometheus:
        raise click.UsageError("--json and --prometheus exclude each other")
    if prometheus and watch is not None:
        raise click.UsageError("--prometheus prints once (run it from a timer)")
    state_dir = None
    if state_file is None:
        from agent.config.model import AgentConfig

        cfg = load_or_exit(config_file)
        assert isinstance(cfg, AgentConfig)
        state_dir = Path(cfg.state_dir)
    if color is None:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    code = 2
    try:
        while True:
            code = _status_once(state_file, state_dir, as_json, prometheus, watch, color)
            if watch is None:
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    sys.exit(code)


def _status_once(
    state_file: str | None,
    state_dir: Path | None,
    as_json: bool,
    prometheus: bool,
    watch: float | None,
    color: bool,
) -> int:
    """Print the status once (see :func:`status`); return its exit code."""
    import json

    from agent.metrics import prometheus_text
    from agent.status import load_view, render_text

    v = load_view(Path(state_file) if state_file else None, state_dir)
    code = int(v["status"]["code"])
    if prometheus:
        sys.stdout.buffer.write(prometheus_text(v))
        sys.stdout.flush()
        return code
    if as_json:
        text = json.dumps(v, indent=None if watch else 2, ensure_ascii=False) + "\n"
    else:
        text = render_text(v, color)
    if watch is not None and not as_json and sys.stdout.isatty():
        click.clear()
    click.echo(text, nl=False, color=color)
    return code


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


@main.group()
def gpio() -> None:
    """GPIO outputs, for technicians commissioning a cabinet."""


@gpio.command("test")
@config_option
@click.argument("output")
@click.option(
    "--seconds",
    type=click.FloatRange(0, 3600),
    default=3.0,
    show_default=True,
    help="How long to switch it on.",
)
def gpio_test(config_file: str, output: str, seconds: float) -> None:
    """Switch OUTPUT (a name from the config's outputs) on for a few seconds, then back
    to its safe state, reading the pin back each time. Stop the agent first: it owns the
    pins while it runs."""

    from agent.config.model import AgentConfig
    from agent.gpio import Gpio, OutputState

    cfg = load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    names = [o.name for o in cfg.outputs]
    if output not in names:
        raise click.BadParameter(
            f"no output {output!r} in {config_file} (outputs: {', '.join(names) or 'none'})"
        )
    (out,) = [o for o in cfg.outputs if o.name == output]
    setup_logging("warning")
    g = Gpio(cfg.gpio.model_copy(update={"ack_button": None, "status_led": None}), [out])
    if not g.available:
        raise click.ClickException(f"gpio unavailable: {g.error}")
    click.echo(f"pin factory {g.factory_name}; output {out.name} ({out.kind}) on pin {out.pin}")
    g.apply({out.name: OutputState(True)})
    click.echo(f"  on for {seconds:g}s: pin reads {'on' if g.read(out.name) else 'off'}")
    time.sleep(seconds)
    g.close()
    click.echo(f"  back to its safe state ({out.safe_state})")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "target", required=True, help="Serial device or pty to write frames to.")
@click.option("--rate", type=float, required=True, help="Samples per second of the record.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="1 = real time.")
@click.option("--first", type=int, default=0, show_default=True, help="First sample counter.")
@click.option(
    "--channel-names",
    default="EHZ,ENN,ENE",
    show_default=True,
    help="udp:// only: the datacast channel codes, in file order.",
)
def replay(
    files: tuple[str, ...],
    target: str,
    rate: float,
    speed: float,
    first: int,
    channel_names: str,
) -> None:
    """Stream a recorded waveform into a serial line (e.g. one end of a pty pair) as the
    sensor's $SMP frames, or with --to udp://HOST:PORT as Raspberry Shake datacast
    packets (integer counts, 0.25 s per packet and channel), at real time or --speed
    times faster, so the agent runs on a real earthquake. Faster than real time, datacast
    packets are stamped as if the record had started earlier, so that none is stamped
    ahead of the clock. FILES: one file per channel
    with one number per line, or one CSV file with a header and a column per channel."""
    import csv
    import math
    import os

    from drivers.seismic_stream import ascii_frame

    if not (math.isfinite(speed) and math.isfinite(rate)) or speed <= 0 or rate <= 0:
        raise click.BadParameter("--rate and --speed must be positive numbers")
    channels: list[list[float]] = []
    try:
        if len(files) == 1 and files[0].endswith(".csv"):
            with open(files[0], newline="") as f:
                rows = list(csv.reader(f))
            channels = [[float(r[c]) for r in rows[1:]] for c in range(len(rows[0]))]
        else:
            for name in files:
                with open(name) as f:
                    channels.append([float(v) for v in f.read().split()])
    except (ValueError, IndexError, OSError) as exc:
        raise click.ClickException(f"cannot read the record: {exc}") from None
    if not 1 <= len(channels) <= 3 or len({len(c) for c in channels}) != 1:
        raise click.ClickException("give 1 to 3 channels of equal length")
    samples = list(zip(*channels, strict=True))
    if target.startswith("udp://"):
        _replay_udp(target, samples, rate, speed, channel_names)
        return
    try:
        fd = os.open(target, os.O_RDWR | os.O_NOCTTY)
    except OSError as exc:
        raise click.ClickException(f"cannot open {target}: {exc}") from None
    click.echo(
        f"replaying {len(samples)} samples x {len(channels)} channel(s) at {rate:g} Hz "
        f"({len(samples) / rate:.1f} s of record) into {target} at {speed:g}x",
        err=True,
    )
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < len(samples):
            due = min(len(samples), int((time.monotonic() - t0) * rate * speed) + 1)
            if due > sent:
                chunk = b"".join(ascii_frame(first + i, list(samples[i])) for i in range(sent, due))
                os.write(fd, chunk)
                sent = due
            time.sleep(0.005)
    finally:
        os.close(fd)
    click.echo(f"sent {sent} samples in {time.monotonic() - t0:.1f} s", err=True)


def _replay_udp(
    target: str, samples: list[tuple[float, ...]], rate: float, speed: float, names: str
) -> None:
    import math
    import socket

    from drivers.seismic_stream import datacast_packet

    host, _, port_text = target.removeprefix("udp://").rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise click.BadParameter(f"{target!r}: write udp://HOST:PORT", param_hint="--to")
    port = int(port_text)
    codes = names.split(",")
    if len(codes) < len(samples[0]):
        raise click.BadParameter("give a channel code per channel", param_hint="--channel-names")
    per_packet = max(1, round(rate / 4))
    # faster than real time, the record is stamped as if it had started earlier, so that
    # no packet is stamped ahead of the clock (receivers drop packets from the future)
    start = time.time() - len(samples) / rate * (1 - 1 / speed) if speed > 1 else time.time()
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for k in range(0, len(samples), per_packet):
            due = t0 + k / rate / speed
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            chunk = samples[k : k + per_packet]
            for c in range(len(chunk[0])):
                # a NaN or infinite value goes out as such (as a faulty sensor sends it)
                counts = [round(v) if math.isfinite(v := s[c]) else v for s in chunk]
                try:
                    sock.sendto(datacast_packet(codes[c], start + k / rate, counts), (host, port))
                except OSError as exc:
                    raise click.ClickException(f"cannot send to {target}: {exc}") from None
    click.echo(f"sent {len(samples)} samples in {time.monotonic() - t0:.1f} s", err=True)


@main.command()
@click.option("--mqtt", metavar="HOST[:PORT]", help="MQTT broker (default 127.0.0.1:1883).")
@click.option("--amqp", metavar="URL", help="RabbitMQ instead: amqp://user:pass@host:5672/vhost")
@click.option("--prefix", default="lifeline", show_default=True, help="The gateways' topic_prefix.")
@click.option("--share", metavar="GROUP", help="MQTT shared subscription $share/GROUP/...")
@click.option(
    "--client-id",
    help="MQTT client id, also the consumer's name in the database; keep it the same across "
    "restarts (the broker keeps the session by it). Default edge-consumer-HOSTNAME.",
)
@click.option("--mqtt-protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True)
@click.option("--username", help="MQTT user name.")
@click.option("--password-file", type=click.Path(dir_okay=False), help="MQTT password file.")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="TLS to the broker with this CA.")
@click.option("--queue", help="RabbitMQ queue (durable; default edge-agent.PREFIX).")
@click.option(
    "--format",
    "fmt",
    default="native",
    show_default=True,
    help="Encoding the gateways publish in (mqtt.format): native or sparkplug_b.",
)
@click.option(
    "--group",
    help="sparkplug_b: the Sparkplug group id (spBv1.0/GROUP/#); default every group.",
)
@click.option("--postgres", metavar="DSN", help="Store rows in PostgreSQL (libpq DSN or URL).")
@click.option("--output", "-o", default="-", show_default=True, help="JSON-lines file, - stdout.")
@click.option("--gaps", is_flag=True, help="Print the gap report of --postgres and exit.")
@click.option("--duration", type=float, default=0.0, help="Stop after SECONDS (0: never).")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option("--report-every", type=float, default=0.0, help="JSON lines: gap report every S.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def consume(
    mqtt: str | None,
    amqp: str | None,
    prefix: str,
    share: str | None,
    client_id: str | None,
    mqtt_protocol: str,
    username: str | None,
    password_file: str | None,
    ca_file: str | None,
    queue: str | None,
    fmt: str,
    group: str | None,
    postgres: str | None,
    output: str,
    gaps: bool,
    duration: float,
    batch: int,
    report_every: float,
    log_level: str,
) -> None:
    """The platform side: validate, deduplicate and account for the gateways' messages.

    Subscribes to PREFIX/+/# (QoS 1, persistent session) or reads a RabbitMQ queue, and
    writes JSON lines or PostgreSQL rows; see docs/platform.md. Needs the `consumer`
    extra: pip install 'lifeline-edge-agent[consumer]'.
    """
    setup_logging(log_level)
    try:
        from agent.consumer.main import Options
        from agent.consumer.main import run as run_consumer

        code = run_consumer(
            Options(
                mqtt=mqtt,
                amqp=amqp,
                prefix=prefix,
                share=share,
                client_id=client_id,
                protocol=mqtt_protocol,
                username=username,
                password_file=password_file,
                ca_file=ca_file,
                queue=queue,
                fmt=fmt,
                group=group,
                postgres=postgres,
                output=output,
                gaps=gaps,
                duration=duration,
                batch=batch,
                report_every=report_every,
            )
        )
    except ImportError as exc:
        raise click.ClickException(
            f"{exc}: install the consumer extra: pip install 'lifeline-edge-agent[consumer]'"
        ) from None
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
