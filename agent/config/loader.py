"""Load the YAML config into :class:`AgentConfig`, reporting every problem at file:line:col.

Flow: read each file (at most :data:`MAX_FILE_BYTES`), walk its YAML events for nesting
and alias bombs before anything is built from it, build its data from the same events in
one more pass (:func:`_build`: maps and lists that keep the line and column of every key,
value and item; duplicate keys are found on the way), splice ``include`` files into
``devices`` and load the device profiles (both confined to the config file's
directory), validate with pydantic, then map each error's ``loc`` back to
the YAML position it came from. Positions are 1-based lines and columns.
"""

from __future__ import annotations

import difflib
import functools
import glob
import grp
import itertools
import json
import os
import pwd
import re
import ssl
import stat
import sys
import types
import typing
from array import array
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.composer import ComposerError
from ruamel.yaml.constructor import ConstructorError, DuplicateKeyError, SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, StreamMark, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.reader import Reader, ReaderError
from ruamel.yaml.resolver import VersionedResolver

from agent.config.issues import ConfigError, ConfigIssue
from agent.config.model import (
    PORTABLE_CLIENT_ID_MAX,
    AgentConfig,
    MqttConfig,
    TlsConfig,
)
from agent.tls import (
    CREDENTIALS_ENV,
    MAX_KEY_BYTES,
    MAX_PEM_BYTES,
    SecretError,
    credential_path,
    is_loopback,
    load_client_cert,
    read_regular_file,
    read_secret_file,
    security_warnings,
)
from drivers.modbus.config import (
    ModbusPoint,
    ModbusProfile,
    check_decimal_point_refs,
    modicon_address,
)
from drivers.names import (
    DISPLAY_NAME_MAX,
    NAME_PATTERN,
    NAME_RULE,
    control_character,
    short_repr,
    suggest_name,
)


