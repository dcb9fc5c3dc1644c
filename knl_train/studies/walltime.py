"""Walltimes, parsed in one place: a study's walltime, Slurm's ``--time`` and PBS's ``walltime``.

All three write a time as ``[D-]F[:F[:F]]``; they differ in which of those forms they take and
what a lone number means. :func:`clock` splits the text; each reader applies its own rules:

- a study (:func:`minutes`): HH:MM:SS, MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, read as Slurm reads
  them, or else an arithmetic formula in minutes over the point's numbers (of bounded length);
  either way more than zero, since Slurm reads ``--time=0`` as no limit;
- Slurm (:func:`valid_slurm`): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, with the clock
  fields in range;
- PBS (:func:`valid_pbs`): HH:MM:SS (two-digit MM and SS below 60) or seconds.

:func:`format_minutes` writes HH:MM:SS, which both schedulers read.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from knl_train.errors import UserError

_CLOCK = re.compile(r"(?:(\d+)-)?(\d+(?::\d+)*)")
# Powers in floats: an absurd exponent overflows at once instead of computing a huge integer.
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Pow: lambda a, b: float(a) ** float(b), ast.Mod: operator.mod}
_FUNCS = {"min": min, "max": max, "ceil": math.ceil, "log2": math.log2, "sqrt": math.sqrt}
# A formula is a line a person writes: longer ones are refused before parsing (a parser or the
# evaluator would otherwise recurse into a RecursionError or MemoryError).
MAX_FORMULA_CHARS = 500
MAX_FORMULA_NODES = 200


@dataclass(frozen=True)
class Clock:
    """A time as written: the days before a ``-`` (if any) and the ``:``-separated fields after,
    each kept as its digits (how many digits a field has is part of the form)."""
    days: Optional[str]
    fields: Tuple[str, ...]

    def later_fields_short(self) -> bool:
        """Every field after the first has one or two digits."""
        return all(len(f) <= 2 for f in self.fields[1:])


def clock(text: str) -> Optional[Clock]:
    """``text`` split into days and fields, or None if it is not ``[D-]F[:F...]`` (digits only)."""
    m = _CLOCK.fullmatch(text)
    return Clock(m.group(1), tuple(m.group(2).split(":"))) if m else None


# ---- the study's walltime ------------------------------------------------------------------------
def minutes(text, variables: Dict[str, float]) -> float:
    """Minutes from "HH:MM:SS" (also MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) or an arithmetic formula in minutes."""
    text = str(text).strip()
    c = clock(text)
    if c is not None and (":" in text or "-" in text) and len(c.fields) <= 3 and c.later_fields_short():
        days, fields = int(c.days or 0), [int(f) for f in c.fields]
        if len(fields) == 3:            # H:M:S
            h, mi, s = fields
        elif c.days is not None:        # D-H or D-H:M, as Slurm reads them
            h, mi, s = fields[0], (fields[1] if len(fields) > 1 else 0), 0
        else:                           # M:S, as Slurm and PBS both read two fields
            h, mi, s = 0, fields[0], fields[1]
        total = days * 1440 + h * 60 + mi + s / 60
        if total <= 0:
            # Slurm reads --time=0 as no limit at all, PBS as a job that cannot run.
            raise UserError(f"walltime {text!r} is zero: give the time a point needs, e.g. 00:30:00")
        return total
    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"
    try:
        value = float(_formula(text, variables))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError) as e:
        why = (e.msg if isinstance(e, SyntaxError) else str(e)) or type(e).__name__
        raise UserError(f"walltime {shown!r}: {why}; write HH:MM:SS or a formula in minutes over "
                        f"{', '.join(sorted(variables)) or 'no variables'} (e.g. \"10 + 0.5 * repeats\")") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"walltime {shown!r} gives {value!r} minutes at {variables}; it must be > 0")
    return value


def _formula(text: str, variables: Dict[str, float]):
    """A formula's value; ValueError when it is longer than a formula a person writes."""
    if len(text) > MAX_FORMULA_CHARS:
        raise ValueError(f"a formula of {len(text):,} characters is too long (at most {MAX_FORMULA_CHARS})")
    tree = ast.parse(text, mode="eval")
    nodes = sum(isinstance(n, ast.expr) for n in ast.walk(tree))   # numbers, names, operations
    if nodes > MAX_FORMULA_NODES:
        raise ValueError(f"a formula of {nodes} terms and operators is too long (at most {MAX_FORMULA_NODES})")
    return _eval(tree.body, variables)


def _eval(node, variables):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in variables:
            raise ValueError(f"unknown name {node.id!r}")
        return variables[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, variables), _eval(node.right, variables))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, variables)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords:
        return _FUNCS[node.func.id](*(_eval(a, variables) for a in node.args))
    raise ValueError("only numbers, the variables, + - * / // % **, min, max, ceil, log2 and sqrt are allowed")


def format_minutes(minutes: float) -> str:
    """HH:MM:SS, rounded up to the minute (both Slurm and PBS read it)."""
    total = math.ceil(minutes - 1e-9)
    return f"{total // 60:02d}:{total % 60:02d}:00"


def hms(seconds: float, hour_digits: int = 1) -> str:
    """A duration as H:MM:SS, to the second (hours zero-padded to ``hour_digits``)."""
    s = int(round(seconds))
    return f"{s // 3600:0{hour_digits}d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- what the schedulers accept ------------------------------------------------------------------
def valid_slurm(value: str) -> bool:
    """A Slurm --time value: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    c = clock(value.strip())
    if c is None or len(c.fields) > 3:
        return False
    # With days, the hours are a clock field too; every field after the leading one is one.
    clock_fields = c.fields if c.days is not None else c.fields[1:]
    if any(len(f) > 2 for f in clock_fields):
        return False
    if c.days is not None and int(c.fields[0]) > 23:
        return False
    return all(int(f) < 60 for f in c.fields[1:])


def valid_pbs(value: str) -> bool:
    """A PBS walltime: HH:MM:SS (MM and SS two digits below 60) or a number of seconds."""
    c = clock(value)
    if c is None or c.days is not None:
        return False
    return len(c.fields) == 1 or (len(c.fields) == 3 and
                                  all(len(f) == 2 and f[0] in "012345" for f in c.fields[1:]))
