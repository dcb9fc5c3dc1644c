"""The one walltime parser (knl_train.studies.walltime): clock forms and formulas in minutes, and
formatted back; each form read as the three parsers it replaced did (the study spec's, Slurm's
--time checker and PBS's walltime checker)."""

from __future__ import annotations

import itertools
import re

import pytest

from knl_train.errors import UserError
from knl_train.studies import walltime


# ---- the parsers walltime.py replaced, kept here as the reference ---------------------------------
_SPEC_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")
_SLURM_FORMS = (
    re.compile(r"^(\d+)$"),
    re.compile(r"^(\d+):(\d{1,2})$"),
    re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"),
    re.compile(r"^(\d+)-(\d{1,2})$"),
    re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"),
    re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"),
)
_PBS_WALLTIME = re.compile(r"^(\d+:[0-5]\d:[0-5]\d|\d+)$")


def old_spec_clock(text: str):
    text = text.strip()
    m = _SPEC_TIME.match(text)
    if not (m and (":" in text or "-" in text)):
        return None
    days, a, b, c = m.groups()
    if c is not None:
        h, mi, s = int(a), int(b), int(c)
    elif days is not None:
        h, mi, s = int(a), int(b or 0), 0
    else:
        h, mi, s = 0, int(a), int(b or 0)
    return int(days or 0) * 1440 + h * 60 + mi + s / 60


def old_slurm(value: str) -> bool:
    for form in _SLURM_FORMS:
        m = form.match(value.strip())
        if m:
            fields = [int(g) for g in m.groups()]
            if "-" in value and fields[1] > 23:
                return False
            first_clock = 2 if "-" in value else 1
            return all(f < 60 for f in fields[first_clock:])
    return False


def old_pbs(value: str) -> bool:
    return bool(_PBS_WALLTIME.match(value))


def candidates():
    """Times in every shape: 0-3 fields of 1-3 digits, with and without days, and junk."""
    digits = ["0", "5", "00", "07", "23", "24", "59", "60", "75", "123"]
    out = {"", " ", "1h", "-5", "1--2", "1:", ":30", "1::2", "1-", "a:00", "01:00:00 ", " 30:00",
           "1:2:3:4", "1-2:3:4:5", "10 + 2", "1.5", "٣:٠٠", "1-٢٣"}
    for n in (1, 2, 3, 4):
        for fields in itertools.product(digits, repeat=n):
            text = ":".join(fields)
            out.add(text)
            for days in ("0", "1", "12"):
                out.add(f"{days}-{text}")
    return sorted(out)


CANDIDATES = candidates()


def test_there_are_enough_candidates():
    assert len(CANDIDATES) > 40_000


def test_slurm_accepts_and_rejects_as_before():
    assert [v for v in CANDIDATES if walltime.valid_slurm(v) != old_slurm(v)] == []


def test_pbs_accepts_and_rejects_as_before():
    assert [v for v in CANDIDATES if walltime.valid_pbs(v) != old_pbs(v)] == []


def test_study_clock_forms_read_as_before_but_zero_is_an_error():
    differ, zeros = [], []
    for text in CANDIDATES:
        want = old_spec_clock(text)
        if want is None:
            continue   # a formula (or an error): below
        if want == 0:
            with pytest.raises(UserError, match=r"is zero: give the time a point needs"):
                walltime.minutes(text, {})
            zeros.append(text)
        elif walltime.minutes(text, {}) != want:
            differ.append(text)
    assert differ == []
    assert {"00:00:00", "0:00", "0-0", "0-00:00:00", "00:00"} <= set(zeros)
    assert all(text.strip("0-:") == "" for text in zeros)


@pytest.mark.parametrize("text", ["00:00:00", "0-00:00", "00:00"])
def test_zero_walltime_is_an_error(text):
    # Slurm reads --time=00:00:00 as no limit: the study refuses it before rendering.
    with pytest.raises(UserError) as e:
        walltime.minutes(text, {})
    assert str(e.value) == f"walltime {text!r} is zero: give the time a point needs, e.g. 00:30:00"
    assert walltime.minutes("00:00:01", {}) == pytest.approx(1 / 60)


