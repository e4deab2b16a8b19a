"""Ids and display names in the config.

An id (the gateway's, a device's, a point's, an alarm rule's, an output's, a seismic
channel's, a profile's) becomes an MQTT topic level and a key in payloads. It is therefore
restricted to a set that is safe in both: 1 to 64 characters, letters ``A-Z a-z``, digits,
``_``, ``.`` and ``-``, starting with a letter or digit (:data:`NAME_PATTERN`). Nothing else:

- ``/`` separates topic levels: ``Pump 3/North`` would become two levels and be confused
  with a device ``Pump 3`` (MQTT 3.1.1 §4.7.1.1);
- ``+`` and ``#`` are wildcards and must not appear in a topic name a client publishes to
  (MQTT 3.1.1 §4.7.1.2, §4.7.1.3; MQTT 5.0 §4.7.1): Mosquitto closes the connection of a
  client that does, so the gateway would reconnect and publish again for ever;
- U+0000 is not allowed in any MQTT string, nor are the control characters U+0001..U+001F
  and U+007F..U+009F (MQTT 3.1.1 §1.5.3); white space and non-ASCII letters are allowed by
  MQTT but are easy to mistype on a platform and differ in their Unicode forms.

Free text for people (``Pumpe Süd``, ``T2 candle 5W RGB+CW``) goes in a device's ``name``
(:data:`DisplayName`): any printable Unicode text up to :data:`DISPLAY_NAME_MAX`
characters. It only travels inside JSON payloads, never in a topic.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

NAME_MAX = 64
"""Longest id, characters."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""The id rule as a regular expression (checked by pydantic; ``$`` is the end of the text
in pydantic's regular expression engine, a trailing newline does not match)."""
NAME_RULE = (
    "use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit "
    "(no spaces, '/', '+', '#' or control characters: ids become MQTT topic levels)"
)
"""The id rule in words, for config messages."""

