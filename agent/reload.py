"""Hot reload of the config on SIGHUP (``systemctl reload``): validate, plan, apply.

A reload reads the config file again exactly as ``edge-agent run`` does at start
(:func:`agent.config.loader.load_config` in a checking process of its own,
:mod:`agent.config.isolated`; secrets checked), waited for on a thread of its own and
within :data:`LOAD_TIMEOUT_S`, so that the event loop keeps polling and publishing
meanwhile. A file that does not load is refused: every problem is logged at
``FILE:LINE:COL``, a ``reload_failed`` notice carries them to the platform, and the
running config stays as it is, untouched.

A file that loads is compared with the running config (:func:`plan_reload`, pure) and
applied (:class:`Reloader`):

- devices added start, devices removed stop (their retained ``availability`` and alarm
  topics are cleared: :meth:`agent.retained.RetainedState.reown`), devices whose settings
  changed start again alone (on a shared Modbus bus the others keep their schedule; a
  bus whose own settings changed, e.g. the baud rate, starts again with all its
  devices), and unchanged devices go on polling with no gap in their timing;
- alarms whose rule is unchanged keep their state (an active latched alarm stays active,
  the outputs following it stay on); an added or changed rule starts from ``normal``;
- ``availability`` settings and a changed ``log_level`` apply at once; the retained
  ``info`` is published again (its ``config_hash`` is that of the config now running);
- keys that need a restart (:data:`RESTART_KEYS`) keep their running value and are
  named in the log and in the ``reloaded`` notice.

Nothing buffered is lost: removed and restarted device tasks are cancelled between two
polls (a poll in progress produces no reading; what was polled is committed as always),
and the buffer, the MQTT session and the alarm engine are the same objects throughout.

systemd: with ``ExecReload=/bin/kill -HUP $MAINPID`` (``Type=notify``) or with
``Type=notify-reload`` (systemd 253+, which sends ``ReloadSignal=``, SIGHUP by default),
systemd.service(5). :attr:`Reloader.on_begin` and :attr:`Reloader.on_end` are called
around each reload (whatever its outcome) for ``RELOADING=1`` and ``READY=1``
(sd_notify(3)).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.alarms import Alarm
from agent.config.isolated import load_isolated
from agent.config.issues import ConfigError, ConfigIssue
from agent.supervise import where_raised
from drivers.kinds import is_modbus, on_a_line

if TYPE_CHECKING:
    from agent.app import Agent
    from agent.config.model import AgentConfig

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 30.0
"""Longest a reload waits for the config to load; a slower load (a file system that
stopped answering) is refused, and the running config stays."""
STOP_TIMEOUT_S = 5.0
"""Longest a reload waits for the tasks of removed or restarted devices to end."""
NOTICE_ERRORS_MAX = 20
"""At most this many problems are listed in a ``reload_failed`` notice (all are logged)."""
NOTICE_ERROR_CHARS = 500
"""Each listed problem is cut to this many characters in the notice."""

RESTART_KEYS = ("gateway_id", "state_dir", "mqtt", "buffer", "clock", "gpio", "outputs")
"""Sections a reload does not apply (the running value stays until the next start):

- ``gateway_id``, ``mqtt`` (``topic_prefix`` included): they name every topic and the
  MQTT session; in-flight QoS 1 messages belong to the session they were sent in, and a
  restart hands them over cleanly (the buffer keeps everything unacknowledged);
- ``state_dir``, ``buffer``: the buffer file, its lock and its limits are set when it is
  opened;
- ``clock``: the clock's trust is established once at start;
- ``gpio``, ``outputs``: the pins are claimed at start; setting them up again would pass
  every output through its safe state (a relay that is on would drop for a moment).