def _offset_to_pos(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


MAX_FILE_BYTES = 3_000_000
"""Largest config, include or profile file, bytes. 10 devices × 1,000 points written one
key per line, each point with a description, take 2.5 MB; a bigger file is refused before
it is parsed."""
MAX_VALUES = 250_000
"""Most values a file may hold once its aliases are expanded (the 10,000-point config above
holds 110,000)."""
MAX_DEPTH = 64
"""Deepest nesting of lists and maps in a file (a config needs 6)."""
MAX_FILES = 64
"""Most files one config may be made of: the config file, its includes and its profiles."""
MAX_TOTAL_BYTES = MAX_FILE_BYTES
"""Most bytes in all the files of one config together."""
MAX_TOTAL_VALUES = MAX_VALUES
"""Most values (keys, lists and maps count too) in all the files of one config together."""


@dataclass
class _Budget:
    """What the files of one config have used so far of :data:`MAX_FILES`,
    :data:`MAX_TOTAL_BYTES` and :data:`MAX_TOTAL_VALUES`: without it an include pattern
    matching a thousand files would multiply the per-file caps by a thousand."""

    files: int = 0
    bytes: int = 0
    values: int = 0
    first: str = ""
    """The file the budget started with (the config file), for messages."""
    texts: dict[str, tuple[str, _Reading]] = field(default_factory=dict)
    """Files read and walked ahead (:func:`_prefetch`), by path, until they are parsed."""

    def take_file(self, size: int, display: str) -> None:
        """Count one more file of ``size`` bytes.

        Raises:
            _Refused: past :data:`MAX_FILES` or :data:`MAX_TOTAL_BYTES`.
        """
        self.first = self.first or display
        self.files += 1
        self.bytes += size
        if self.files > MAX_FILES:
            raise _Refused(
                [
                    ConfigIssue(
                        display,
                        1,
                        1,
                        "",
                        f"more than {MAX_FILES} files make up {self.first} (the config file, "
                        "its includes and its profiles): merge some of them",
                    )
                ]
            )
        if self.bytes > MAX_TOTAL_BYTES:
            raise _Refused(
                [
                    ConfigIssue(
                        display,
                        1,
                        1,
                        "",
                        f"with this file, the {self.files} files of {self.first} (the config "
                        f"file, its includes and its profiles) hold {self.bytes / 1e6:.1f} MB: "
                        f"at most {MAX_TOTAL_BYTES / 1e6:g} MB in all; is the include "
                        "pattern right?",
                    )
                ]
            )


class _Refused(ConfigError):
    """A file refused before it was parsed (too big, nested too deep, an alias bomb): the
    load stops there, going on would only take longer to say the same."""


def _read_text(path: Path, display: str, budget: _Budget | None = None) -> str:
    """The text of ``path``, at most :data:`MAX_FILE_BYTES` of it, with universal newlines.

    The file is opened without blocking and looked at before it is read: a FIFO, a
    device or a directory is refused (reading a FIFO would wait for ever).

    Raises:
        _Refused: the file is bigger, or the config's files together pass a cap of
            ``budget``; ``ConfigError`` when it cannot be read or decoded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(display, 1, 1, "", f"cannot read: {_os_problem(exc)}")]
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError([ConfigIssue(display, 1, 1, "", f"cannot read: {path} is {kind}")])
        size = st.st_size
        raw = b""
        if size <= MAX_FILE_BYTES:
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(display, 1, 1, "", f"cannot read: {_os_problem(exc)}")]
        ) from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES or len(raw) > MAX_FILE_BYTES:
        raise _Refused(
            [
                ConfigIssue(
                    display,
                    1,
                    1,
                    "",
                    f"the file is {max(size, len(raw)) / 1e6:.1f} MB: a config file may have at "
                    f"most {MAX_FILE_BYTES / 1e6:g} MB (10,000 points with a description each "
                    "take 2.5 MB); is it the right file?",
                )
            ]
        )
    if budget is not None:
        budget.take_file(len(raw), display)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line, col = before.count(b"\n") + 1, exc.start - before.rfind(b"\n")
        raise ConfigError(
            [
                ConfigIssue(
                    display,
                    line,
                    col,
                    "",
                    "not UTF-8 text (a binary file?): save it as UTF-8",
                )
            ]
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _os_problem(exc: OSError) -> str:
    """An OS error in plain words (never a file's content): a loop of symbolic links is
    named as such (ELOOP), others by the OS's message."""
    import errno

    if exc.errno == errno.ELOOP:
        return f"{exc.filename or 'the path'} is a loop of symbolic links (ELOOP)"
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or type(exc).__name__}"


def _prescan(text: str, display: str, budget: _Budget | None = None) -> _Reading:
    """Walk the YAML event stream of ``text`` before anything is built from it, and refuse
    what would take the loader down: nesting deeper than :data:`MAX_DEPTH`, more than
    :data:`MAX_VALUES` values once aliases are expanded (an "alias bomb"), an alias
    inside the value it refers to (a structure containing itself), and keys that are lists
    or maps (YAML complex keys, which no config needs). Each at its line.

    The event stream comes from libyaml's parser (``ruamel.yaml.clib``; its state is a
    stack on the heap, whatever the nesting). libyaml reads YAML 1.1, and refuses some
    YAML 1.2: where it stops at a ``:`` inside a plain scalar of a flow collection
    (``{host: fe80::1}``, YAML 1.2 section 7.3.3), it reads the text again with those
    colons held by a character the text lacks (:func:`_hold_colons`); where it finds
    another error, ruamel's pure-Python parser reads a file of at most
    :data:`MAX_PURE_CHARS` (it takes the rest of YAML 1.2, and words its errors more
    precisely), and libyaml's error stands for a bigger one. The data is built
    afterwards, and turned into plain values and validated recursively, which is why the
    depth must be known first: 30,000 levels would overflow the stack. The walk stops at
    the first problem, so a bomb costs what its first few hundred bytes cost. Syntax
    errors are left to the parse proper, which says them with their position.

    Every key, list and map counts as a value, as does every scalar: a map of 250,000
    keys costs what a list of 250,000 numbers does. With ``budget``, the values of the
    config's earlier files count too (:data:`MAX_TOTAL_VALUES` in all), and this file's
    are added to it.

    Returns:
        how the file is to be read (:class:`_Reading`), for :func:`_compose`.
    Raises:
        _Refused: with the problem at its line and column.
    """
    used = budget.values if budget is not None else 0
    limit = min(MAX_VALUES, MAX_TOTAL_VALUES - used)
    beyond = (
        f"more than {MAX_VALUES} values once aliases are expanded: use fewer aliases "
        "(*name) or split the file"
        if limit == MAX_VALUES
        else f"more than {MAX_TOTAL_VALUES} values in all the files of "
        f"{budget.first if budget else 'this config'} (the config file, its includes and "
        "its profiles); this file is one too many"
    )

    held = ""

    def refuse(mark: Any, message: str) -> None:
        if held:
            message = message.replace(held, ":")
        raise _Refused([ConfigIssue(display, mark.line + 1, mark.column + 1, "", message)])

    reading = _Reading(text)
    count = 0
    try:
        count = _walk_events(_libyaml(text), refuse, limit, beyond)
    except YAMLError as exc:  # libyaml (YAML 1.1) refuses some YAML 1.2, or an error
        failed: YAMLError = exc
        if _FLOW_COLON in str(getattr(exc, "problem", "")):
            alt = _hold_colons(text)
            if alt is not None:
                held = alt[1]
                try:
                    count = _walk_events(_libyaml(alt[0]), refuse, limit, beyond)
                    reading = _Reading(*alt)
                except YAMLError as again:
                    failed, held = again, ""
        if reading.text is text:
            reading = _Reading(None) if len(text) <= MAX_PURE_CHARS else _Reading(None, "", failed)
            if reading.error is None:
                try:
                    count = _walk_events(YAML(typ="rt").parse(text), refuse, limit, beyond)
                except YAMLError as ours:  # said by _compose, without parsing again
                    reading = _Reading(None, "", ours)
    if budget is not None:
        budget.values += count
    return reading


MAX_PURE_CHARS = 100_000
"""Largest file that ruamel's pure-Python parser reads where libyaml stops (it takes about
4 µs a character, twice: 0.8 s); a bigger file that libyaml refuses is refused with
libyaml's words for the problem, at its line and column."""

_FLOW_COLON = "found unexpected ':'"
"""libyaml's problem at a ``:`` inside a plain scalar of a flow collection."""

_HELD_COLON = re.compile(r"(?<![\"'\]}]):(?=[^\s,\[\]{}])")
"""A ``:`` that YAML 1.2 reads as part of a plain scalar wherever it stands: followed by a
character that is neither a space nor a flow indicator, and not just after a quoted
scalar or a flow collection (where it may separate a key from its value, section 7.4)."""


@dataclass(frozen=True)
class _Reading:
    """How :func:`_compose` gets a file's events, as :func:`_prescan` found: ``text`` for
    libyaml (the file's own, or with its colons held by the character ``held``), None for
    ruamel's parser; ``error``: the syntax error to say (ruamel's, or libyaml's for a file
    too big for ruamel's parser)."""

    text: str | None
    held: str = ""
    error: YAMLError | None = None


def _libyaml(text: str) -> Iterator[Any]:
    """libyaml's event stream of ``text`` (``ruamel.yaml.clib``)."""
    return YAML(typ="safe", pure=False).parse(text)  # type: ignore[no-any-return]


def _hold_colons(text: str) -> tuple[str, str] | None:
    """``text`` with every ``:`` that YAML 1.2 reads as part of a plain scalar
    (:data:`_HELD_COLON`) replaced by a private-use character it does not hold (one
    character for one: lines and columns stay), and that character; None when it holds
    them all."""
    for code in range(0xE000, 0xE010):
        held = chr(code)
        if held not in text:
            return _HELD_COLON.sub(held, text), held
    return None


def _walk_events(
    events: Iterator[Any],
    refuse: Callable[[Any, str], None],
    limit: int = MAX_VALUES,
    beyond: str = "",
) -> int:
    """The checks of :func:`_prescan` on one event stream; ``refuse(mark, message)`` raises
    (``beyond`` is the message past ``limit`` values). Returns the number of values."""
    depth = 0
    count = 0
    # per open list or map: [is a map, the next node is a key, anchor, count at its start]
    stack: list[list[Any]] = []
    sizes: dict[str, int] = {}
    open_anchors: set[str] = set()
    for ev in events:
        if isinstance(ev, CollectionEndEvent):
            _, _, anchor, start = stack.pop()
            depth -= 1
            if anchor is not None:
                sizes[anchor] = max(1, count - start)
                open_anchors.discard(anchor)
            continue
        if not isinstance(ev, NodeEvent):
            continue  # stream and document start and end
        is_key = False
        if stack and stack[-1][0]:
            is_key = stack[-1][1]
            stack[-1][1] = not is_key
        if isinstance(ev, AliasEvent):
            if ev.anchor in open_anchors:
                refuse(
                    ev.start_mark,
                    f"the alias *{ev.anchor} is inside the value &{ev.anchor} it refers "
                    "to: a value cannot contain itself",
                )
            added = sizes.get(ev.anchor, 1)
        else:
            added = 1
        start = count
        count += added
        if count > limit:
            refuse(ev.start_mark, beyond)
        if isinstance(ev, CollectionStartEvent):
            if is_key:
                refuse(ev.start_mark, "a key that is a list or a map; keys are names")
            depth += 1
            if depth > MAX_DEPTH:
                refuse(ev.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            stack.append([isinstance(ev, MappingStartEvent), True, ev.anchor, start])
            if ev.anchor is not None:
                open_anchors.add(ev.anchor)
        elif isinstance(ev, ScalarEvent) and ev.anchor is not None:
            sizes[ev.anchor] = 1
    return count


# ---------------------------------------------------------------------------------------
# building the data from YAML events, with positions


class _Map(dict[Any, Any]):
    """A YAML mapping as built by :func:`_build`, knowing where it and its keys are.

    ``start`` is the packed position (:func:`_pack`) of the map itself; ``marks`` two
    packed positions (the key, then its value) for each of its own keys, which come first
    in the map's order (keys merged in with ``<<`` or added later follow them); None for
    an empty map.
    """

    __slots__ = ("index", "marks", "start")
    start: int
    marks: array[int] | None
    index: dict[Any, int] | None

    def pos(self, key: Any, *, value: bool) -> tuple[int, int] | None:
        """1-based (line, column) of ``key`` (or of its value); None for a key merged in
        with ``<<`` or added after the map was built."""
        if self.marks is None:
            return None
        if self.index is None:
            self.index = dict(zip(self, range(len(self.marks) // 2), strict=False))
        i = self.index.get(key)
        return None if i is None else _unpack(self.marks[2 * i + value])


class _Seq(list[Any]):
    """A YAML sequence as built by :func:`_build`: ``start`` the packed position of the
    list itself, ``marks`` that of each item (None for an empty list)."""

    __slots__ = ("marks", "start")
    start: int
    marks: array[int] | None

    def pos(self, index: int) -> tuple[int, int] | None:
        """1-based (line, column) of item ``index``; None for an item added afterwards."""
        if self.marks is None or not 0 <= index < len(self.marks):
            return None
        return _unpack(self.marks[index])


def _new_seq(start: int = 0) -> _Seq:
    seq = _Seq()
    seq.start, seq.marks = start, None
    return seq


def _pack(mark: Any) -> int:
    """A YAML mark's 0-based line and column in one int (columns stay below 2**32)."""
    return int(mark.line) << 32 | int(mark.column)


def _unpack(packed: int) -> tuple[int, int]:
    return (packed >> 32) + 1, (packed & 0xFFFFFFFF) + 1


class _BuildError(Exception):
    """Something no config needs, found while building, at ``mark``."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _ParserFailed(Exception):
    """The event stream itself broke off (a syntax error, a character YAML refuses)."""


_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {None, "!", _TAG + "map", _TAG + "seq"}
"""Collection tags that change nothing: a map is built as a dict, a list as a list."""


@dataclass
class _Dup:
    """A key given twice in one map (the second one's place and path)."""

    line: int
    col: int
    path: str
    key: str
    first_line: int


@functools.cache
def _rules(version: tuple[int, int] | None) -> tuple[dict[str, list[tuple[str, Any]]], Any]:
    """The implicit scalar rules of YAML ``version`` (1.2 when None) as ruamel's
    ``VersionedResolver`` has them, by first character with compiled patterns, and a
    ``SafeConstructor`` that builds a scalar of any other tag the same way."""
    resolver = VersionedResolver(version=version)
    table = {
        first: [(tag, re.compile(rx.pattern, rx.flags)) for tag, rx in rules]
        for first, rules in resolver.versioned_resolver.items()
        if first is not None
    }
    return table, SafeConstructor(loader=types.SimpleNamespace(_resolver=resolver))


def _build(events: Iterator[Any], held: str = "") -> tuple[Any, list[_Dup]]:
    """Build one YAML document from its parser events, as ruamel's safe loader would
    (YAML 1.2 rules unless the document says ``%YAML 1.1``, merge keys ``<<``, anchors and
    aliases), into :class:`_Map` and :class:`_Seq`, which keep the line and column of
    every key, value and item. A key given again in the same map keeps its first value
    and is returned as a :class:`_Dup`. ``held``: the character standing for ``:`` in
    the text the events come from (:func:`_hold_colons`). One pass with a stack of the
    open lists and maps: memory is the data plus 8 bytes an item and 24 a key.

    Raises:
        _ParserFailed: from the event stream (the parser's error is its ``__cause__``).
        _BuildError: a tag on a list or map, a key that is a list or a map.
        ComposerError: an undefined alias, a second document.
        MarkedYAMLError: a merge key ``<<`` given twice or not naming maps.
        ValueError: a scalar that is not what its tag says (a date that does not exist).
    """
    nxt = iter(events).__next__
    table, constructor = _rules(None)
    v12 = True
    bools = SafeConstructor.bool_values
    anchors: dict[str, tuple[Any, int, str]] = {}
    dups: list[_Dup] = []
    # per open map: [the map, the pending key (or _NO_KEY), its packed position, its raw
    # text, the mark of a pending merge key '<<' (or None), merge sources, raw key texts
    # seen -> line of the first, the map's mark]; per open list: [the list]
    stack: list[list[Any]] = []
    root: list[Any] = []
    root_mark: Any = None
    docs = 0

    def dup_path(raw: str) -> str:
        path = ""
        for frame in stack:
            if len(frame) == 1:
                path = f"{path}[{len(frame[0])}]"
            else:
                k = raw if frame is stack[-1] else frame[3]
                path = f"{path}.{k}" if path else str(k)
        return path

    def into_map(top: list[Any], value: Any, pos: int, mark: Any, raw: str, merge: Any) -> None:
        """Put a key or a value into the map on top of the stack."""
        if top[1] is _NO_KEY:  # this is a key
            if isinstance(value, dict | list):
                raise _BuildError(mark, "a key that is a list or a map; keys are names")
            top[1], top[2], top[3], top[4] = value, pos, raw, merge
            return
        obj, key, kpos, kraw = top[0], top[1], top[2], top[3]
        top[1] = _NO_KEY
        if top[4] is not None:  # the value of a merge key
            if top[5] is not None:
                raise DuplicateKeyError(
                    "while constructing a mapping", top[7], 'found duplicate merge key "<<"', top[4]
                )
            sources = value if isinstance(value, list) else [value]
            for s in sources:
                if not isinstance(s, dict):
                    raise ConstructorError(
                        "while constructing a mapping",
                        top[7],
                        "expected a mapping or list of mappings for merging, but found "
                        + ("sequence" if isinstance(s, list) else "scalar"),
                        mark,
                    )
            top[5] = sources
            return
        seen = top[6]
        if seen is None:
            seen = top[6] = {}
        first = seen.get(kraw)
        if first is not None:
            line, col = _unpack(kpos)
            dups.append(_Dup(line, col, dup_path(kraw), kraw, first))
        else:
            seen[kraw] = (kpos >> 32) + 1
        try:
            if key in obj:
                return  # the first value stays ('1' and 1 are two keys, said by the model)
        except TypeError:
            raise _BuildError(mark, "a key that is a list or a map; keys are names") from None
        obj[sys.intern(key) if type(key) is str else key] = value
        if obj.marks is None:
            obj.marks = array("q")
        obj.marks.append(kpos)
        obj.marks.append(pos)

    while True:
        try:
            ev = nxt()
        except StopIteration:
            break
        except (YAMLError, ValueError) as exc:
            raise _ParserFailed() from exc
        kind = type(ev)
        merge = None
        if kind is ScalarEvent:
            mark = ev.start_mark
            value = raw = ev.value
            if held and held in value:
                value = raw = value.replace(held, ":")
            tag = ev.tag
            if tag is None and ev.implicit[0]:
                if value.isdigit() and value.isascii() and (v12 or value[0] != "0"):
                    value = int(value)
                else:
                    for rtag, rx in table.get(value[:1], ()):
                        if rx.match(value):
                            tag = rtag
                            break
                    if tag == _TAG + "null":
                        value = None
                    elif tag == _TAG + "bool":
                        value = bools[value.lower()]
                    elif tag == _TAG + "merge":
                        merge = mark
                    elif tag is not None and tag != _TAG + "value":
                        node = ScalarNode(tag, value, mark, ev.end_mark, ev.style)
                        value = constructor.construct_non_recursive_object(node)
            elif tag is not None and tag != "!":
                node = ScalarNode(tag, value, mark, ev.end_mark, ev.style)
                value = constructor.construct_non_recursive_object(node)
            pos = mark.line << 32 | mark.column
            if ev.anchor is not None:
                anchors[ev.anchor] = (value, pos, raw)
        elif kind is AliasEvent:
            mark = ev.start_mark
            try:
                value, pos, raw = anchors[ev.anchor]
            except KeyError:
                raise ComposerError(
                    None, None, f"found undefined alias {ev.anchor!r}", mark
                ) from None
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if ev.tag not in _PLAIN_TAGS:
                raise _BuildError(
                    ev.start_mark,
                    f"the YAML tag {ev.tag} on a list or map: no config needs one; remove it",
                )
            mark = ev.start_mark
            pos = mark.line << 32 | mark.column
            obj: Any
            if kind is MappingStartEvent:
                obj = _Map()
                obj.start, obj.marks, obj.index = pos, None, None
                stack.append([obj, _NO_KEY, 0, "", None, None, None, mark])
            else:
                obj = _new_seq(pos)
                stack.append([obj])
            if ev.anchor is not None:
                anchors[ev.anchor] = (obj, pos, "")
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            frame = stack.pop()
            value = frame[0]
            if len(frame) > 1:  # merged keys: those the map lacks, earlier sources first
                for source in frame[5] or ():
                    for k, v in source.items():
                        if k not in value:
                            value[k] = v
            pos, raw = value.start, ""
            mark = frame[-1] if len(frame) > 1 else None
        elif kind is DocumentStartEvent:
            docs += 1
            if docs > 1:
                raise ComposerError(
                    "expected a single document in the stream",
                    root_mark,
                    "but found another document",
                    ev.start_mark,
                )
            version = getattr(ev, "version", None)
            if version:
                table, constructor = _rules(tuple(version))
                v12 = tuple(version) >= (1, 2)
            continue
        else:
            continue  # stream and document ends
        if not stack:
            root.append(value)
            root_mark = root_mark or mark
            continue
        top = stack[-1]
        if len(top) == 1:  # a list: the common case first
            seq = top[0]
            seq.append(value)
            if seq.marks is None:
                seq.marks = array("q")
            seq.marks.append(pos)
        else:
            into_map(top, value, pos, mark, raw, merge)
    return (root[0] if root else None), dups


_NO_KEY = object()


def _compose(text: str, reading: _Reading) -> tuple[Any, list[_Dup]]:
    """:func:`_build` on the events :func:`_prescan` found readable: libyaml's
    (``ruamel.yaml.clib``, fast), or ruamel's own round-trip parser's, which takes some
    YAML 1.2 that libyaml does not and words the errors it finds itself.

    Raises:
        see :func:`_build`, and the parser's ``MarkedYAMLError`` or ``ReaderError``.
    """
    if reading.error is not None:
        raise _in_ruamel_words(text, reading.error)
    events = _libyaml(reading.text) if reading.text is not None else YAML(typ="rt").parse(text)
    try:
        return _build(events, reading.held)
    except _ParserFailed as exc:
        raise exc.__cause__ from None  # type: ignore[misc]


def _in_ruamel_words(text: str, exc: YAMLError) -> YAMLError:
    """libyaml's error as ruamel's parser says it where the two differ in words only, so
    that :func:`_syntax_in_words` explains it the same: a character YAML refuses (ruamel's
    reader names it), a character that cannot start a token (named), a block that goes on
    where it should end (named by what comes instead: a list item, a key or a text), an
    unknown escape (named, at the character after the backslash)."""
    if isinstance(exc, ReaderError):
        try:
            Reader(text)
        except ReaderError as ours:
            return ours
    if not isinstance(exc, MarkedYAMLError) or exc.problem_mark is None:
        return exc
    where = exc.problem_mark
    lines = text.split("\n", where.line + 1)
    rest = lines[where.line][where.column :] if where.line < len(lines) else ""
    if exc.problem == "found character that cannot start any token":
        exc.problem = f"found character {rest[:1]!r} that cannot start any token"
    elif exc.problem in ("did not find expected key", "did not find expected '-' indicator"):
        if re.match(r"-(?:\s|$)", rest):
            token = "-"
        elif re.match(r"[^\s#].*?:(?:\s|$)", rest):
            token = "<block mapping start>"
        else:
            token = "<scalar>"
        exc.problem = f"expected <block end>, but found '{token}'"
    elif exc.problem == "found unknown escape character" and rest[:1] == "\\":
        exc.context = "while scanning a double-quoted scalar"
        exc.problem = f"found unknown escape character {rest[1:2]!r}"
        exc.problem_mark = StreamMark(where.name, where.index + 1, where.line, where.column + 1)
    return exc


def _parse(
    path: Path, display: str, budget: _Budget | None = None
) -> tuple[Any, list[ConfigIssue]]:
    """Parse one YAML file; return its data and any syntax / duplicate-key issues.

    The data is built in one pass over the parser's events (:func:`_compose`): maps and
    lists (:class:`_Map`, :class:`_Seq`) that keep the line and column of every key,
    value and item, so a problem found later is said where it is without reading the
    file again.

    Raises:
        _Refused: too big, too deep, an alias bomb (see :func:`_prescan`), or, with
            ``budget``, past a cap of the config's files together (:class:`_Budget`).
    """
    ahead = budget.texts.pop(str(path), None) if budget is not None else None
    if ahead is not None:
        text, reading = ahead  # read and walked by _prefetch
    else:
        try:
            text = _read_text(path, display, budget)
        except _Refused:
            raise
        except ConfigError as exc:
            return None, exc.issues
        reading = _prescan(text, display, budget)
    try:
        data, dups = _compose(text, reading)  # nesting and size were checked by _prescan
        issues = [
            ConfigIssue(
                display,
                d.line,
                d.col,
                d.path,
                f"duplicate key {d.key!r} (first defined at line {d.first_line}); remove one",
            )
            for d in dups
        ]
    except _BuildError as exc:
        line, col = exc.mark.line + 1, exc.mark.column + 1
        secret = _secret_at(text, line, col)
        if secret is not None:
            return None, [_secret_issue(display, secret, "is not valid in a config")]
        return None, [ConfigIssue(display, line, col, "", exc.message)]
    except RecursionError:
        return None, [ConfigIssue(display, 1, 1, "", "nested too deeply to be a config")]
    except ValueError as exc:  # an unquoted date or time that does not exist
        line, col, token = _bad_date(text)
        secret = _secret_at(text, line, col) if token else None
        if secret is not None:
            return None, [_secret_issue(display, secret, "reads as a date that does not exist")]
        if not token:  # a tag such as !!int on a value that is none: the text may be a secret
            return None, [
                ConfigIssue(
                    display,
                    1,
                    1,
                    "",
                    "a value cannot be made what its YAML tag says (such as !!int or !!float "
                    "on a word); remove the tag, or quote the value if it is meant as text",
                )
            ]
        return None, [
            ConfigIssue(
                display,
                line,
                col,
                "",
                f"{token} is not a valid date or time ({exc}); write it as "
                "YYYY-MM-DD, or quote it if it is meant as text",
            )
        ]
    except MarkedYAMLError as exc:
        for m in (exc.problem_mark, exc.context_mark):
            secret = _secret_at(text, m.line + 1, m.column + 1) if m is not None else None
            if secret is not None:
                return None, [_secret_issue(display, secret, "is not valid YAML")]
        line, col, what = _syntax_in_words(text, exc)
        return None, [ConfigIssue(display, line, col, "", f"YAML syntax error: {what}")]
    except ReaderError as exc:
        line, col = _offset_to_pos(text, exc.position)
        secret = _secret_at(text, line, col)
        if secret is not None:
            return None, [_secret_issue(display, secret, "holds a character YAML refuses")]
        return None, [
            ConfigIssue(
                display, line, col, "", f"not YAML text: {exc.reason} (character {exc.character!r})"
            )
        ]
    except YAMLError as exc:
        return None, [ConfigIssue(display, 1, 1, "", f"YAML error: {exc}")]
    return data, issues


_KEY_RE = re.compile(r"(?:- +)*([A-Za-z_][\w.-]{0,39}) *:(?: |$)")


def _syntax_in_words(text: str, exc: MarkedYAMLError) -> tuple[int, int, str]:
    """A YAML syntax error as (1-based line, column, plain words), at the line where the
    structure went wrong: the parser's own mark is sometimes one line late (a key missing
    the space after its colon reads as text that goes on into the next line) or at the end
    of the file (a quote or bracket left open). Only key names are quoted from the text,
    never a value (it may be a secret). The parser's words are kept for what is not
    recognised here. Block structure and indentation: YAML 1.2.2 sections 6.1 and 8.2."""
    lines = text.split("\n")
    problem, context = exc.problem or "", exc.context or ""
    pm, cm = exc.problem_mark, exc.context_mark
    mark = pm or cm
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    here = lines[line - 1] if 1 <= line <= len(lines) else ""

    def indent(n: int) -> int:
        return len(lines[n - 1]) - len(lines[n - 1].lstrip(" "))

    def above(n: int) -> int:
        """The nearest line above ``n`` with content (not blank, not a comment), or 0."""
        for m in range(min(n, len(lines) + 1) - 1, 0, -1):
            stripped = lines[m - 1].strip()
            if stripped and not stripped.startswith("#"):
                return m
        return 0

    def key(n: int) -> str | None:
        m = _KEY_RE.match(lines[n - 1].lstrip(" "))
        return m.group(1) if m else None

    what = " ".join(s for s in (context, problem) if s)  # the parser's words
    found = re.match(r"expected <block end>, but found '([^']*)'", problem)
    alias = re.match(r"found undefined alias '([^']{1,40})'", problem)
    prev = above(line)
    if "'\\t'" in problem or (here[: col - 1].strip(" ") == "" and "\t" in here[:col]):
        what = f"a tab on line {line}: YAML indents with spaces, never with tabs; replace the tab"
    elif problem.startswith("mapping values are not allowed"):
        k, pk = key(line), key(prev) if prev else None
        if k is not None and here.find(": ", indent(line)) < col - 1:
            what = (
                f"the value of {k} on line {line} holds ': ' (a colon and a space): put the "
                "value in quotes"
            )
        elif prev and pk is None and not lines[prev - 1].lstrip(" ").startswith("- "):
            what = (
                f"line {prev} is not a 'key: value' (a key, a colon, then a space), so YAML "
                f"reads it as text that goes on into line {line}: add the space after the colon"
            )
            line, col = prev, indent(prev) + 1
        elif prev and pk is not None and indent(line) > indent(prev):
            col = indent(line) + 1
            what = (
                f"line {line} is indented more than line {prev} ({pk}), which already has a "
                f"value: start {k or 'it'} in column {indent(prev) + 1}, as {pk}, or, if it "
                f"belongs below {pk}, remove the value after '{pk}:'"
            )
    elif found and cm is not None and found.group(1) == "-":
        what = (
            f"a list item ('- ') on line {line} among the keys of a map: a list goes below a "
            "key of its own, indented under it"
        )
    elif found and found.group(1) == "<scalar>" and re.search("['\"]", here[: col - 1]):
        what = f"text after the closing quote on line {line}: put the whole value in quotes"
    elif found and cm is not None:
        # the columns in which the lines from the collection's start down to here begin
        columns: dict[int, str] = {}
        for n in range(cm.line + 1, line):
            stripped = lines[n - 1].lstrip(" ")
            if not stripped or stripped.startswith("#"):
                continue
            dash = re.match(r"((?:- +)+)", stripped)
            columns.setdefault(
                indent(n) + 1, f"'- ' on line {n}" if dash else f"{key(n)} on line {n}"
            )
            if dash and key(n) is not None:
                columns.setdefault(indent(n) + len(dash.group(1)) + 1, f"{key(n)} on line {n}")
        hint = " or ".join(f"column {c} ({columns[c]})" for c in sorted(set(columns) - {col})[-2:])
        this = f"line {line} ({key(line)})" if key(line) else f"line {line}"
        if columns.get(col, "").startswith("'- '"):
            what = (
                f"{this} starts in column {col}, where the list items above start ('- '): "
                f"start it with '- ' to make a new item, or indent it "
                + (f"to {hint}" if hint else "further")
                + " to belong to the item above"
            )
        elif col not in columns:
            spaces = f"{col - 1} space" + ("" if col == 2 else "s")
            what = (
                f"{this} is indented {spaces}, which lines up with nothing above it: the keys "
                f"of one map, and the dashes of one list, start in the same column; here that "
                f"is {hint}"
            )
    elif context.startswith("while parsing a flow") and cm is not None and cm.line < len(lines):
        opened = lines[cm.line][cm.column : cm.column + 1]
        close = "}" if opened == "{" else "]"
        what = (
            f"the '{opened}' opened on line {cm.line + 1} is not closed with '{close}' where "
            f"it should be (the parser met line {line} first): add '{close}' at its end"
        )
        line, col = cm.line + 1, cm.column + 1
    elif context.startswith("while scanning a quoted scalar") and cm is not None:
        line, col = cm.line + 1, cm.column + 1
        what = (
            f"the quote opened on line {line} is never closed: add the closing quote at the "
            "end of the value"
        )
    elif alias:
        what = f"*{alias.group(1)} refers to no anchor &{alias.group(1)} above it"
    return line, col, what


def _secret_issue(display: str, where: tuple[int, int], what: str) -> ConfigIssue:
    """A problem inside the value of a ``password`` key, at the key: neither the value nor
    a character or column of it is shown."""
    return ConfigIssue(
        display,
        where[0],
        where[1],
        "",
        f"the value of password {what} (not repeated here, nor where in it: it is a "
        f"secret); {SECRET_FIX}",
    )


# ---------------------------------------------------------------------------------------
# positions


@dataclass
class _Origins:
    """Which file each spliced-in YAML node came from."""

    files: dict[int, str]

    def file_of(self, node: Any, default: str) -> str:
        return self.files.get(id(node), default)


def _pos_of_node(node: Any) -> tuple[int, int]:
    """1-based (line, column) where a map or list built by :func:`_build` starts; (1, 1)
    for anything else."""
    start = getattr(node, "start", None)
    return (1, 1) if start is None else _unpack(start)


def _locate(
    root: Any, loc: tuple[int | str, ...], main_file: str, origins: _Origins, *, key: bool
) -> tuple[str, int, int, str]:
    """Walk ``loc`` through the loaded YAML; return (file, line, col, dotted path).

    ``loc`` entries that are not keys of the data (pydantic's union member tags) are
    skipped. With ``key=True`` the position of the last key itself is returned (for unknown
    keys), otherwise the position of its value.
    """
    node = root
    file = origins.file_of(root, main_file)
    line, col = 1, 1
    path = ""
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, _Map) and isinstance(part, str) and part in node:
            pos = node.pos(part, value=not (key and last))
            if pos is not None:
                line, col = pos
            child = node[part]
            path = f"{path}.{part}" if path else part
        elif isinstance(node, _Seq) and isinstance(part, int) and 0 <= part < len(node):
            child = node[part]
            path = f"{path}[{part}]"
            if id(child) in origins.files:
                file = origins.files[id(child)]
                line, col = _pos_of_node(child)
            else:
                pos = node.pos(part)
                if pos is not None:
                    line, col = pos
        elif isinstance(node, _Map) and isinstance(part, str) and key and last:
            path = f"{path}.{part}" if path else part
            break
        else:
            continue
        node = child
        file = origins.file_of(node, file)
    return file, line, col, path


# ---------------------------------------------------------------------------------------
# models along a loc, for "did you mean"


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
        return
    if origin in (list, tuple, dict, typing.Union, types.UnionType) or origin is not None:
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model a ``loc`` ends in; a union member is picked by the tag pydantic put in the
    ``loc`` (the device's ``driver``)."""
    candidates = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        field = candidates[0].model_fields.get(part)
        if field is None:  # a union tag: keep the member whose driver it names
            tagged = [m for m in candidates if part in _driver_names(m)]
            candidates = tagged or candidates
            continue
        candidates = list(_models_in(field.annotation))
        if not candidates:
            return None
    return candidates[0]


def _driver_names(model: type[BaseModel]) -> tuple[Any, ...]:
    field = model.model_fields.get("driver")
    return typing.get_args(field.annotation) if field is not None else ()


PATTERN_WORDS = {NAME_PATTERN: NAME_RULE}
"""Config patterns said in words (the regular expression means nothing to ops teams)."""


def _is_secret(model: type[BaseModel], loc: tuple[int | str, ...]) -> bool:
    """Whether ``loc`` names a secret field (typed ``SecretStr``) or lies within one."""
    for n in range(len(loc), 0, -1):
        owner = _model_at(model, loc[: n - 1])
        field = owner.model_fields.get(str(loc[n - 1])) if owner is not None else None
        if field is not None and SecretStr in set(_types_in(field.annotation)):
            return True
    return False


def _types_in(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _types_in(arg)


def _id_message(value: Any, loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    """Why ``value`` cannot be an id, with an id to use instead and, where the model has a
    field for free text (a device's ``name``, a point's ``description``), where the text
    can go: ``'pump #2' is not allowed as an id: ...; try 'pump-2', and put the text in
    name: "pump #2"``."""
    text = str(value)
    message = f"{short_repr(value)} is not allowed as an id: {NAME_RULE}"
    fix = suggest_name(text)
    if fix is not None and fix != text:
        message += f"; try '{fix}'"
    defines = bool(loc) and loc[-1] in ("id", "name")  # not a reference to another id
    owner = _model_at(model, loc[:-1]) if defines else None
    if owner is not None and loc[-1] in owner.model_fields and text.strip():
        spare = [f for f in ("name", "description") if f != loc[-1] and f in owner.model_fields]
        if spare and control_character(text) is None and len(text) <= DISPLAY_NAME_MAX:
            quoted = json.dumps(text, ensure_ascii=False)
            message += f"{',' if fix else ';'} and put the text in {spare[0]}: {quoted}"
    return message


def _message(err: Any, model: type[BaseModel]) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if _is_secret(model, loc):  # never repeat a secret, not even a mistyped one
        if kind == "string_type":
            return "must be text: write it in quotes (the value is not repeated here)"
        if kind == "value_error":  # the agent's own checks, which never show the value
            return str(err["msg"]).removeprefix("Value error, ")
        return "invalid value (not repeated here: it is a secret)"
    if kind == "extra_forbidden":
        bad = str(loc[-1])
        owner = _model_at(model, loc[:-1])
        hint = ""
        if owner is not None:
            keys = [f.alias or name for name, f in owner.model_fields.items()]
            close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            else:
                hint = f"; allowed keys: {', '.join(keys)}"
        return f"unknown key '{bad}'{hint}"
    if kind == "missing":
        return f"required key '{loc[-1]}' is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        options = [o.strip().strip("'") for o in str(ctx.get("expected_tags", "")).split(",")]
        tag = str(ctx.get("tag"))
        close = difflib.get_close_matches(tag, options, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"driver '{tag}' is not one of {', '.join(options)}{hint}"
    value = err.get("input")
    if kind in ("bool_parsing", "bool_type") and loc[-1:] == ("switch",):  # mqtt.tls
        return (
            f"{value!r} is neither true, false nor TLS settings: write 'tls: false', "
            "'tls: true', or keys below it (ca_file, server_name, cert_file, key_file, ...)"
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        options = [o.strip().strip("'") for o in expected.replace(" or ", ", ").split(",")]
        if isinstance(value, str) and value in options and f"'{value}'" not in expected:
            return f"write {value} as a number, without quotes"
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{value!r} is not one of {', '.join(options)}{hint}"
    msg = str(err["msg"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        where = str(loc[-1]) if loc else "this"
        return (
            f"a section of keys, not {value!r}: write it as '{where}: {{key: value}}' or as "
            "indented 'key: value' lines below it"
        )
    if kind in ("date_from_datetime_inexact", "date_from_datetime_parsing", "date_type"):
        shown = value.isoformat() if hasattr(value, "isoformat") else repr(value)
        return f"{shown} is not a date: write it as YYYY-MM-DD, e.g. 2026-11-01"
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        if pattern == NAME_PATTERN:
            return _id_message(value, loc, model)
        return f"{short_repr(value)} is not allowed here: {PATTERN_WORDS.get(pattern, msg)}"
    if kind == "int_parsing":
        return f"{short_repr(value)} is not a whole number"
    if kind == "float_parsing":
        return f"{short_repr(value)} is not a number"
    if kind == "string_type" and isinstance(value, int | float | bool):
        return f'{value!r} is not text: write it in quotes, e.g. "{value}"'
    bounds = {
        "greater_than_equal": ("ge", "at least"),
        "less_than_equal": ("le", "at most"),
        "greater_than": ("gt", "more than"),
        "less_than": ("lt", "less than"),
    }
    if kind in bounds:
        key, words = bounds[kind]
        return f"{value!r} is out of range: must be {words} {err.get('ctx', {}).get(key)}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if isinstance(value, dict | list):
        return msg
    return f"{msg} (got {value!r})"


def _to_plain(data: Any) -> Any:
    """The data as the model takes it, every map's keys text: a map or list that needs no
    change is passed as it is (:class:`_Map` is a dict, :class:`_Seq` a list), the others
    are copied, so a big file is not held twice."""
    out: Any = None
    if isinstance(data, list):
        for i, v in enumerate(data):
            p = _to_plain(v)
            if out is None and p is not v:
                out = data[:i]
            if out is not None:
                out.append(p)
    elif isinstance(data, dict):
        for i, (k, v) in enumerate(data.items()):
            p = _to_plain(v)
            if out is None and (p is not v or type(k) is not str):
                out = {str(k0): v0 for k0, v0 in itertools.islice(data.items(), i)}
            if out is not None:
                out[str(k)] = p
    return data if out is None else out


def _pydantic_issues(
    exc: ValidationError,
    model: type[BaseModel],
    root: Any,
    file: str,
    origins: _Origins,
    prefix: tuple[int | str, ...] = (),
) -> list[ConfigIssue]:
    issues: dict[str, ConfigIssue] = {}
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        if err["type"] == "duplicate_point":  # point at the second occurrence
            loc = (*loc, "points", err["ctx"]["index"], "name")
        if err["type"] == "union_tag_invalid":  # point at the driver key itself
            loc = (*loc, "driver")
        f, line, col, path = _locate(root, loc, file, origins, key=err["type"] == "extra_forbidden")
        issue = ConfigIssue(f, line, col, path, _message(err, model))
        issues.setdefault(f"{f}:{line}:{col}:{path}", issue)
    return list(issues.values())


# ---------------------------------------------------------------------------------------


def _inside(path: Path, directory: Path) -> bool:
    """``path`` is ``directory`` or below it (both as given: resolve them first)."""
    return path == directory or directory in path.parents


def shipped_profiles_dir() -> Path:
    """The profiles that come with the agent: ``config/profiles`` of this repository, or
    where an install put them (``{sys.prefix}/share/edge-agent/profiles``, pyproject's
    data-files)."""
    repo = Path(__file__).resolve().parents[2] / "config" / "profiles"
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "edge-agent" / "profiles"


def _profiles_dir(raw: object, base: Path) -> tuple[Path, str | None]:
    """The profile directory a config names (default: ``profiles`` beside it), and why it
    may not be used, or None: after resolving links it must be the config file's
    directory ``base`` or below it, or the shipped profiles (:func:`shipped_profiles_dir`)."""
    pdir = base / str(raw) if raw else base / "profiles"
    real = pdir.resolve()
    shipped = {
        shipped_profiles_dir().resolve(),
        (Path(sys.prefix) / "share" / "edge-agent" / "profiles").resolve(),
    }
    if _inside(real, base) or any(_inside(real, s) for s in shipped):
        return pdir, None
    what = f"profiles_dir {str(raw)!r}" if raw else f"{pdir} (the default profiles_dir)"
    return pdir, (
        f"{what} leads to {real}, outside {base}, the config file's directory: keep the "
        f"profiles in it or below it (e.g. profiles/ beside the config), or use the shipped "
        f"ones ({shipped_profiles_dir()})"
    )


def _resolved(path: Path) -> str:
    """``path`` made absolute with its links resolved; where they loop (Python 3.11's
    ``Path.resolve`` raises then), made absolute only: opening it says the loop."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError):
        return os.path.abspath(path)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Profiles:
    """The device profiles of one directory.

    ``broken`` names the profiles that exist but failed validation (their problems are in
    ``issues``), so a device using one is not also told that its profile is unknown.
    """

    valid: dict[str, ModbusProfile]
    broken: set[str]
    issues: list[ConfigIssue]
    refused: bool = False
    """A file was refused before parsing (too big, too deep, an alias bomb)."""


def _profile_files(directory: Path) -> tuple[list[Path], list[ConfigIssue]]:
    """The ``*.yaml``/``*.yml`` files of ``directory``; one that is a link to a file
    outside it is not read, but reported (its text is never shown)."""
    real = directory.resolve()
    files: list[Path] = []
    issues: list[ConfigIssue] = []
    names: list[Path] = []
    for pattern in ("*.yaml", "*.yml"):
        for p in directory.glob(pattern):
            names.append(p)
            if len(names) > MAX_FILES:
                raise _Refused(
                    [
                        ConfigIssue(
                            _display(directory),
                            1,
                            1,
                            "",
                            f"more than {MAX_FILES} profile files: a config may be made of at "
                            f"most {MAX_FILES} files; keep only the profiles in use",
                        )
                    ]
                )
    for p in sorted(n for n in names if n.suffix == ".yaml") + sorted(
        n for n in names if n.suffix == ".yml"
    ):
        if _inside(p.resolve(), real):
            files.append(p)
        else:
            issues.append(
                ConfigIssue(
                    _display(p),
                    1,
                    1,
                    "",
                    f"a link to a file outside {real}: not read; copy the profile into it",
                )
            )
    return files, issues


def load_profiles(directory: Path, budget: _Budget | None = None) -> Profiles:
    """Load and validate every ``*.yaml``/``*.yml`` profile in ``directory`` (links to
    files outside it are reported, not read). The files count towards ``budget``, the caps
    of the config they serve (:class:`_Budget`; a fresh one without it)."""
    profiles: dict[str, ModbusProfile] = {}
    broken: set[str] = set()
    where: dict[str, str] = {}
    budget = budget if budget is not None else _Budget()
    try:
        files, issues = _profile_files(directory)
    except _Refused as exc:
        return Profiles({}, set(), exc.issues, True)
    refused = False
    for p in files:
        disp = _display(p)
        try:
            data, errs = _parse(p, disp, budget)
        except _Refused as exc:
            issues += exc.issues
            refused = True
            continue
        issues += errs
        if data is None:
            continue
        try:
            prof = ModbusProfile.model_validate(_to_plain(data))
        except ValidationError as exc:
            issues += _pydantic_issues(exc, ModbusProfile, data, disp, _Origins({}))
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                broken.add(data["name"])
            continue
        if prof.name in profiles:
            line, col = _pos_of_node(data)
            issues.append(
                ConfigIssue(
                    disp,
                    line,
                    col,
                    "name",
                    f"profile {prof.name!r} is also defined in {where[prof.name]}; rename one",
                )
            )
            continue
        profiles[prof.name] = prof
        where[prof.name] = disp
    return Profiles(profiles, broken, issues, refused)


def _splice_includes(
    data: dict[str, Any],
    base: Path,
    display: str,
    origins: _Origins,
    issues: list[ConfigIssue],
    budget: _Budget | None = None,
    main: Path | None = None,
) -> None:
    """Append the devices of every ``include`` file to ``devices`` (type errors of the
    ``include`` value itself are left to the model).

    A pattern may hold wildcards (``*``, ``?``, ``[...]``, Python's :mod:`glob`) in its
    file name only, never ``**`` nor in a directory part, and stays in the config file's
    directory ``base`` or below it, after links are resolved. Each file is read once: a
    pattern matching the config file ``main`` itself (an include cycle) or a file already
    included (under another name or through a link) is refused, naming both. The files
    count towards ``budget`` (:class:`_Budget`).

    Raises:
        _Refused: a cap of ``budget`` passed.
    """
    inc = data.get("include", [])
    patterns = (
        [(("include",), inc)]
        if isinstance(inc, str)
        else ([(("include", i), v) for i, v in enumerate(inc)] if isinstance(inc, list) else [])
    )
    devices = data.get("devices")
    if devices is None and patterns:
        devices = _new_seq()
        data["devices"] = devices
    if not isinstance(devices, list):
        return  # the model reports that 'devices' must be a list
    seen: dict[Path, str] = {}
    accepted: list[tuple[str, str]] = []
    if main is not None:
        seen[main.resolve()] = display
    for loc, pattern in patterns:
        if not isinstance(pattern, str):
            continue
        f, line, col, p = _locate(data, loc, display, origins, key=False)
        if not pattern.strip():
            issues.append(ConfigIssue(f, line, col, p, "empty include pattern"))
            continue
        head = os.path.dirname(pattern)
        if "**" in pattern or glob.has_magic(head):
            issues.append(
                ConfigIssue(
                    f,
                    line,
                    col,
                    p,
                    f"include {short_repr(pattern)}: wildcards (*, ?, [...]) may stand in the "
                    "file name only, not in a directory and not as '**': write e.g. "
                    "'devices/*.yaml'",
                )
            )
            continue
        if not _inside(Path(os.path.normpath(base / pattern)), base):
            issues.append(
                ConfigIssue(
                    f,
                    line,
                    col,
                    p,
                    f"include {pattern!r} reaches outside {base}, the config file's "
                    "directory: include files must be in it or below it",
                )
            )
            continue
        found: list[str] = []
        for m in glob.iglob(str(base / pattern)):
            found.append(m)
            if len(found) > MAX_FILES:  # (a ConfigError, said at its line)
                raise ConfigError(
                    [
                        ConfigIssue(
                            f,
                            line,
                            col,
                            p,
                            f"include {short_repr(pattern)} matches more than {MAX_FILES} "
                            f"files: a config may be made of at most {MAX_FILES} files; merge "
                            "some of them",
                        )
                    ]
                )
        matches = sorted(m for m in found if os.path.isfile(m))
        if not matches:
            issues.append(ConfigIssue(f, line, col, p, f"include {pattern!r} matches no file"))
        for m in matches:
            mdisp = _display(Path(m))
            real = Path(m).resolve()
            if not _inside(real, base):
                issues.append(
                    ConfigIssue(
                        f,
                        line,
                        col,
                        p,
                        f"include {pattern!r} matches {mdisp}, a link to a file outside "
                        f"{base}, the config file's directory: copy the file into it instead",
                    )
                )
                continue
            if real in seen:
                first = seen[real]
                if main is not None and real == main.resolve():
                    what = (
                        f"the config file itself: an include cycle ({display} -> {mdisp} -> "
                        f"{display}); narrow the pattern, e.g. 'devices/*.yaml'"
                    )
                elif first == mdisp:
                    what = "again (an earlier pattern included it): a file is included once"
                else:
                    what = (
                        f"the same file as {first} (a link): a file is included once; "
                        "remove the link or narrow the pattern"
                    )
                issues.append(
                    ConfigIssue(f, line, col, p, f"include {pattern!r} matches {mdisp}, {what}")
                )
                continue
            seen[real] = mdisp
            accepted.append((m, mdisp))
    # every file read and walked before any is built: a cap of the files together is
    # then found at the cost of the walks, not after building the files before it
    for m, mdisp in accepted:
        _prefetch(Path(m), mdisp, budget)
    for m, mdisp in accepted:
        part, errs = _parse(Path(m), mdisp, budget)
        issues += errs
        if part is None and not errs:
            issues.append(ConfigIssue(mdisp, 1, 1, "", "included file is empty"))
        items = part if isinstance(part, list) else [part] if part is not None else []
        for k, item in enumerate(items):
            if isinstance(item, dict):
                origins.files[id(item)] = mdisp
                devices.append(item)
                continue
            pos = part.pos(k) if isinstance(part, _Seq) else None
            line_i, col_i = pos or (1, 1)
            issues.append(
                ConfigIssue(
                    mdisp,
                    line_i,
                    col_i,
                    "",
                    "an included file holds one device (a mapping of keys) or a list of them",
                )
            )


def _prefetch(path: Path, display: str, budget: _Budget | None) -> None:
    """Read ``path`` and walk its events (:func:`_prescan`) into ``budget``, keeping its
    text for :func:`_parse`; a file that cannot be read is left for :func:`_parse` to
    report.

    Raises:
        _Refused: see :func:`_read_text` and :func:`_prescan`.
    """
    if budget is None:
        return
    try:
        text = _read_text(path, display, budget)
    except _Refused:
        raise
    except ConfigError:
        return
    budget.texts[str(path)] = text, _prescan(text, display, budget)


_SECRET_KEY_RE = re.compile(r"(?<![\w-])[\"']?password[\"']?\s*:(?=\s|$)")
"""A line that gives a secret: its values are never repeated in a message."""
_SECRET_OPEN_RE = re.compile(r"(?<![\w-])[\"']?password[\"']?\s*:\s*(?:$|#|[|>\"'])")
"""A ``password:`` whose value may go on below it (empty, a block scalar, a quoted one)."""
SECRET_FIX = (
    "write it in single quotes (a ' inside is written ''), e.g. password: 'it''s', or "
    "better, put it in a file only the agent can read and name that file as password_file"
)


def _secret_at(text: str, line: int, col: int) -> tuple[int, int] | None:
    """Where the ``password`` key is (1-based line and column) when the position
    ``line``:``col`` may lie in its value, else None. Errs on the safe side: a position
    after a ``password:`` on its line, or on a line below a ``password:`` whose value may
    go on over lines (empty, ``|``, ``>``, quoted) and indented more than that key (YAML
    1.2 sections 7.3 and 8.1: the lines of a multi-line value are indented more than its
    key)."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    here = lines[line - 1]
    keys = [m for m in _SECRET_KEY_RE.finditer(here) if m.start() < col - 1]
    if keys:
        return line, keys[-1].start() + 1
    indent = len(here) - len(here.lstrip(" ")) if here.strip() else 1 << 30
    for n in range(line - 1, 0, -1):
        above = lines[n - 1]
        if not above.strip() or above.lstrip(" ").startswith("#"):
            continue
        own = len(above) - len(above.lstrip(" "))
        if own >= indent:
            continue
        m = _SECRET_OPEN_RE.search(above)
        if m is not None:
            return n, m.start() + 1
        if own == 0:
            return None
        indent = own
    return None


_DATE_RE = re.compile(r"(?<![\w'\"])(\d{4}-\d{1,2}-\d{1,2}(?:[Tt ][0-9:.]+(?:Z|[+-]\d\d:?\d\d)?)?)")


def _bad_date(text: str) -> tuple[int, int, str]:
    """Where the first date-like scalar that is no real date is (line, column, text)."""
    from datetime import date

    for n, line in enumerate(text.splitlines(), 1):
        for m in _DATE_RE.finditer(line.split("#", 1)[0]):
            y, mo, d = (int(x) for x in m.group(1)[:10].split("-")[:3] if x.isdigit())
            try:
                date(y, mo, d)
            except ValueError:
                return n, m.start() + 1, m.group(1)
    return 1, 1, ""


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


SYSTEM_DIRS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/local/bin",
        "/usr/local/lib",
        "/usr/sbin",
        "/usr/share",
        "/var",
        "/var/backups",
        "/var/cache",
        "/var/lib",
        "/var/local",
        "/var/log",
        "/var/mail",
        "/var/opt",
        "/var/run",
        "/var/spool",
        "/var/tmp",
    }
)
"""Directories of the system (Filesystem Hierarchy Standard 3.0) that are never a
state_dir: the agent creates, replaces and moves aside files in its state_dir."""
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/sbin",
    "/sys",
    "/usr",
)
"""Nothing below these is a state_dir: configuration, programs, libraries and the kernel's
own file systems (FHS 3.0 chapter 3), which a package update or the kernel owns."""


def _others_can_write(st: os.stat_result, *, above: bool, owners: set[int]) -> str | None:
    """Who other than root and this user (and ``owners``) can change the entries of the
    directory ``st``, or None. ``above``: a directory above state_dir, where the sticky bit
    (only an entry's owner may rename or remove it, as in /tmp) is enough."""
    if st.st_uid not in owners:
        return f"belongs to user {_user(st.st_uid)}"
    sticky = above and st.st_mode & stat.S_ISVTX
    if st.st_mode & stat.S_IWOTH and not sticky:
        return "is writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()) and not sticky:
        return f"is writable by group {_group(st.st_gid)}"
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _state_dir_problem(path: Path) -> str | None:
    """Why ``path`` (resolved) cannot serve as state_dir, or None.

    Refused: a system directory (:data:`SYSTEM_DIRS`, anything below
    :data:`SYSTEM_TREES`); a directory others can write (world-writable, or group-writable
    by a group not this user's); a directory above it that lets another user swap a
    component for a link (writable by others without the sticky bit, or owned by a user
    other than root, this user and the state directory's owner; below a sticky
    world-writable directory such as /tmp, the entry must belong to root or this user).
    A missing directory is fine (the agent, or systemd's StateDirectory=, creates it); its
    nearest existing parent must be a directory.
    """
    text = str(path)
    hint = "give the agent a directory of its own, such as /var/lib/edge-agent"
    if text in SYSTEM_DIRS:
        return f"{path} is a system directory: {hint}"
    tree = next((t for t in SYSTEM_TREES if _inside(path, Path(t))), None)
    if tree is not None:
        return f"{path} is a system directory (everything below {tree} is): {hint}"
    me = {0, os.geteuid()}
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            return f"{path} exists and is not a directory"
        return f"{existing} is not a directory, so {path} cannot be created"
    if existing == path:
        st = path.stat()
        in_sticky = path.parent.stat().st_mode & stat.S_ISVTX
        why = _others_can_write(st, above=False, owners=me if in_sticky else {st.st_uid} | me)
        if why is not None:
            return (
                f"{path} {why}: another user could replace the buffer or plant links in it; "
                f"{hint} (e.g. chmod o-w,g-w {path})"
            )
        if not os.access(path, os.W_OK | os.X_OK) and not _read_only_fs(path):
            # (a read-only filesystem is a fault, not a config error: the agent then
            # buffers in memory until it can write again)
            return f"{path} is not writable by this user"
        owners = {st.st_uid} | me
    else:
        owners = set(me)
    chain = [existing] if existing != path else []
    chain += list(existing.parents)
    for i, d in enumerate(chain):
        st = d.stat()
        parent_sticky = i + 1 < len(chain) and chain[i + 1].stat().st_mode & stat.S_ISVTX
        why = _others_can_write(st, above=True, owners=me if parent_sticky else owners)
        if why is not None:
            return (
                f"{d}, above {path}, {why}: another user could put a link in place of "
                f"{path}; {hint}"
            )
    return None


def _resolve_mqtt(
    mqtt: MqttConfig,
    base: Path,
    data: Any,
    display: str,
    origins: _Origins,
    need_secrets: bool,
) -> tuple[MqttConfig, list[ConfigIssue]]:
    """The ``mqtt`` section with its paths made absolute, and its problems: credentials
    that would cross the network in clear, secret and TLS files that cannot be used, and
    ``brokers`` given beside ``host``/``port`` or naming one broker twice. The TLS and
    plaintext checks apply to every broker (:attr:`MqttConfig.endpoints`)."""
    issues: list[ConfigIssue] = []

    def issue(loc: tuple[str | int, ...], message: str) -> None:
        f, line, col, p = _locate(data, ("mqtt", *loc), display, origins, key=False)
        issues.append(ConfigIssue(f, line, col, p, message))

    def _abs(p: str | None) -> str | None:
        return None if p is None else _resolved(base / p)

    def _abs_tls(t: TlsConfig) -> TlsConfig:
        return t.model_copy(
            update={
                "ca_file": _abs(t.ca_file),
                "cert_file": _abs(t.cert_file),
                "key_file": _abs(t.key_file),
            }
        )

    update: dict[str, Any] = {"password_file": _abs(mqtt.password_file)}
    if isinstance(mqtt.tls, TlsConfig):
        update["tls"] = _abs_tls(mqtt.tls)
    if mqtt.brokers is not None:
        update["brokers"] = [
            b.model_copy(update={"tls": _abs_tls(b.tls)}) if isinstance(b.tls, TlsConfig) else b
            for b in mqtt.brokers
        ]
        both = [k for k in ("host", "port") if k in mqtt.model_fields_set]
        if both:
            issue(
                (both[0],),
                f"mqtt.{' and mqtt.'.join(both)} and mqtt.brokers both given: list every "
                "broker under brokers (host, port, tls, server_name), or give host and "
                "port alone for one broker",
            )
    tb = mqtt.thingsboard
    if tb is not None and tb.access_token_file is not None:
        update["thingsboard"] = tb = tb.model_copy(
            update={"access_token_file": _abs(tb.access_token_file)}
        )
    mqtt = mqtt.model_copy(update=update)

    # where each broker's TLS settings come from: its own 'tls' mapping, or mqtt.tls
    brokers = mqtt.brokers
    seen: set[tuple[str | int, ...]] = set()
    tls_checks: list[tuple[tuple[str | int, ...], TlsConfig]] = []
    source = mqtt.password_source
    token = tb is not None and bool(tb.access_token_file or tb.access_token_credential)
    if tb is not None and tb.access_token_file is not None:
        try:
            read_secret_file(Path(tb.access_token_file))
        except SecretError as exc:
            issue(("thingsboard", "access_token_file"), str(exc).replace("password", "token"))
    views = mqtt.endpoints
    where = [(v.host.lower(), v.broker_port) for v in views]
    for i, view in enumerate(views):
        at: tuple[str | int, ...] = () if brokers is None else ("brokers", i)
        if where.index(where[i]) < i:
            issue(
                (*at, "host"),
                f"broker {view.host}:{view.broker_port} is listed twice (also as "
                f"brokers[{where.index(where[i])}]): list each broker once",
            )
        tls = view.tls_settings
        own = brokers is not None and brokers[i].tls is not None
        clear = tls is None and not is_loopback(view.host)
        if clear and token and not mqtt.allow_plaintext_credentials:
            issue(
                (*at, "host") if brokers is not None else ("thingsboard",),
                "the ThingsBoard access token would cross the network in clear: "
                f"{view.host} is not a loopback address and 'tls: false' turns TLS off. "
                "Remove 'tls: false' (TLS is the default), or, on a trusted network only, "
                "set mqtt.allow_plaintext_credentials: true",
            )
        if clear and mqtt.username is not None and not mqtt.allow_plaintext_credentials:
            issue(
                (*at, "host") if brokers is not None else (source or "username",),
                f"the MQTT {'password' if source else 'username'} would cross the network "
                f"in clear: {view.host} is not a loopback address and 'tls: false' turns "
                "TLS off. Remove 'tls: false' (TLS is the default), or, on a trusted "
                "network only, set mqtt.allow_plaintext_credentials: true",
            )
        loc = (*at, "tls") if own else ("tls",)
        if tls is not None and loc not in seen:
            seen.add(loc)
            tls_checks.append((loc, tls))
    if mqtt.password_file is not None:
        try:
            read_secret_file(Path(mqtt.password_file))
        except SecretError as exc:
            issue(("password_file",), str(exc))
    name = mqtt.password_credential
    if name is not None and (need_secrets or os.environ.get(CREDENTIALS_ENV)):
        try:
            read_secret_file(credential_path(name))
        except SecretError as exc:
            issue(("password_credential",), str(exc))
    for loc, tls in tls_checks:
        name = tls.key_credential
        if name is not None and (need_secrets or os.environ.get(CREDENTIALS_ENV)):
            try:
                credential_path(name)
            except SecretError as exc:
                issue((*loc, "key_credential"), str(exc))
        issues += _check_tls(tls, data, display, origins, ("mqtt", *loc))
    return mqtt, issues


def _check_tls(
    tls: TlsConfig,
    data: Any,
    display: str,
    origins: _Origins,
    at: tuple[str | int, ...] = ("mqtt", "tls"),
) -> list[ConfigIssue]:
    """Load the TLS files the way the MQTT client will, so a missing or unreadable file is
    a config error at its line (``at``: where the settings are), not a crash at connect
    time."""
    issues: list[ConfigIssue] = []

    def issue(key: str, message: str) -> None:
        f, line, col, p = _locate(data, (*at, key), display, origins, key=False)
        issues.append(ConfigIssue(f, line, col, p, message))

    limits = {
        "ca_file": (MAX_PEM_BYTES, "a CA file"),
        "cert_file": (MAX_PEM_BYTES, "a certificate file"),
        "key_file": (MAX_KEY_BYTES, "a key file"),
    }
    for key in ("ca_file", "cert_file", "key_file"):
        name = getattr(tls, key)
        if name is None:
            continue
        if not Path(name).exists() and not Path(name).is_symlink():
            issue(key, f"no such file: {name}")
        elif Path(name).exists() and not os.access(name, os.R_OK):
            issue(
                key,
                f"cannot read {name}: permission denied for this user (the agent's user, "
                "edge-agent, must be able to read it: chown or chgrp it, mode 0640/0600)",
            )
        else:
            try:
                read_regular_file(name, *limits[key])
            except SecretError as exc:
                issue(key, str(exc))
    if issues:
        return issues
    ctx = ssl.create_default_context()
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            issue("ca_file", f"cannot load CA certificates from {tls.ca_file}: {exc}")
    if tls.key_credential is not None and not os.environ.get(CREDENTIALS_ENV):
        return issues  # not checkable outside the service (validate says so)
    try:
        load_client_cert(ctx, tls)
    except SecretError as exc:
        issue("key_credential" if tls.key_credential else "key_file", str(exc))
    except (ssl.SSLError, OSError) as exc:
        issue("cert_file", f"cannot load client certificate/key: {_ssl_reason(exc)}")
    return issues


def _ssl_reason(exc: BaseException) -> str:
    """An SSL/OS error in a few words (OpenSSL's reason code, or the OS's message)."""
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    return str(reason or getattr(exc, "strerror", None) or type(exc).__name__)


def load_config(path: str | Path, need_secrets: bool = False) -> AgentConfig:
    """Load, validate and resolve the config at ``path``.

    Relative paths in the file (``state_dir``, ``profiles_dir``, ``include``, TLS and
    password files) are resolved against the file's directory. Device profiles are merged
    into each device's ``points`` (profile points first). Secret files and systemd
    credentials are checked for being there; with ``need_secrets`` (the agent about to run)
    a credential without ``$CREDENTIALS_DIRECTORY`` is an error too, otherwise
    ``validate`` only warns that it could not check it (:func:`config_notes`).

    Each file is read once: its data is built with the line and column of every key and
    item (:func:`_parse`), so an invalid file costs what a valid one does (a file within
    the caps is refused or explained in under 2 s of CPU and 100 MB, see
    tests/test_config_hostile.py).

    Returns:
        the validated :class:`AgentConfig`.
    Raises:
        ConfigError: with every problem found, each at ``file:line:col``.
    """
    try:
        return _load(Path(path), need_secrets=need_secrets)
    except ConfigError:
        raise
    except Exception as exc:  # said as a config error, never a traceback
        raise ConfigError([unexpected_issue(exc, path)]) from None


def unexpected_issue(exc: BaseException, path: str | Path) -> ConfigIssue:
    """A problem the loader did not foresee, as one line naming the file and the kind of
    problem, never the exception's text (which may quote the file, secrets included)."""
    import errno

    where = str(getattr(exc, "filename", None) or path)
    if isinstance(exc, RecursionError):
        what = "it is nested too deeply to be a config"
    elif isinstance(exc, UnicodeError):
        what = "it is not UTF-8 text (a binary file?)"
    elif isinstance(exc, IsADirectoryError):
        what = "it is a directory, not a file"
    elif isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        what = "it is a loop of symbolic links"
    elif isinstance(exc, RuntimeError) and "loop" in str(exc).lower():
        what = "its path goes through a loop of symbolic links"  # pathlib.Path.resolve
    elif isinstance(exc, OSError):
        what = f"it cannot be read ({exc.strerror or type(exc).__name__})"
    elif isinstance(exc, MemoryError):
        what = "it takes more memory than there is"
    else:
        what = f"it could not be read ({type(exc).__name__})"
    return ConfigIssue(_display(Path(where)), 1, 1, "", f"cannot load the config: {what}")


def _load(path: Path, need_secrets: bool = False) -> AgentConfig:
    main = Path(path).resolve()
    base = main.parent
    display = _display(main)
    budget = _Budget()
    data, issues = _parse(main, display, budget)
    if data is None and issues:
        raise ConfigError(issues)
    if not isinstance(data, dict):
        what = (
            "is empty"
            if data is None
            else ("holds a list" if isinstance(data, list) else f"holds a single value ({data!r})")
        )
        raise ConfigError(
            [
                *issues,
                ConfigIssue(
                    display,
                    1,
                    1,
                    "",
                    f"the config file {what}; it must be a mapping of keys "
                    "(see config/agent.example.yaml)",
                ),
            ]
        )
    origins = _Origins({})

    # profiles read and walked ahead, so that the caps of all files are known first
    pdir_ahead, outside_ahead = _profiles_dir(data.get("profiles_dir"), base)
    if outside_ahead is None and pdir_ahead.is_dir():
        for pfile in _profile_files(pdir_ahead)[0]:
            _prefetch(pfile, _display(pfile), budget)

    # includes: each file holds one device (mapping) or a list of devices
    _splice_includes(data, base, display, origins, issues, budget, main)

    # duplicate device ids
    devs = data.get("devices")
    if isinstance(devs, list):
        seen: dict[str, int] = {}
        for i, d in enumerate(devs):
            if isinstance(d, dict) and isinstance(d.get("id"), str):
                did = d["id"]
                if did in seen:
                    f, line, col, p = _locate(
                        data, ("devices", i, "id"), display, origins, key=False
                    )
                    issues.append(
                        ConfigIssue(
                            f,
                            line,
                            col,
                            p,
                            f"duplicate device id {short_repr(did)} (also "
                            f"devices[{seen[did]}]); device ids must be "
                            "unique",
                        )
                    )
                else:
                    seen[did] = i

    plain = _to_plain(data)
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate(plain)
    except ValidationError as exc:
        issues += _pydantic_issues(exc, AgentConfig, data, display, origins)

    # profiles
    pdir_raw = plain.get("profiles_dir") if isinstance(plain, dict) else None
    pdir, outside = _profiles_dir(pdir_raw, base)
    profiles: dict[str, ModbusProfile] = {}
    broken: set[str] = set()
    if outside is not None:
        f, line, col, p = _locate(data, ("profiles_dir",), display, origins, key=False)
        issues.append(ConfigIssue(f, line, col, p, outside))
    elif pdir_raw and not pdir.is_dir():
        f, line, col, p = _locate(data, ("profiles_dir",), display, origins, key=False)
        issues.append(
            ConfigIssue(f, line, col, p, f"profiles_dir {str(pdir)!r} is not a directory")
        )
    elif pdir.is_dir():
        loaded = load_profiles(pdir, budget)
        if loaded.refused:
            raise _Refused(loaded.issues)
        profiles, broken = loaded.valid, loaded.broken
        issues += loaded.issues

    # profile references, checked on the raw data so they are reported with other errors
    raw_devices = plain.get("devices") if isinstance(plain, dict) else None
    if isinstance(raw_devices, list):
        for i, d in enumerate(raw_devices):
            ref = d.get("profile") if isinstance(d, dict) else None
            if not isinstance(ref, str) or ref in profiles or ref in broken:
                continue
            f, line, col, p = _locate(data, ("devices", i, "profile"), display, origins, key=False)
            close = difflib.get_close_matches(ref, list(profiles), n=1)
            known = ", ".join(sorted(profiles)) or f"none found in {_display(pdir)}"
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known profiles: {known}"
            issues.append(ConfigIssue(f, line, col, p, f"unknown profile {short_repr(ref)}{hint}"))

    if cfg is None:
        raise ConfigError(issues)
    resolved = []
    for i, dev in enumerate(cfg.devices):
        prof = profiles.get(dev.profile) if dev.profile is not None else None
        if prof is None:
            resolved.append(dev)
            continue
        merged, errs = _apply_profile(dev, prof, i, data, display, origins)
        issues += errs
        resolved.append(merged)
    # a device whose profile could not be applied has no points to check rules against:
    # its profile's problem is the one to report, not every rule on it
    unresolved = {d.id for d in cfg.devices if d.profile is not None and d.profile not in profiles}
    issues += _check_alarm_refs(cfg, resolved, data, display, origins, unresolved)
    if issues:
        raise ConfigError(issues)

    def _abs(p: str | None) -> str | None:
        return None if p is None else _resolved(base / p)

    state = Path(_abs(cfg.state_dir) or cfg.state_dir)
    problem = _state_dir_problem(state)
    if problem is not None and state != Path(os.path.normpath(base / cfg.state_dir)):
        problem = f"{cfg.state_dir!r} leads through a link to {state}, and {problem}"
    if problem is not None:
        f, line, col, p = _locate(data, ("state_dir",), display, origins, key=False)
        raise ConfigError([ConfigIssue(f, line, col, p, problem)])
    mqtt, mqtt_issues = _resolve_mqtt(cfg.mqtt, base, data, display, origins, need_secrets)
    if mqtt_issues:
        raise ConfigError(mqtt_issues)
    return cfg.model_copy(
        update={
            "devices": resolved,
            "mqtt": mqtt,
            "state_dir": _abs(cfg.state_dir),
            "profiles_dir": str(pdir),
            "clock": cfg.clock.model_copy(update={"sync_file": _abs(cfg.clock.sync_file)}),
        }
    )


def _check_alarm_refs(
    cfg: AgentConfig,
    devices: list[Any],
    data: Any,
    display: str,
    origins: _Origins,
    unresolved: Collection[str] = (),
) -> list[ConfigIssue]:
    """Alarm rules name existing devices and points; outputs name existing rules; ids,
    names and pins are unique. The points of ``unresolved`` devices (their profile is
    unknown or broken, reported already) are not checked."""
    issues: list[ConfigIssue] = []

    def issue(loc: tuple[int | str, ...], message: str) -> None:
        f, line, col, p = _locate(data, loc, display, origins, key=False)
        issues.append(ConfigIssue(f, line, col, p, message))

    def hint(name: str, options: list[str]) -> str:
        close = difflib.get_close_matches(name, options, n=1)
        if close:
            return f" (did you mean '{close[0]}'?)"
        return f" (there are: {', '.join(sorted(set(options)))})" if options else ""

    by_id = {d.id: d for d in devices}
    rule_ids: dict[str, int] = {}
    for i, rule in enumerate(cfg.alarms):
        if rule.id in rule_ids:
            issue(
                ("alarms", i, "id"),
                f"rule id {rule.id!r} is also used by alarms[{rule_ids[rule.id]}]",
            )
        rule_ids.setdefault(rule.id, i)
        if rule.device is not None:
            targets = [by_id[rule.device]] if rule.device in by_id else []
            if not targets:
                issue(
                    ("alarms", i, "device"),
                    f"no device {rule.device!r}{hint(rule.device, list(by_id))}",
                )
        else:
            targets = [d for d in devices if d.profile == rule.profile]
            if not targets:
                issue(("alarms", i, "profile"), f"no device uses profile {rule.profile!r}")
        for d in targets:
            if d.id in unresolved:
                continue
            points = {p.name: p for p in d.points}
            pt = points.get(rule.point)
            if pt is None:
                issue(
                    ("alarms", i, "point"),
                    f"device {d.id!r} has no point {rule.point!r}{hint(rule.point, list(points))}",
                )
            elif rule.kind in ("high", "low", "rate") and pt.type == "string":
                issue(
                    ("alarms", i, "kind"),
                    f"point {rule.point!r} is text: a {rule.kind} rule needs a number",
                )
    names: dict[str, int] = {}
    pins: dict[str, str] = {}

    def pin(where: tuple[int | str, ...], value: object, owner: str) -> None:
        key = str(value).upper().removeprefix("GPIO")
        if key in pins:
            issue(where, f"pin {value} is also used by {pins[key]}")
        pins.setdefault(key, owner)

    for i, o in enumerate(cfg.outputs):
        if o.name in names:
            issue(
                ("outputs", i, "name"),
                f"output name {o.name!r} is also used by outputs[{names[o.name]}]",
            )
        names.setdefault(o.name, i)
        pin(("outputs", i, "pin"), o.pin, f"output {o.name!r}")
        for j, r in enumerate(o.rules):
            if r not in rule_ids:
                issue(("outputs", i, "rules", j), f"no alarm rule {r!r}{hint(r, list(rule_ids))}")
    if cfg.gpio.ack_button is not None:
        pin(("gpio", "ack_button", "pin"), cfg.gpio.ack_button.pin, "the acknowledge button")
    if cfg.gpio.status_led is not None:
        pin(("gpio", "status_led", "pin"), cfg.gpio.status_led.pin, "the status LED")
    return issues


def _apply_profile(
    dev: Any, prof: ModbusProfile, i: int, data: Any, display: str, origins: _Origins
) -> tuple[Any, list[ConfigIssue]]:
    """The device with its profile's points (minus ``omit``, changed by ``overrides``)
    followed by its own points; problems located at the device's keys."""
    issues: list[ConfigIssue] = []

    def issue(loc: tuple[int | str, ...], message: str, key: bool = False) -> None:
        f, line, col, p = _locate(data, ("devices", i, *loc), display, origins, key=key)
        issues.append(ConfigIssue(f, line, col, p, message))

    names = [pt.name for pt in prof.points]

    def unknown(name: str) -> str:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; it has: {', '.join(names)}"
        return f"profile {prof.name!r} has no point {name!r}{hint}"

    for k, name in enumerate(dev.omit):
        if name not in names:
            issue(("omit", k), unknown(name))
    points: list[ModbusPoint] = []
    for pt in prof.points:
        if pt.name in dev.omit:
            continue
        change = dev.overrides.get(pt.name)
        if change is None:
            points.append(pt)
            continue
        if "name" in change:
            issue(("overrides", pt.name, "name"), "a point's name cannot be overridden")
            continue
        doc = pt.model_dump(exclude_unset=True, by_alias=True)
        doc.pop("register", None)  # the profile's Modicon number is in table + address
        if "register" in change:  # a Modicon number replaces the profile's address
            doc.pop("address", None)
            doc.pop("table", None)
        doc.update(change)
        try:
            points.append(ModbusPoint.model_validate(doc))
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                issue(("overrides", pt.name, *loc), _message(err, ModbusPoint))
    for name in dev.overrides:
        if name not in names:
            issue(("overrides", name), unknown(name), key=True)
        elif name in dev.omit:
            issue(("overrides", name), f"point {name!r} is both overridden and omitted", key=True)
    for j, pt in enumerate(dev.points):
        if pt.name in names:
            issue(
                ("points", j, "name"),
                f"point {pt.name!r} is already defined by profile {prof.name!r}; to change it, "
                f"use overrides: {{{pt.name}: {{key: value}}}}",
            )
    base = prof.address_base if dev.address_base is None else dev.address_base
    if base:
        shifted = []
        for pt in points:
            address = pt.address + base
            if address + pt.register_count > 65536:
                loc = ("address_base",) if dev.address_base is not None else ("profile",)
                issue(
                    loc,
                    f"point {pt.name!r} of profile {prof.name!r} would be at address "
                    f"{address}, past 65535, with base {base}",
                )
                continue
            shifted.append(pt.model_copy(update={"address": address}))
        points = shifted
    merged = [*points, *dev.points]
    if not issues:
        try:
            check_decimal_point_refs(merged, f"device {dev.id!r}")
        except ValueError as exc:
            issue(("omit",) if dev.omit else ("profile",), str(exc))
    update: dict[str, Any] = {"points": merged, "overrides": {}, "omit": [], "address_base": None}
    return dev.model_copy(update=update), issues


_FC = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}
_MODICON_RANGES = {
    "holding": (40001, 49999, 400001, 465536),
    "input": (30001, 39999, 300001, 365536),
}


def _point_notes(
    points: Any, loc: tuple[int | str, ...], data: Any, display: str, origins: _Origins
) -> list[ConfigIssue]:
    out: list[ConfigIssue] = []
    if not isinstance(points, list):
        return out
    for j, p in enumerate(points):
        if not isinstance(p, dict):
            continue
        register = p.get("register")
        if register is not None:
            try:
                table, address = modicon_address(register)
            except ValueError:
                continue
            f, line, col, path = _locate(data, (*loc, j, "register"), display, origins, key=False)
            out.append(
                ConfigIssue(
                    f,
                    line,
                    col,
                    path,
                    f"Modicon {register} is {table} address {address} (FC {_FC[table]:02d})",
                    "note",
                )
            )
            continue
        raw_address = p.get("address")
        ranges = _MODICON_RANGES.get(str(p.get("table", "holding")))
        if ranges is None or not isinstance(raw_address, int):
            continue
        table, address = str(p.get("table", "holding")), raw_address
        lo5, hi5, lo6, hi6 = ranges
        if lo5 <= address <= hi5 or lo6 <= address <= hi6:
            f, line, col, path = _locate(data, (*loc, j, "address"), display, origins, key=False)
            out.append(
                ConfigIssue(
                    f,
                    line,
                    col,
                    path,
                    f"{table} address {address} looks like a Modicon register "
                    f"number; if the manual means register {address}, write "
                    f'register: "{address}" (address '
                    f"{modicon_address(address)[1]}) instead; the address is "
                    "used as written",
                    "warning",
                )
            )
    return out


def config_notes(path: str | Path) -> list[ConfigIssue]:
    """Warnings and notes for ``edge-agent validate`` about a config that loads: which PDU
    address each Modicon ``register`` became, and ``address`` values that look like Modicon
    numbers (used as written, never "fixed"), ids followed by a comment, MQTT settings worth
    a second look. The files are read again the way :func:`load_config` reads them, so
    whatever it accepts gets its notes."""
    main = Path(path).resolve()
    try:
        return _config_notes(main)
    except ConfigError:  # changed since it was loaded: the next load says what is wrong
        return []
    except Exception as exc:  # said in a line, never a traceback
        issue = unexpected_issue(exc, main)
        return [
            ConfigIssue(
                issue.file, 1, 1, "", f"no notes: {issue.message.split(': ', 1)[1]}", "warning"
            )
        ]


def _config_notes(main: Path) -> list[ConfigIssue]:
    display = _display(main)
    budget = _Budget()
    data, issues = _parse(main, display, budget)
    if issues or not isinstance(data, dict):
        return []
    origins = _Origins({})
    _splice_includes(data, main.parent, display, origins, [], budget, main)
    out: list[ConfigIssue] = []
    devices = data.get("devices")
    for i, dev in enumerate(devices if isinstance(devices, list) else []):
        if isinstance(dev, dict):
            out += _point_notes(dev.get("points"), ("devices", i, "points"), data, display, origins)
    pdir, outside = _profiles_dir(data.get("profiles_dir"), main.parent)
    if outside is None and pdir.is_dir():
        for p in _profile_files(pdir)[0]:
            pdata, perrs = _parse(p, _display(p), budget)
            if not perrs and isinstance(pdata, dict):
                out += _point_notes(
                    pdata.get("points"), ("points",), pdata, _display(p), _Origins({})
                )
    out += _mqtt_notes(data, main, display, origins)
    for f in {main, *(Path(p) for p in origins.files.values())}:
        out += _comment_notes(f)
    return out


_ID_COMMENT = re.compile(
    r"^\s*(?:-\s+)?(?P<key>id|gateway_id|device|point|rule)\s*:\s*"
    r"(?P<value>[^'\"\s#{\[][^#]*?)\s+(?P<comment>#\S.*)$"
)
"""``id: pump #2``: an id followed on its line by a comment that starts right after its
``#`` (``#2``, ``#north``), most likely meant as part of the id."""


def _comment_notes(path: Path) -> list[ConfigIssue]:
    """A warning for each id whose line goes on with ``#…`` without a space: YAML makes
    that a comment (YAML 1.2 section 6.6), so the id is only what stands before it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _ID_COMMENT.match(line)
        if m is None:
            continue
        value, comment = m.group("value").strip(), m.group("comment")
        out.append(
            ConfigIssue(
                _display(path),
                n,
                m.start("comment") + 1,
                "",
                f"'{comment}' after {m.group('key')} {value!r} is a YAML comment, so the "
                f"{m.group('key')} is {value!r}; if '{value} {comment}' was meant, note that "
                "ids cannot hold '#' or spaces: write an id such as "
                f"'{suggest_name(value + ' ' + comment) or value}' and put the text in "
                "a quoted name",
                "warning",
            )
        )
    return out


def _mqtt_notes(data: Any, main: Path, display: str, origins: _Origins) -> list[ConfigIssue]:
    """Warnings about how the ``mqtt`` section treats the link and its secrets
    (:func:`agent.tls.security_warnings`), and credentials that cannot be checked here."""
    raw = _to_plain(data).get("mqtt") or {}
    try:
        mqtt, _ = _resolve_mqtt(
            MqttConfig.model_validate(raw), main.parent, data, display, origins, False
        )
    except ValidationError:
        return []
    out: list[ConfigIssue] = []

    def warn(loc: tuple[str | int, ...], message: str) -> None:
        f, line, col, p = _locate(data, loc, display, origins, key=True)
        out.append(ConfigIssue(f, line, col, p, message, "warning"))

    for loc, message in security_warnings(mqtt, main):
        warn(loc, message)
    cid = mqtt.client_id
    if cid is not None and mqtt.protocol == "3.1.1" and len(cid) > PORTABLE_CLIENT_ID_MAX:
        f, line, col, p = _locate(data, ("mqtt", "client_id"), display, origins, key=False)
        out.append(
            ConfigIssue(
                f,
                line,
                col,
                p,
                f"the client id is {len(cid)} characters long: an MQTT 3.1.1 broker must "
                f"accept 1 to {PORTABLE_CLIENT_ID_MAX} and may refuse more (MQTT 3.1.1 "
                "section 3.1.3.1); common brokers take it, but if the broker refuses the "
                "connection with 'identifier rejected', shorten it",
                "note",
            )
        )
    if not os.environ.get(CREDENTIALS_ENV):
        creds: dict[tuple[str | int, ...], str | None] = {
            ("mqtt", "password_credential"): mqtt.password_credential
        }
        for i, view in enumerate(mqtt.endpoints):
            tls = view.tls_settings
            own = mqtt.brokers is not None and mqtt.brokers[i].tls is not None
            at = ("mqtt", "brokers", i, "tls") if own else ("mqtt", "tls")
            creds[(*at, "key_credential")] = tls.key_credential if tls else None
        for loc, name in creds.items():
            if name is not None:
                warn(
                    loc,
                    f"credential {name!r} not checked: ${CREDENTIALS_ENV} is not set here (systemd "
                    f"sets it for a unit with LoadCredential={name}:/path/to/file); "
                    "'edge-agent run' refuses to start without it",
                )
    return out
