"""``edge-agent consume``: the options of :mod:`agent.cli` put together into a source, a
format, a sink and the loop of :mod:`agent.consumer.run`."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import IO

from agent.consumer.decode import FORMATS, Context
from agent.consumer.run import consume, final_report
from agent.consumer.sinks import JsonLinesSink, Sink
from agent.consumer.sources import AmqpSource, MqttSource, Source

log = logging.getLogger("edge-agent.consume")


@dataclass
class Options:
    """What ``edge-agent consume`` was given (see its ``--help``)."""

    mqtt: str | None = None
    amqp: str | None = None
    prefix: str = "lifeline"
    share: str | None = None
    client_id: str | None = None
    protocol: str = "5"
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    queue: str | None = None
    fmt: str = "native"
    group: str | None = None
    postgres: str | None = None
    output: str = "-"
    gaps: bool = False
    duration: float = 0.0
    batch: int = 500
    report_every: float = 0.0


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port); raise ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, default_port
    return host, int(port)


def print_gaps(gaps: dict[str, list[tuple[int, int]]], out: IO[str]) -> None:
    """One JSON line per gateway with missing seqs: ``gateway``, ``missing`` ranges."""
    for gw, ranges in sorted(gaps.items()):
        out.write(json.dumps({"gateway": gw, "missing": [list(r) for r in ranges]}) + "\n")


def run(opts: Options) -> int:
    """Run the consumer; the exit code: 0, or with ``gaps`` 1 when seqs are missing.

    Raises:
        ValueError: contradictory or malformed options (a message for the user).
    """
    if opts.gaps:
        if not opts.postgres:
            raise ValueError("--gaps reads the report of the database: give --postgres DSN")
        import psycopg

        from agent.consumer.postgres import create_schema, gap_report

        with psycopg.connect(opts.postgres, autocommit=True) as conn:
            create_schema(conn)
            gaps = gap_report(conn)
        print_gaps(gaps, sys.stdout)
        return 1 if gaps else 0
    if opts.mqtt and opts.amqp:
        raise ValueError("--mqtt and --amqp: give one source")
    if opts.share and opts.postgres is None:
        log.warning(
            "with --share each consumer sees part of the messages: the gap report of "
            "JSON lines is per consumer; use --postgres for one report"
        )
    fmt = FORMATS.get(opts.fmt)
    if fmt is None:
        raise ValueError(f"--format {opts.fmt}: one of {', '.join(FORMATS)}")
    scope = opts.prefix
    if fmt.name == "sparkplug_b":
        scope = opts.group or "+"
    elif opts.group is not None:
        raise ValueError("--group is the Sparkplug group: only with --format sparkplug_b")
    filters = fmt.filters(scope)
    state_filters = fmt.state_filters(scope) if fmt.state_filters else [f"{scope}/+/info"]
    consumer = opts.client_id or f"edge-consumer-{socket.gethostname()}"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    out: IO[str] | None = None
    sink: Sink
    if opts.postgres:
        from agent.consumer.postgres import PostgresSink

        sink = PostgresSink(opts.postgres, consumer, stop)
    else:
        out = sys.stdout if opts.output == "-" else open(opts.output, "a", encoding="utf-8")  # noqa: SIM115
        sink = JsonLinesSink(out)
    source: Source
    if opts.amqp:
        source = AmqpSource(opts.amqp, opts.queue or f"edge-agent.{opts.prefix}", filters)
    else:
        host, port = host_port(opts.mqtt or "127.0.0.1", 8883 if opts.ca_file else 1883)
        source = MqttSource(
            host,
            port,
            filters,
            consumer,
            share=opts.share,
            info_filters=state_filters,
            protocol=opts.protocol,
            username=opts.username,
            password_file=opts.password_file,
            ca_file=opts.ca_file,
        )
    log.info(
        "consuming %s (%s format) into %s as %s",
        ", ".join(filters),
        fmt.name,
        "PostgreSQL" if opts.postgres else opts.output,
        consumer,
    )
    try:
        consume(
            source,
            sink,
            fmt,
            Context(prefix=scope),
            stop,
            duration_s=opts.duration,
            batch_size=opts.batch,
            report_every_s=opts.report_every,
        )
    except Exception as exc:
        if stop.is_set():  # a retry given up at the stop
            log.info("stopped while retrying: %s", exc)
            return 0
        raise
    finally:
        source.close()
    try:
        final_report(sink)
    finally:
        sink.close()
        if out is not None and out is not sys.stdout:
            out.close()
    return 0
