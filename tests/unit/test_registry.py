"""The shared name → builder registry (knl_train/registry.py) that models and optimizers use."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.registry import Registry


def _registry():
    reg = Registry("widget")

    @reg.register("round")
    def round_widget(size):
        """A round widget.

        More words."""
        return ("round", size)

    reg.register("square")(lambda size: ("square", size))
    return reg


def test_register_look_up_and_list():
    reg = _registry()
    assert reg.names() == ("round", "square") and len(reg) == 2 and "round" in reg
    assert reg.lookup("round")(3) == ("round", 3) and reg["square"](2) == ("square", 2)
    assert sorted(reg) == ["round", "square"] and reg.get("hexagon") is None
    assert reg.describe() == {"round": "A round widget.", "square": ""}


def test_a_name_registers_once():
    reg = _registry()
    with pytest.raises(ValueError, match="widget 'round' is registered twice"):
        reg.register("round")(lambda size: None)
    assert reg.lookup("round")(1) == ("round", 1)


def test_unknown_name_suggests_and_lists():
    with pytest.raises(UserError, match=r"unknown widget 'rund' \(did you mean round\?\); "
                                        r"widgets: round, square"):
        _registry().lookup("rund")


def test_check_names_against_a_list_kept_elsewhere():
    reg = _registry()
    reg.check_names(("square", "round"))
    with pytest.raises(RuntimeError, match="round, square.*hexagon, round, square"):
        reg.check_names(("round", "square", "hexagon"))
