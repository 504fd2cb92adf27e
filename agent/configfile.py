"""The one configuration loader of both roles: a TOML file decoded once into frozen dataclasses.

The agent (`capmon.agent.config`) and the collector (`capmon.collector.config`) describe their
sections as dataclasses and decode them here, so both word every problem alike:
`<file>: [section] key: reason`, an unknown key named with the known ones. A field's bounds live in
its metadata (`bounds(gt=0)`), next to the option they bound, and are checked while decoding.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "Where", "bounds", "check_sections", "decode", "parse_toml", "read_toml"]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, the section, the key and why."""


@dataclass(frozen=True)
class Where:
    """A place in a configuration file, rendered `<file>: [section] key`."""

    source: str
    section: str = ""
    key: str = ""

    @classmethod
    def of(cls, where: Where | str) -> Where:
        """Accept the older `"<file>: [section]"` prefix strings too (probe options, sinks)."""
        if isinstance(where, Where):
            return where
        m = re.fullmatch(r"(.*): \[([^\]]*)\]", where)
        return cls(m.group(1), m.group(2)) if m else cls(where)

    def child(self, name: str) -> Where:
        return dataclasses.replace(self, key=f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> Where:
        return dataclasses.replace(self, key=f"{self.key}[{index}]")

    @property
    def dotted(self) -> str:
        """The key as one name from the file's top: `collector.port`, `auth.agent_tokens[0].env`."""
        return ".".join(p for p in (self.section, self.key) if p)

    def __str__(self) -> str:
        text = f"{self.source}: [{self.section}]" if self.section else f"{self.source}:"
        return f"{text} {self.key}" if self.key else text

    def error(self, reason: str) -> ConfigError:
        if not self.section and not self.key:
            return ConfigError(f"{self.source}: {reason}")
        return ConfigError(f"{self}: {reason}")


def bounds(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None, why: str = ""
) -> dict[str, Any]:
    """Field metadata: the range a number option (or each number of a table option) must lie in,
    checked by `decode`; `why` is said with the range ("the wire protocol's limit")."""
    return {"bounds": (gt, ge, le, why)}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The file's tables; a missing, unreadable or malformed file is a `ConfigError` naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def _guess(name: str, known: Iterable[str]) -> str:
    """ "; did you mean 'window_s'?" for a near miss, else nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_sections(data: Mapping[str, Any], known: Iterable[str], source: str) -> None:
    """An unknown top-level table is an error listing the known ones."""
    known = sorted(known)
    for name in data:
        if name not in known:
            raise ConfigError(
                f"{source}: unknown section [{name}] (known: {', '.join(known)}){_guess(name, known)}"
            )


_SECRET_NAMES = frozenset({"token", "password", "secret"})


def decode(cls: type, table: Any, where: Where | str) -> Any:
    """Build the frozen dataclass `cls` from a TOML table, converting and checking every value.

    Types: bool, int, float (finite; an int is taken), str, `tuple[X, ...]`, `Mapping[str, X]`,
    `Literal[...]`, unions (`float | None`), `Any`, and nested dataclasses. A field marked
    `bounds(...)` is range-checked. What the dataclass itself raises (`__post_init__`) is reported
    at the section.
    """
    where = Where.of(where)
    if not isinstance(table, Mapping):
        raise where.error(f"must be a table, got {_describe(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        spot = where.child(key)
        f = fields.get(key)
        if f is None:
            known = ", ".join(sorted(fields))
            raise where.error(f"unknown key {spot.dotted!r} (known: {known}){_guess(key, fields)}")
        # Never echo a secret's value, even a mistyped one.
        secret = not f.repr or key in _SECRET_NAMES
        tp = hints.get(key, _type_of_default(f))
        value = _convert(value, tp, spot, secret)
        _check_bounds(value, f.metadata.get("bounds"), spot)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise where.error(str(exc)) from None


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a third-party config whose annotations cannot be resolved: judge by defaults
        return {}


def _type_of_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is dataclasses.MISSING or f.default is None:
        return Any
    if isinstance(f.default, tuple):
        return tuple[Any, ...]
    return type(f.default)


def _describe(value: Any, secret: bool = False) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    if secret or isinstance(value, (list, dict)):
        return kind
    text = repr(value)
    return f"{kind} ({text[:60]}…)" if len(text) > 60 else text


def _convert(value: Any, tp: Any, where: Where, secret: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    got = _describe(value, secret)
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if origin is Literal:
        if value not in args:
            raise where.error(f"must be one of {', '.join(map(repr, args))}, got {got}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _convert(value, arg, where, secret)
            except ConfigError:
                continue
        if len(options) == 1:
            return _convert(value, options[0], where, secret)
        raise where.error(f"must be {' or '.join(_name(a) for a in options)}, got {got}")
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise where.error(f"must be a list, got {got}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and args:
            if len(value) != len(args):
                raise where.error(f"must be a list of {len(args)}, got {len(value)}")
            return tuple(
                _convert(v, a, where.item(i), secret)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        converted = [_convert(v, item, where.item(i), secret) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise where.error(f"must be a table, got {got}")
        item = args[1] if len(args) == 2 else Any
        return types.MappingProxyType(
            {str(k): _convert(v, item, where.child(str(k)), secret) for k, v in value.items()}
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return decode(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(f"must be true or false, got {got}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"must be an integer, got {got}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"must be a number, got {got}")
        if not math.isfinite(value):
            raise where.error(f"must be a finite number, got {got}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise where.error(f"must be a string, got {got}")
        return value
    return value  # a type TOML cannot name: the dataclass judges it


def _name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return "a table"


def _check_bounds(value: Any, limits: tuple[Any, ...] | None, where: Where) -> None:
    if limits is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_bounds(item, limits, where.child(str(key)))
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    gt, ge, le, why = limits
    why = f" ({why})" if why else ""
    if ge is not None and le is not None:
        if not ge <= value <= le:
            raise where.error(f"must be {_num(ge)}..{_num(le)}{why}, got {_num(value)}")
        return
    if gt is not None and not value > gt:
        raise where.error(f"must be > {_num(gt)}{why}, got {_num(value)}")
    if ge is not None and not value >= ge:
        raise where.error(f"must be ≥ {_num(ge)}{why}, got {_num(value)}")
    if le is not None and not value <= le:
        raise where.error(f"must be at most {_num(le)}{why}, got {_num(value)}")


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
