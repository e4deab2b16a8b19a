"""The PostgreSQL sink: rows shared by any number of consumer processes (``docs/platform.md``).

Tables (created when missing, under one advisory lock so consumers starting together do
not race; PostgreSQL 14 or newer, for multiranges):

- ``edge_messages``: one row per sequenced message, primary key (``gateway``, ``seq``);
  a second copy is ``INSERT … ON CONFLICT DO NOTHING``, a no-op. ``payload`` is the
  message as JSON (``jsonb``), ``ts`` its time stamp as sent, ``consumer`` the consumer
  that stored it.
- ``edge_retained``: the latest retained message per topic (status, info, health,
  availability, alarm states; ``payload`` NULL once the topic was cleared).
- ``edge_rejected``: messages refused, with the reason and their first bytes.

Views, computed at query time, so that their answer never depends on which consumer got
which message first:

- ``edge_drops``, ``edge_restamps``: the ``dropped`` and ``clock_restamp`` notices.
- ``edge_messages_true_time``: every message with ``ts_true``, its ``ts`` plus the
  ``correction_ms`` of the ``clock_restamp`` notice covering it when it is flagged
  ``"clock":"unsynced"`` (``docs/mqtt.md``, Clock trust).
- ``edge_gaps``: per gateway, the seq ranges within 1..(largest stored) neither stored
  nor covered by a ``dropped`` notice (the at-least-once rule of ``docs/mqtt.md``).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg

from agent.consumer.decode import Record
from agent.consumer.sinks import HEAD, Counts, Item, Rejected

log = logging.getLogger("edge-agent.consume")

SCHEMA_SQL = """
SELECT pg_advisory_xact_lock(hashtext('lifeline-edge-agent consumer schema'));
CREATE TABLE IF NOT EXISTS edge_messages (
    gateway text NOT NULL,
    seq bigint NOT NULL,
    topic text NOT NULL,
    kind text NOT NULL,
    schema text NOT NULL,
    device text,
    type text,
    ts timestamptz,
    clock text,
    payload jsonb NOT NULL,
    consumer text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, seq)
);
CREATE INDEX IF NOT EXISTS edge_messages_notices ON edge_messages (gateway, type)
    WHERE kind = 'notice';
