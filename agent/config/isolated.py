"""Load the config in a short-lived process of its own, with limits on its memory and CPU.

The running agent needs the validated config, not the means of validating it: the YAML
parser, pydantic and the models of every section stay in the checking process, which ends
once it has handed the config over as plain objects (:mod:`drivers.plain`). The agent's
memory then holds neither them nor a model per point (for a 10,000-point config: about
20 MB less at the peak), and a hostile file that makes the loader spin or swell is cut
off by the limits below instead of starving the gateway.

The child (``python -m agent.config.isolated PATH [--secrets]``) writes one pickle to
its stdout: ``("ok", config, config_hash)`` with the config as plain twins, or
``("error", [ConfigIssue, ...])``. Only this module's own child is ever unpickled, through
a pipe: the bytes are made by the agent's own code from validated values, never copied
from the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.issues import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from agent.config.model import AgentConfig

MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
"""Address space of the checking process (RLIMIT_AS, setrlimit(2)). A file at the loader's
caps is explained within 100 MB of resident memory; the interpreter with its libraries maps
a few hundred MB of address space."""
CPU_LIMIT_S = 30
"""CPU seconds of the checking process (RLIMIT_CPU, setrlimit(2)): a file at the caps is
explained in under 2 s."""
WALL_LIMIT_S = 60.0
"""Longest wait for the checking process (a file system that stopped answering)."""


def _issue(path: str | Path, message: str) -> ConfigIssue:
    return ConfigIssue(str(path), 1, 1, "", f"cannot load the config: {message}")


def load_isolated(
    path: str | Path, need_secrets: bool = False, meanwhile: Callable[[], object] | None = None
) -> AgentConfig:
    """:func:`agent.config.loader.load_config` run in a child process.

    Args:
        path: the config file.
        need_secrets: as for ``load_config`` (the agent about to run).
        meanwhile: called once the child runs, before waiting for it (the agent imports
            its own modules then: the two starts overlap).
    Returns:
        the validated config, as ``load_config`` returns it but as plain twins
        (:func:`drivers.plain.to_plain`); typed as the model it mirrors.
    Raises:
        ConfigError: the problems ``load_config`` finds, each at ``file:line:col``; or one
            problem at ``file:1:1`` when the checking process could not finish (memory,
            CPU or :data:`WALL_LIMIT_S` exceeded, killed).
    """
    from agent.contract.info import remember_hash

    if not sys.executable:  # embedded without an interpreter to start: load here
        from agent.config.loader import load_config

        if meanwhile is not None:
            meanwhile()
        return load_config(path, need_secrets)
    args = [sys.executable, "-m", "agent.config.isolated", os.fspath(path)]
    if need_secrets:
        args.append("--secrets")
    env = dict(os.environ)
    home = str(Path(__file__).resolve().parents[2])  # where this copy of `agent` lives
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    ) as child:  # on any exception: killed and waited for
        try:
            if meanwhile is not None:
                meanwhile()
            out, _ = child.communicate(timeout=WALL_LIMIT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            why = f"it did not load within {WALL_LIMIT_S:g} s"
            raise ConfigError([_issue(path, why)]) from None
        except BaseException:
            child.kill()
            raise
    code = child.returncode
    if code != 0 or not out:
        if code == -signal.SIGXCPU:
            why = f"loading it took more than {CPU_LIMIT_S} s of CPU"
        elif code == -signal.SIGKILL:
            why = "the process checking it was killed (its CPU limit, or out of memory)"
        elif code < 0:
            why = f"the process checking it ended on signal {signal.Signals(-code).name}"
        else:
            why = f"the process checking it failed (exit status {code})"
        raise ConfigError([_issue(path, why)])
    kind, *rest = pickle.loads(out)  # our own child's, see the module doc
    if kind == "error":
        raise ConfigError(rest[0])
    cfg, digest = rest
    share_equal_values(cfg)  # again: pickle gives each number its own object
    remember_hash(cfg, digest)
    return cfg  # type: ignore[no-any-return]


def _child(path: str, need_secrets: bool) -> tuple[object, ...]:
    import resource

    from agent.config.loader import load_config
    from agent.contract.info import config_hash

    # a system call filter that refuses setrlimit(2) (systemd's @resources) leaves the
    # loader's own caps and the parent's WALL_LIMIT_S: the check goes on without these
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 5))
    try:
        cfg = load_config(path, need_secrets)
    except ConfigError as exc:
        return ("error", exc.issues)
    except MemoryError:
        limit = MEMORY_LIMIT_BYTES // 1024 // 1024
        return ("error", [_issue(path, f"it needs more than {limit} MB to load")])
    from drivers.plain import to_plain

    digest = config_hash(cfg)
    plain = to_plain(cfg)
    share_equal_values(plain)
    return ("ok", plain, digest)


def share_equal_values(cfg: Any) -> None:
    """Let the points of ``cfg`` (plain twins, :mod:`drivers.plain`) share equal values
    (the same unit, type, scale, an empty list...) instead of holding a copy each. Done
    before pickling (pickle hands a shared object over as one) and after (numbers it does
    not share). Values stay equal, and twins are frozen: nothing is changed in place later."""
    seen: dict[tuple[type, object], object] = {}
    for dev in cfg.devices:
        for point in getattr(dev, "points", ()):
            for key in getattr(point, "__slots__", ()):
                value = getattr(point, key)
                if type(value) in (str, int, float):
                    object.__setattr__(point, key, seen.setdefault((type(value), value), value))
                elif type(value) is list and not value:  # no point changes its config
                    object.__setattr__(point, key, seen.setdefault((list, ()), value))


def main() -> None:
    """The checking process: one pickle on stdout (anything else printed goes to stderr)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    result = _child(sys.argv[1], "--secrets" in sys.argv[2:])
    with contextlib.suppress(BrokenPipeError):
        out.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        out.close()


if __name__ == "__main__":
    main()
