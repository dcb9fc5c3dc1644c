"""YAML into frozen dataclasses, field by field, and the checks every config shares.

Errors name the dotted field (``optimizer.momentum``) and the allowed keys or values. The checks
(``number``, ``in_range``, ``at_least``, ``one_of``, ``did_you_mean``, ``unknown``) raise
``ValueError`` inside a dataclass's ``__post_init__`` (``from_dict`` turns it into a
``UserError`` naming the config), or ``UserError`` where a name is looked up.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from typing import Any, Dict, Iterable, Mapping, Optional

import yaml

from knl_train.errors import UserError


def from_dict(cls, data: Mapping[str, Any], where: str = ""):
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown config field {_join(where, unknown[0])!r}; "
                        f"allowed in {where or 'the top level'}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"config field {_join(where, missing[0])!r} is required")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where or 'config'}: {e}") from None


def to_dict(obj) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def plain(obj):
    """Tuples to lists, recursively, so a config dumps as plain YAML."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def apply_overrides(data: Dict[str, Any], overrides) -> Dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML scalars (1, 0.5, true, [a, b])."""
    data = dict(data)
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set optimizer.momentum=0.9")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: cannot parse the value: {e}") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of fields")
    return data


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _float_or_none(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not allowed; choose one of "
                            f"{', '.join(map(str, args))}")
        return value
    if origin is dict and args and dataclasses.is_dataclass(args[1]):
        # A mapping of names to nested configs (a convergence study's optimizers).
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected a mapping of names to settings, got {value!r}")
        return {_coerce(args[0], k, where): from_dict(args[1], v, _join(where, str(k)))
                for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and Ellipsis not in args:  # Tuple[int, Optional[int]]
            if len(value) != len(args):
                raise UserError(f"{where}: expected a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else typing.Any
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 and 5e4, without a dot, as strings.
            number = _float_or_none(value)
            value = value if number is None else number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


# ---- shared checks ------------------------------------------------------------------------------
def number(name: str, value, *, minimum: Optional[float] = None, above: Optional[float] = None,
           maximum: Optional[float] = None, below: Optional[float] = None, integer: bool = False,
           optional: bool = False, hint: str = ""):
    """``value`` as a finite number within the bounds, or ``ValueError`` naming ``name``.

    ``minimum``/``maximum`` are inclusive, ``above``/``below`` exclusive; ``integer`` wants a
    whole number (returned as int); ``optional`` lets None through; ``hint`` says what the
    bound's edge means (``0: automatic``) in the error.
    """
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    for bound, fails, op in ((minimum, lambda b: value < b, ">="), (above, lambda b: value <= b, ">"),
                             (maximum, lambda b: value > b, "<="), (below, lambda b: value >= b, "<")):
        if bound is not None and fails(bound):
            raise ValueError(f"{name} must be {op} {bound:g}{f' ({hint})' if hint else ''}, got {value!r}")
    return int(value) if integer else float(value)


def in_range(obj, *names: str, **bounds) -> None:
    """Each of ``obj``'s fields ``names`` is None or a ``number`` within ``bounds`` (``minimum``,
    ``above``, ``maximum``, ``below``): a dataclass's range check in its ``__post_init__``."""
    for name in names:
        number(name, getattr(obj, name), optional=True, **bounds)


def at_least(obj, bound: float, *names: str) -> None:
    """Each of ``obj``'s fields ``names`` is None or ``>= bound`` (a dataclass's range check)."""
    in_range(obj, *names, minimum=bound)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown(kind: str, word: str, choices: Iterable[str], alternative: str = "") -> UserError:
    """The error for a name that is not one of ``choices``: the closest one, then all of them."""
    choices = sorted(choices)
    tail = f", {alternative}" if alternative else ""
    return UserError(f"unknown {kind} {word!r}{did_you_mean(word, choices)}; "
                     f"{kind}s: {', '.join(choices)}{tail}")


def one_of(name: str, value, choices: Iterable[str]):
    """``value`` if it is one of ``choices``, else ``ValueError`` with the closest and the list."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not allowed{did_you_mean(value, choices)}; "
                         f"choose one of {', '.join(map(str, choices))}")
    return value