@pytest.mark.parametrize("text, words", [
    # The case: 200,000 terms, a RecursionError in the parser before.
    ("+".join(["1"] * 200_000), "a formula of 399,999 characters is too long (at most 500)"),
    ("1" + "+1" * 250, "a formula of 501 characters is too long (at most 500)"),
    # 120 names and 119 additions: 239 numbers, names and operations.
    ("+".join(["n"] * 120), "a formula of 239 terms and operators is too long (at most 200)"),
    ("-" * 300 + "1", "terms and operators is too long (at most 200)"),
    ("(" * 240 + "1" + ")" * 240, "too many nested parentheses"),
])
def test_formula_length_is_bounded_with_one_line(text, words):
    with pytest.raises(UserError) as e:
        walltime.minutes(text, {"n": 2})
    msg = str(e.value)
    assert msg.startswith("walltime '") and "\n" not in msg and len(msg) < 400
    assert words in msg


def test_formula_within_bounds_still_evaluates():
    text = "+".join(["n"] * 100)            # 199 terms and operators: within the bound
    assert walltime.minutes(text, {"n": 2}) == 200.0
    assert walltime.MAX_FORMULA_CHARS == 500 and walltime.MAX_FORMULA_NODES == 200


def test_formula_with_a_huge_integer_is_an_error_not_a_traceback():
    # An integer too large for a float: OverflowError when checking it, a line now.
    with pytest.raises(UserError, match=r"walltime .*int too large to convert to float"):
        walltime.minutes(" * ".join(["99999999999999999999"] * 20), {})


@pytest.mark.parametrize("text", ["1:123", "1:2:3:4", "1-2:3:4:5", "1:", "1-", "-5", "1h", ""])
def test_study_non_clock_text_is_a_formula_error(text):
    assert old_spec_clock(text) is None
    with pytest.raises(UserError, match="walltime"):
        walltime.minutes(text, {})


@pytest.mark.parametrize("text, minutes", [("45", 45), ("10 + 2 * 3", 16), ("1 - 1 + 5", 5)])
def test_study_formulas(text, minutes):
    assert walltime.minutes(text, {}) == pytest.approx(minutes)


def test_slurm_and_pbs_examples():
    assert walltime.valid_slurm("2-12:30") and walltime.valid_slurm("90") and walltime.valid_slurm("1-23")
    assert not walltime.valid_slurm("1:75:00") and not walltime.valid_slurm("1-24")
    assert walltime.valid_pbs("3600") and walltime.valid_pbs("100:00:00")
    assert not walltime.valid_pbs("1:00") and not walltime.valid_pbs("01:60:00")


# ---- minutes and back ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, minutes", [
    ("00:30:00", 30), ("02:00:00", 120), ("1-00:00:00", 1440), ("1-02:03:04", 1440 + 123 + 4 / 60),
    ("30:00", 30), ("1-02", 1440 + 120),  # M:S and D-H, as Slurm and PBS read them
    ("45", 45), ("10 + 2 * 3", 16), ("max(5, 2 ** 3)", 8), ("ceil(7 / 2)", 4),
])
def test_walltime_minutes(text, minutes):
    assert walltime.minutes(text, {}) == pytest.approx(minutes)


def test_walltime_with_an_absurd_power_fails_at_once():
    with pytest.raises(UserError, match="walltime"):
        walltime.minutes("9 ** 9 ** 9", {})


@pytest.mark.parametrize("minutes, text", [(30, "00:30:00"), (16, "00:16:00"), (0.2, "00:01:00"),
                                           (90.01, "01:31:00"), (1563.07, "26:04:00")])
def test_format_minutes(minutes, text):
    assert walltime.format_minutes(minutes) == text


def test_hms_rounds_to_the_second_and_pads_hours_when_asked():
    assert walltime.hms(42.4) == "0:00:42"
    assert walltime.hms(3 * 3600 + 61.6) == "3:01:02"
    assert walltime.hms(600, 2) == "00:10:00"
    assert walltime.hms(100 * 3600, 2) == "100:00:00"
