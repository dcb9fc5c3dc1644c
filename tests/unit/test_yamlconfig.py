"""YAML configs (knl_train/yamlconfig.py): ``--set`` overrides applied to the parsed mapping."""

from __future__ import annotations

from knl_train import yamlconfig


def test_apply_overrides_does_not_mutate_its_input():
    data = {"optimizer": {"momentum": 0.9}}
    out = yamlconfig.apply_overrides(data, ["optimizer.momentum=0.5", "a.b.c=1"])
    assert data == {"optimizer": {"momentum": 0.9}}
    assert out == {"optimizer": {"momentum": 0.5}, "a": {"b": {"c": 1}}}