DISPLAY_NAME_MAX = 200
"""Longest display name, characters."""
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Bidirectional embeddings, overrides and isolates (Unicode UAX #9): they make text shown
on a dashboard read differently from what it holds."""

TOPIC_PREFIX_MAX = 100
"""Longest ``mqtt.topic_prefix``, characters (topics are at most 65,535 bytes, MQTT 3.1.1
§1.5.3; the prefix is repeated in every message)."""
_LEVEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOPIC_PREFIX_RULE = (
    "topic_prefix is one or more topic levels separated by single '/', each of 1 to 64 "
    "letters, digits, '_', '.' or '-' starting with a letter or digit, at most "
    f"{TOPIC_PREFIX_MAX} characters in all"
)


def short_repr(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages about hostile input
    (a 70,000-character value is shown by its start and its length)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 10 else text[: limit + 10] + "…"


def control_character(text: str) -> str | None:
    """The first character of ``text`` that is no printable text: a control character
    (Unicode category Cc, which includes U+0000), a lone surrogate (Cs), a line or
    paragraph separator (Zl, Zp) or a bidirectional control (UAX #9); None if there is
    none."""
    for c in text:
        if c in _BIDI_CONTROLS or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            return c
    return None


def suggest_name(text: str) -> str | None:
    """A valid id made from ``text``: letters with accents lose them (NFKD, Unicode UAX
    #15), every run of other characters becomes one ``-``, leading ``-_.`` are dropped and
    the result is cut to :data:`NAME_MAX`. None if nothing is left (``'+'``, ``'北'``)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folded).lstrip("-_.")[:NAME_MAX].rstrip("-")
    return name or None


def check_display_name(value: str) -> str:
    """``value`` if it is a display name (:data:`drivers.common.DisplayName`).

    Raises:
        ValueError: too long, empty or holding a control character.
    """
    if len(value) > DISPLAY_NAME_MAX:
        raise ValueError(
            f"name is {len(value)} characters long: at most {DISPLAY_NAME_MAX}; put longer "
            "text in the platform's asset register"
        )
    if not value.strip():
        raise ValueError("name is empty: leave it out, or give the text people should see")
    bad = control_character(value)
    if bad is not None:
        raise ValueError(
            f"name {short_repr(value)} holds the control character U+{ord(bad):04X}: a name is "
            "text for people; remove it"
        )
    return value


def topic_prefix_problem(value: str) -> str | None:
    """Why ``value`` cannot be ``mqtt.topic_prefix``, with a fix; None if it can.

    Refused: more than :data:`TOPIC_PREFIX_MAX` characters, control characters (the broker
    refuses the whole connection, MQTT 3.1.1 §1.5.3), a leading ``$`` (topics starting with
    ``$`` are the broker's own, e.g. ``$SYS``, and are not matched by ``#`` subscriptions,
    MQTT 3.1.1 §4.7.2), empty levels (``a//b``, a leading or trailing ``/``), wildcards
    ``+`` ``#`` (§4.7.1) and any level that is not an id (:data:`NAME_PATTERN`).
    """
    if not value:
        why = "it is empty"
    elif len(value) > TOPIC_PREFIX_MAX:
        why = f"it is {len(value)} characters long"
    elif (bad := control_character(value)) is not None:
        why = f"it holds the control character U+{ord(bad):04X}"
    elif value.startswith("$"):
        why = (
            "topics starting with '$' belong to the broker ($SYS) and are not delivered "
            "to '#' subscribers"
        )
    elif "" in value.split("/"):
        why = "it has an empty level (a leading, trailing or double '/')"
    elif "+" in value or "#" in value:
        why = "'+' and '#' are MQTT wildcards, not allowed in a topic a client publishes to"
    else:
        odd = [level for level in value.split("/") if not _LEVEL_RE.fullmatch(level)]
        if not odd:
            return None
        why = f"level {short_repr(odd[0])} is not allowed"
    levels = [suggest_name(level) for level in value[: TOPIC_PREFIX_MAX * 2].split("/")]
    fix = "/".join(level for level in levels if level)[:TOPIC_PREFIX_MAX].rstrip("/-")
    hint = f"; try '{fix}'" if fix and fix != value else ""
    return f"{short_repr(value)} is not allowed: {why}; {TOPIC_PREFIX_RULE}{hint}"


HOST_MAX = 253
"""Longest host name, characters, without a trailing dot (RFC 1035 section 2.3.4: 255
octets on the wire)."""
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""A host name label: letters, digits and '-', not first or last, 1 to 63 characters
(RFC 1123 section 2.1, RFC 952)."""


def host_problem(value: str) -> str | None:
    """Why ``value`` is neither a host name (RFC 1123 section 2.1: labels of 1 to 63
    letters, digits and ``-``, not starting or ending with ``-``, separated by ``.``, at
    most :data:`HOST_MAX` characters, an optional final ``.``) nor an IP address literal
    (IPv4 dotted quad, IPv6 with an optional ``%zone``, RFC 4007 section 11, also in
    brackets); None if it is one. The message shows a hostile value cut short."""
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    if text is not value:
        return f"{short_repr(value)} is not an IPv6 address"
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs", "Zs")), None)
    if bad is not None:
        what = "a space" if bad == " " else f"the control character U+{ord(bad):04X}"
        return f"the host {short_repr(value)} holds {what}: write a host name or an IP address"
    name = value[:-1] if value.endswith(".") else value
    if len(name) > HOST_MAX:
        return (
            f"the host {short_repr(value)} is {len(name)} characters long: a host name has "
            f"at most {HOST_MAX} (RFC 1035 section 2.3.4)"
        )
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return f"{short_repr(value)} is not an IPv4 address (four numbers 0 to 255)"
    for label in labels:
        if len(label) > 63:
            return (
                f"the host {short_repr(value)} has a label of {len(label)} characters: at "
                "most 63 between dots (RFC 1123 section 2.1)"
            )
        if not _LABEL_RE.fullmatch(label):
            return (
                f"{short_repr(value)} is not a host name: use letters, digits and '-' (not "
                "first or last) between single dots (RFC 1123 section 2.1), or an IP address"
            )
    return None


def check_host(value: str) -> str:
    """``value`` if it is a host (:func:`host_problem`).

    Raises:
        ValueError: why it is not.
    """
    problem = host_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value