CREATE TABLE IF NOT EXISTS edge_retained (
    topic text PRIMARY KEY,
    gateway text NOT NULL,
    kind text NOT NULL,
    schema text NOT NULL,
    payload jsonb,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS edge_rejected (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    reason text NOT NULL,
    payload_head bytea NOT NULL,
    consumer text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE VIEW edge_drops AS
    SELECT gateway, seq AS notice_seq,
           (payload->>'first_seq')::bigint AS first_seq,
           (payload->>'last_seq')::bigint AS last_seq,
           (payload->>'count')::bigint AS count
    FROM edge_messages WHERE kind = 'notice' AND type = 'dropped';
CREATE OR REPLACE VIEW edge_restamps AS
    SELECT gateway, seq AS notice_seq,
           (payload->>'first_seq')::bigint AS first_seq,
           (payload->>'last_seq')::bigint AS last_seq,
           (payload->>'correction_ms')::bigint AS correction_ms
    FROM edge_messages WHERE kind = 'notice' AND type = 'clock_restamp';
CREATE OR REPLACE VIEW edge_messages_true_time AS
    SELECT m.*, r.correction_ms,
           m.ts + coalesce(r.correction_ms, 0) * interval '1 millisecond' AS ts_true
    FROM edge_messages m
    LEFT JOIN LATERAL (
        SELECT correction_ms FROM edge_restamps r
        WHERE r.gateway = m.gateway AND m.seq BETWEEN r.first_seq AND r.last_seq
        ORDER BY r.notice_seq DESC LIMIT 1
    ) r ON m.clock = 'unsynced';
CREATE OR REPLACE VIEW edge_gaps AS
    WITH s AS (
        SELECT gateway, seq,
               lag(seq, 1, 0::bigint) OVER (PARTITION BY gateway ORDER BY seq) AS prev
        FROM edge_messages
    ), holes AS (
        SELECT gateway, range_agg(int8range(prev + 1, seq)) AS r
        FROM s WHERE seq > prev + 1 GROUP BY gateway
    ), drops AS (
        SELECT gateway, range_agg(int8range(first_seq, last_seq + 1)) AS r
        FROM edge_drops WHERE first_seq BETWEEN 1 AND last_seq GROUP BY gateway
    )
    SELECT h.gateway, lower(g) AS first_seq, upper(g) - 1 AS last_seq,
           upper(g) - lower(g) AS missing
    FROM holes h LEFT JOIN drops d ON d.gateway = h.gateway,
         LATERAL unnest(h.r - coalesce(d.r, '{}'::int8multirange)) AS g;
"""

INSERT_MESSAGE = """
INSERT INTO edge_messages
    (gateway, seq, topic, kind, schema, device, type, ts, clock, payload, consumer)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (gateway, seq) DO NOTHING
"""

UPSERT_RETAINED = """
INSERT INTO edge_retained (topic, gateway, kind, schema, payload)
VALUES (%s, %s, %s, %s, %s::jsonb)
ON CONFLICT (topic) DO UPDATE SET
    gateway = excluded.gateway, kind = excluded.kind, schema = excluded.schema,
    payload = excluded.payload, received_at = excluded.received_at
"""

INSERT_REJECTED = """
INSERT INTO edge_rejected (topic, reason, payload_head, consumer) VALUES (%s, %s, %s, %s)
"""

GAPS = "SELECT gateway, first_seq, last_seq FROM edge_gaps ORDER BY gateway, first_seq"


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _message_row(r: Record, consumer: str) -> tuple[Any, ...]:
    return (
        r.gateway,
        r.seq,
        r.topic,
        r.kind,
        r.schema,
        r.device,
        r.type,
        _ts(r.ts_ms),
        r.clock,
        r.text,
        consumer,
    )


def _retained_row(r: Record) -> tuple[Any, ...]:
    return (r.topic, r.gateway, r.kind, r.schema, r.text or None)


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the tables and views when missing (idempotent; see the module's doc)."""
    with conn.transaction():
        conn.execute(SCHEMA_SQL)  # a constant: several statements in one


def gap_report(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[int, int]]]:
    """Per gateway with any: the seq ranges (first, last) of ``edge_gaps``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for gw, a, b in conn.execute(GAPS).fetchall():
        out.setdefault(gw, []).append((int(a), int(b)))
    return out


class PostgresSink:
    """Writes batches into the tables of this module, one transaction per batch.

    A lost connection is opened again (every ``retry_s`` until it works or ``stop`` is
    set) and the batch written again; a batch the server refuses for its content (a
    string PostgreSQL cannot store, such as one holding ``\\u0000``) is written again one
    message at a time, each in a savepoint, and the messages it still refuses go to
    ``edge_rejected``: one bad message never stops the others.

    Raises:
        psycopg.OperationalError: the first connection failed (a wrong DSN).
    """

    def __init__(
        self,
        dsn: str,
        consumer: str,
        stop: threading.Event | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.consumer = consumer
        self.stop = stop or threading.Event()
        self.retry_s = retry_s
        self.counts = Counts()
        self.conn = self._connect()
        create_schema(self.conn)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)

    def write(self, batch: list[Item]) -> None:
        while True:
            try:
                self._write(batch)
                return
            except psycopg.OperationalError as exc:
                log.warning("PostgreSQL: %s; retrying in %.0f s", str(exc).strip(), self.retry_s)
                if self.stop.wait(self.retry_s):
                    raise
                self.conn.close()
                try:
                    self.conn = self._connect()
                except psycopg.OperationalError:
                    continue

    def _write(self, batch: list[Item]) -> None:
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                stored, retained, rejected = self._rows(cur, batch)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.warning("PostgreSQL refused a batch (%s): writing it one by one", exc)
            stored = retained = rejected = 0
            with self.conn.transaction(), self.conn.cursor() as cur:
                for item in batch:
                    try:
                        with self.conn.transaction():
                            s, k, j = self._rows(cur, [item])
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error as err:
                        reason = f"refused by PostgreSQL: {str(err).strip()[:200]}"
                        head = item.text.encode() if isinstance(item, Record) else item.head
                        cur.execute(
                            INSERT_REJECTED, (item.topic, reason, head[:HEAD], self.consumer)
                        )
                        s, k, j = 0, 0, 1
                    stored, retained, rejected = stored + s, retained + k, rejected + j
        sequenced = sum(1 for i in batch if isinstance(i, Record) and i.seq is not None)
        self.counts.stored += stored
        self.counts.duplicates += sequenced - stored - self._refused_sequenced(batch, rejected)
        self.counts.retained += retained
        self.counts.rejected += rejected

    @staticmethod
    def _refused_sequenced(batch: list[Item], rejected: int) -> int:
        return max(0, rejected - sum(1 for i in batch if isinstance(i, Rejected)))

    def _rows(self, cur: psycopg.Cursor[Any], batch: list[Item]) -> tuple[int, int, int]:
        """Write ``batch`` with ``cur``: (messages stored, retained, rejected)."""
        msgs = [i for i in batch if isinstance(i, Record) and i.seq is not None]
        kept = [i for i in batch if isinstance(i, Record) and i.seq is None]
        bad = [i for i in batch if isinstance(i, Rejected)]
        stored = 0
        if msgs:
            cur.executemany(INSERT_MESSAGE, [_message_row(r, self.consumer) for r in msgs])
            stored = max(0, cur.rowcount)
        if kept:
            cur.executemany(UPSERT_RETAINED, [_retained_row(r) for r in kept])
        if bad:
            cur.executemany(
                INSERT_REJECTED, [(b.topic, b.reason, b.head[:HEAD], self.consumer) for b in bad]
            )
        return stored, len(kept), len(bad)

    def report(self) -> dict[str, list[tuple[int, int]]]:
        return gap_report(self.conn)

    def close(self) -> None:
        self.conn.close()
