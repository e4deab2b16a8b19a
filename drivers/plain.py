"""The validated config as plain objects: what the running agent holds instead of models.

The config is checked by pydantic models (:class:`drivers.common.StrictModel`), in a
process of its own (:mod:`agent.config.isolated`). The running agent needs the values,
not the means of checking them: importing pydantic and defining the models costs about
12 MB of resident memory on its own, and a model instance keeps its fields in a dict
(about 550 bytes for a Modbus point). :func:`to_plain` turns a validated model into a
*twin*: an instance of a class with ``__slots__`` for exactly the model's fields (about
200 bytes for a point), frozen, compared and hashed by value like the model, with the
same class name and the same attribute names, so the code that reads a config does not
tell them apart. This module imports nothing of pydantic (:func:`to_plain` does, in the
checking process only).

What a model computes from its fields (a property such as a device's ``bus``) is computed
once by the model and kept in the twin: every model names those in
``__plain_computed__``. Type checks on a config object go by its values (the ``driver``
of a device, :mod:`drivers.kinds`), never by the model class.

A twin pickles as its class's *spec* (name, fields, computed names) and its values; the
receiving process makes the class from the spec (:func:`twin_class`, one class per spec),
so it needs no model class to unpickle it.
"""

from __future__ import annotations

from typing import Any, ClassVar

Spec = tuple[str, tuple[str, ...], tuple[str, ...]]
"""(class name, field names, computed names) of a twin class."""

_CLASSES: dict[Spec, type[Plain]] = {}


class Secret:
    """A secret value (a password, in place of pydantic's ``SecretStr``): shown as
    ``'**********'`` by ``str()`` and ``repr()``, given only by :meth:`get_secret_value`."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def get_secret_value(self) -> str:
        """The secret itself."""
        return str(self._value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Secret cannot be changed")

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))


class Plain:
    """Base of the twin classes (see the module documentation). Frozen: setting an
    attribute raises ``AttributeError``; :meth:`model_copy` makes a changed copy. Equal
    when of one class with equal fields (as a pydantic model compares)."""

    __slots__ = ()
    plain_slots: ClassVar[tuple[str, ...]] = ()
    """The twin's slots: the fields, then the computed values."""
    plain_spec: ClassVar[Spec]
    model_fields: ClassVar[dict[str, None]]
    """The model's field names (in the model's order), as pydantic's ``model_fields``
    gives them (without the field descriptions)."""

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.plain_slots)

    def _field_values(self) -> tuple[Any, ...]:
        # the fields alone, as the model compares (computed values follow from them, and
        # may hold the object itself)
        return tuple(getattr(self, name) for name in self.model_fields)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name!r} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name!r} cannot be deleted")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Plain)
        return self._field_values() == other._field_values()

    def __hash__(self) -> int:
        return hash(self._field_values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.model_fields)
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        # the values as state: pickle sets them after making the object, so an object may
        # hold itself (an ``mqtt`` section is its own only endpoint)
        return (_blank, (self.plain_spec,), self._values())

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.plain_slots, state, strict=True):
            object.__setattr__(self, name, value)

    def model_copy(self, update: dict[str, Any] | None = None) -> Any:
        """A copy with the fields in ``update`` replaced (not checked, as pydantic's
        ``model_copy`` does not check them).

        Raises:
            KeyError: a name in ``update`` that is not a field (computed values cannot be
                replaced: they would no longer follow from the fields).
        """
        update = update or {}
        unknown = set(update) - set(self.model_fields)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        copy = object.__new__(type(self))
        for name in self.plain_slots:
            object.__setattr__(copy, name, update.get(name, getattr(self, name)))
        return copy


def twin_class(spec: Spec) -> type[Plain]:
    """The twin class of ``spec``, made on first use (so equal specs give the same class
    and twins of it compare equal)."""
    cls = _CLASSES.get(spec)
    if cls is None:
        name, fields, computed = spec
        slots = fields + computed
        if len(set(slots)) != len(slots) or not all(s.isidentifier() for s in slots):
            raise ValueError(f"bad twin spec for {name!r}: {slots!r}")
        namespace = {
            "__slots__": slots,
            "__module__": __name__,
            "__qualname__": name,
            "plain_slots": slots,
            "plain_spec": spec,
            "model_fields": dict.fromkeys(fields),
        }
        cls = _CLASSES[spec] = type(name, (Plain,), namespace)
    return cls


def _blank(spec: Spec) -> Plain:
    return object.__new__(twin_class(spec))


def to_plain(value: Any) -> Any:
    """``value`` with every pydantic model in it turned into its twin (recursively through
    lists, tuples, dicts, sets), ``SecretStr`` into :class:`Secret`. Objects that occur
    several times (or inside themselves) become one twin. For the checking process: this
    imports pydantic.

    Raises:
        TypeError: another pydantic type the running agent could not read without pydantic.
    """
    return _Converter().convert(value)


class _Converter:
    def __init__(self) -> None:
        self.done: dict[int, Any] = {}
        self.keep: list[Any] = []  # the originals stay alive: their ids are not reused

    def convert(self, value: Any) -> Any:
        from pydantic import BaseModel, SecretBytes, SecretStr

        if value is None or type(value) in (str, int, float, bool, bytes):
            return value
        key = id(value)
        if key in self.done:
            return self.done[key]
        out: Any
        if isinstance(value, BaseModel):
            cls = type(value)
            fields = tuple(cls.model_fields)
            computed: tuple[str, ...] = getattr(cls, "__plain_computed__", ())
            twin = object.__new__(twin_class((cls.__name__, fields, computed)))
            self.done[key], out = twin, twin
            self.keep.append(value)
            for name in fields + computed:
                object.__setattr__(twin, name, self.convert(getattr(value, name)))
            return out
        if isinstance(value, SecretStr):
            out = Secret(value.get_secret_value())
        elif isinstance(value, SecretBytes):
            raise TypeError("SecretBytes in a config: not supported by the running agent")
        elif isinstance(value, list):
            out = [self.convert(v) for v in value]
        elif isinstance(value, tuple):
            out = tuple(self.convert(v) for v in value)
        elif isinstance(value, dict):
            out = {self.convert(k): self.convert(v) for k, v in value.items()}
        elif isinstance(value, frozenset | set):
            out = type(value)(self.convert(v) for v in value)
        elif type(value).__module__.split(".")[0] in ("pydantic", "pydantic_core"):
            raise TypeError(f"{type(value).__name__} in a config: no plain form for it")
        else:
            out = value
        self.done[key] = out
        self.keep.append(value)
        return out


def plain_data(value: Any) -> Any:
    """``value`` (twins, lists, dicts, scalars) as JSON-ready data: a twin as an object of
    its fields in the model's order (computed values left out), a :class:`Secret` as
    None, anything else that JSON has no type for (a date, a network) as its ``str``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Plain):
        return {name: plain_data(getattr(value, name)) for name in value.model_fields}
    if isinstance(value, Secret):
        return None
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(plain_data(v) for v in value)
    return str(value)
