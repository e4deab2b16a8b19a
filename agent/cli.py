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


def load_or_exit(path: str) -> object:
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

    cfg = load_or_exit(config_file)
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

    cfg = load_or_exit(config_file)
    assert isinstance(cfg, AgentConfig)
    setup_logging(log_level or cfg.log_level)
    try:
        code = asyncio.run(run_agent(cfg))
    except BufferError as exc:
        logging.getLogger("agent").critical("%s", exc)
        code = EX_CONFIG if isinstance(exc, StateDirError) else 1
    sys.exit(code)


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
@click.option("--seconds", default=3.0, show_default=True, help="How long to switch it on.")
def gpio_test(config_file: str, output: str, seconds: float) -> None:
    """Switch OUTPUT (a name from the config's outputs) on for a few seconds, then back
    to its safe state, reading the pin back each time. Stop the agent first: it owns the
    pins while it runs."""
    import time

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


def _add_modbus_commands() -> None:
    from agent.cli_modbus import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_modbus_commands()