"""


# -- the plan (pure) ---------------------------------------------------------------------------


def bus_identity(devices: Sequence[Any]) -> tuple[Any, ...]:
    """What the driver object of a bus is made from (:func:`agent.app.make_bus`), apart
    from the default timeout (every poll passes its own device's timeout): two groups of
    devices with the same identity can share the running bus object. Pure."""
    first = devices[0]
    if on_a_line(first):
        gaps = [g for d in devices if (g := getattr(d, "frame_gap", None)) is not None]
        pause = max(getattr(d, "connect_pause", 0.0) for d in devices)
        return (
            type(first).__name__,
            first.bus,
            first.line_settings,
            max(gaps, default=None),
            pause,
        )
    if is_modbus(first):
        return (type(first).__name__, first.bus)
    return (type(first).__name__, first.bus, first)


def alarm_keys(cfg: AgentConfig) -> dict[str, tuple[Any, str, str | None]]:
    """Every alarm of ``cfg``: ``device/rule`` → (rule, device id, unit of its point), in
    the order of :func:`agent.app.expand_rules` (rules, then devices). Pure."""
    out: dict[str, tuple[Any, str, str | None]] = {}
    for rule in cfg.alarms:
        for d in cfg.devices:
            if d.id == rule.device or (rule.profile is not None and d.profile == rule.profile):
                unit = next((p.unit for p in d.points if p.name == rule.point), None)
                out[f"{d.id}/{rule.id}"] = (rule, d.id, unit)
    return out


def changed_keys(name: str, old: Any, new: Any) -> list[str]:
    """The dotted keys under ``name`` whose values differ (a section's own fields, one
    level down; a list or value: ``name`` itself). Pure; never looks at more than names."""
    if old == new:
        return []
    fields = getattr(type(old), "model_fields", None)  # a model, or its plain twin
    if fields is not None and type(old) is type(new):
        return [f"{name}.{f}" for f in fields if getattr(old, f) != getattr(new, f)] or [name]
    return [name]


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload changes. Device and bus lists are sorted; :attr:`config` is the config
    that runs after it: the new file with the :data:`RESTART_KEYS` of the running one."""

    config: AgentConfig
    added: tuple[str, ...] = ()
    """Devices that start."""
    removed: tuple[str, ...] = ()
    """Devices that stop (their retained topics are cleared)."""
    restarted: tuple[str, ...] = ()
    """Devices that start again (changed, or on a bus that starts again)."""
    buses_started: tuple[str, ...] = ()
    buses_stopped: tuple[str, ...] = ()
    buses_restarted: tuple[str, ...] = ()
    """Buses (and sensor ports) whose task starts again with all its devices."""
    buses_updated: tuple[str, ...] = ()
    """Modbus buses that keep their task and connection, with devices added, removed or
    changed on them."""
    alarms_reset: tuple[str, ...] = ()
    """Alarms (``device/rule``) added or whose rule changed: they start from ``normal``."""
    alarms_removed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    """Dotted keys that changed but apply only at the next start."""
    log_level: str | None = None
    """The new log level, when it changed."""
    availability: bool = False
    """Whether the ``availability`` settings changed."""
    bus_devices: dict[str, list[Any]] = field(default_factory=dict)
    """Every bus of :attr:`config` and its devices, in config order."""

    @property
    def changes(self) -> bool:
        """Whether anything is applied."""
        return bool(
            self.added
            or self.removed
            or self.restarted
            or self.alarms_reset
            or self.alarms_removed
            or self.log_level
            or self.availability
        )


def _buses(cfg: AgentConfig) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for d in cfg.devices:
        groups[d.bus].append(d)
    return dict(groups)


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """Compare the running config ``old`` with the newly loaded ``new``. Pure.

    Devices are matched by id and compared by their whole resolved settings (profiles
    merged, paths resolved), so a change to a profile or an included file restarts the
    devices that use it. Alarms are matched by ``device/rule`` and keep their state when
    the rule's settings are equal (the device's other settings do not matter).
    """
    needs = [
        k
        for name in RESTART_KEYS
        for k in changed_keys(name, getattr(old, name), getattr(new, name))
    ]
    config = new.model_copy(update={name: getattr(old, name) for name in RESTART_KEYS})
    old_devs = {d.id: d for d in old.devices}
    new_devs = {d.id: d for d in new.devices}
    added = set(new_devs) - set(old_devs)
    removed = set(old_devs) - set(new_devs)
    changed = {i for i in set(old_devs) & set(new_devs) if old_devs[i] != new_devs[i]}
    old_buses, new_buses = _buses(old), _buses(config)
    started = set(new_buses) - set(old_buses)
    stopped = set(old_buses) - set(new_buses)
    restarted_buses, updated = set(), set()
    for bus in set(old_buses) & set(new_buses):
        before, after = old_buses[bus], new_buses[bus]
        if [d.id for d in before] == [d.id for d in after] and before == after:
            continue
        modbus = all(is_modbus(d) for d in (*before, *after))
        if modbus and bus_identity(before) == bus_identity(after):
            updated.add(bus)
        else:
            restarted_buses.add(bus)
    restarted = set(changed)
    for bus in restarted_buses:
        restarted |= {d.id for d in new_buses[bus]} - added
    old_alarms, new_alarms = alarm_keys(old), alarm_keys(new)
    reset = {k for k, v in new_alarms.items() if k not in old_alarms or old_alarms[k][0] != v[0]}
    return ReloadPlan(
        config=config,
        added=tuple(sorted(added)),
        removed=tuple(sorted(removed)),
        restarted=tuple(sorted(restarted)),
        buses_started=tuple(sorted(started)),
        buses_stopped=tuple(sorted(stopped)),
        buses_restarted=tuple(sorted(restarted_buses)),
        buses_updated=tuple(sorted(updated)),
        alarms_reset=tuple(sorted(reset)),
        alarms_removed=tuple(sorted(set(old_alarms) - set(new_alarms))),
        needs_restart=tuple(needs),
        log_level=new.log_level if new.log_level != old.log_level else None,
        availability=old.availability != new.availability,
        bus_devices=new_buses,
    )


def failure_notice(issues: Sequence[ConfigIssue]) -> tuple[str, dict[str, Any]]:
    """The ``reload_failed`` notice (message, members) for these problems: at most
    :data:`NOTICE_ERRORS_MAX`, each cut to :data:`NOTICE_ERROR_CHARS`. The loader's
    problems name files, lines and keys, never a secret's value. Pure."""
    errors = [str(i)[:NOTICE_ERROR_CHARS] for i in issues if i.level == "error"]
    errors = errors or [str(i)[:NOTICE_ERROR_CHARS] for i in issues] or ["unknown problem"]
    n = len(errors)
    message = (
        f"the config was not reloaded: {n} problem{'s' if n != 1 else ''} (first: "
        f"{errors[0]}); the running config is kept"
    )
    return message, {"errors": errors[:NOTICE_ERRORS_MAX], "error_count": n}


def success_notice(plan: ReloadPlan) -> tuple[str, dict[str, Any]]:
    """The ``reloaded`` notice (message, members) of an applied plan. Pure."""
    parts = []
    for what, ids in (
        ("added", plan.added),
        ("removed", plan.removed),
        ("restarted", plan.restarted),
        ("alarms reset", plan.alarms_reset),
        ("alarms removed", plan.alarms_removed),
    ):
        if ids:
            parts.append(f"{what}: {', '.join(ids)}")
    if plan.log_level:
        parts.append(f"log level {plan.log_level}")
    if plan.availability:
        parts.append("availability settings")
    said = "; ".join(parts) if parts else "nothing to change"
    if plan.needs_restart:
        said += f"; not applied until a restart: {', '.join(plan.needs_restart)}"
    return f"the config was reloaded ({said})", {
        "added": list(plan.added),
        "removed": list(plan.removed),
        "restarted": list(plan.restarted),
        "alarms_reset": list(plan.alarms_reset),
        "alarms_removed": list(plan.alarms_removed),
        "needs_restart": list(plan.needs_restart),
    }


def carry_alarms(
    old: Iterable[Alarm], new: dict[str, tuple[Any, str, str | None]], reset: Iterable[str]
) -> list[Alarm]:
    """The alarms after a reload, in the order of ``new`` (:func:`alarm_keys`): an alarm
    not in ``reset`` keeps its state (with the unit its point has now); the others start
    fresh (the engine sets their state). Pure apart from making :class:`Alarm` objects."""
    before = {a.key: a for a in old}
    fresh = set(reset)
    out = []
    for key, (rule, device, unit) in new.items():
        a = Alarm(rule, device, unit)
        if key not in fresh and key in before:
            a.state = before[key].state
        out.append(a)
    return out


# -- applying it -------------------------------------------------------------------------------


class Reloader:
    """Reloads the config of one :class:`agent.app.Agent` from ``path``.

    :meth:`request` is the SIGHUP handler; requests that arrive while a reload runs are
    folded into one more reload after it.

    Args:
        agent: the running agent.
        path: the config file, as given to ``edge-agent run``.
    """

    def __init__(self, agent: Agent, path: str) -> None:
        self.agent = agent
        self.path = path
        self.on_begin: Callable[[], None] = lambda: None
        """Called as a reload begins (systemd: ``RELOADING=1``)."""
        self.on_end: Callable[[], None] = lambda: None
        """Called when a reload is over, applied or refused (systemd: ``READY=1``)."""
        self.reloads = 0
        """Reloads applied so far."""
        self.refused = 0
        """Reloads refused so far (invalid config, or too slow to load)."""
        self._task: asyncio.Task[None] | None = None
        self._again = False
        # one thread, made for reloads: a load that hangs past its timeout can only
        # hold up later reloads, never the buffer or the loop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")

    def request(self) -> None:
        """Reload soon (from a signal handler on the loop)."""
        if self.agent.stop_event.is_set():
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reload")

    async def _run(self) -> None:
        while True:
            self._again = False
            self.on_begin()
            try:
                await self.reload()
            except Exception as exc:  # a bug: said (type and place, never the text), not fatal
                log.critical(
                    "reload failed: %s at %s; the agent goes on, a restart applies the config",
                    type(exc).__name__,
                    where_raised(exc),
                )
            finally:
                self.on_end()
            if not self._again or self.agent.stop_event.is_set():
                return

    async def run_now(self) -> bool:
        """Reload now (the ``reload`` command) and wait for it; whether a reload was
        applied (False: refused, or the agent is stopping). A reload already running is
        followed by one more, as with :meth:`request`."""
        before = self.reloads
        self.request()
        task = self._task
        if task is None or self.agent.stop_event.is_set():
            return False
        await asyncio.shield(task)
        return self.reloads > before

    async def close(self) -> None:
        """Cancel a reload in progress (the agent stops) and let the thread go."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def reload(self) -> bool:
        """Load the file and apply it; return whether it was applied."""
        log.info("reloading the config from %s", self.path)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                new = await loop.run_in_executor(self._pool, load_isolated, self.path, True)
        except ConfigError as exc:
            self._refuse(exc.issues)
            return False
        except TimeoutError:
            self._refuse(
                [
                    ConfigIssue(
                        self.path,
                        1,
                        1,
                        "",
                        f"the config did not load within {LOAD_TIMEOUT_S:g} s",
                    )
                ]
            )
            return False
        if self.agent.stop_event.is_set():
            return False
        plan = plan_reload(self.agent.cfg, new)
        await self.apply(plan)
        self.reloads += 1
        message, fields = success_notice(plan)
        log.info("%s in %.0f ms", message, (time.monotonic() - started) * 1000)
        if plan.needs_restart:
            log.warning(
                "config keys changed that apply only at the next start (systemctl restart "
                "edge-agent): %s",
                ", ".join(plan.needs_restart),
            )
        self.agent.notice("reloaded", message, **fields)
        return True

    def _refuse(self, issues: Sequence[ConfigIssue]) -> None:
        self.refused += 1
        for issue in issues:
            log.error("%s", issue)
        message, fields = failure_notice(issues)
        log.error("%s", message)
        self.agent.notice("reload_failed", message, **fields)

    async def apply(self, plan: ReloadPlan) -> None:
        """Apply ``plan`` to the agent: stop, then start, the device tasks it names, and
        bring the alarms, availability, retained topics and ``info`` up to date."""
        agent = self.agent
        stop = [*plan.buses_stopped, *plan.buses_restarted]
        await agent.stop_buses(stop, STOP_TIMEOUT_S)
        agent.cfg = plan.config
        for dev_id in plan.removed:
            agent.forget_device(dev_id)
        new_devs = {d.id: d for d in plan.config.devices}
        for dev_id in (*plan.added, *plan.restarted):
            agent.add_device(new_devs[dev_id])
        for bus in plan.buses_updated:
            agent.update_bus(bus, plan.bus_devices[bus])
        for bus in (*plan.buses_started, *plan.buses_restarted):
            agent.start_bus(bus, plan.bus_devices[bus])
        alarms = carry_alarms(agent.alarms.alarms, alarm_keys(plan.config), plan.alarms_reset)
        agent.replace_alarms(alarms, set(plan.alarms_reset))
        if plan.log_level:
            logging.getLogger().setLevel(plan.log_level.upper())
        agent.config_changed()
