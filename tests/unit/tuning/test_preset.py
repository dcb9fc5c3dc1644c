"""Presets (knl_train/tuning/preset.py, presets/*.yaml): one cited preset per CPU family, chosen
from the detected CPU, named when unknown, validated and round-tripped through YAML."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.tuning import preset, snapshot as snapshots
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"


def snap(name):
    return snapshots.load(SNAPSHOTS / f"{name}.json")


def test_every_family_the_issue_names_has_a_cited_preset():
    assert set(preset.names()) == {"knl-7250", "skx-8160", "clx", "icx-8380", "spr-8480", "epyc",
                                   "generic"}
    for p in preset.builtin():
        assert p.sources, f"{p.name} cites no source"
        assert p.title


@pytest.mark.parametrize("snapshot, expected", [
    ("knl-7250-quad-cache", "knl-7250"), ("knl-7250-quad-flat", "knl-7250"),
    ("skx-8160-2s", "skx-8160"), ("icx-8380-2s", "icx-8380"), ("spr-8480-2s", "spr-8480"),
    ("epyc-7763-2s", "epyc"), ("this-machine", "spr-8480"),
])
def test_the_preset_is_chosen_from_the_detected_cpu(snapshot, expected):
    assert preset.detect(snap(snapshot)).name == expected


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError) as e:
        preset.load("knl-7520")
    msg = str(e.value)
    assert "unknown preset 'knl-7520'" in msg and "did you mean knl-7250" in msg
    assert all(n in msg for n in preset.names())


def test_a_bad_preset_file_names_the_field(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\ntitle: y\nsettings: {spare_cores: -1}\n")
    with pytest.raises(UserError, match="spare_cores must be >= 0"):
        preset.load(str(f))
    f.write_text("name: x\ntitle: y\nlayouts: [{ranks_per_node: 2, threads_per_cor: 2}]\n")
    with pytest.raises(UserError, match="unknown config field 'layouts\\[0\\].threads_per_cor'"):
        preset.load(str(f))
    with pytest.raises(UserError, match="preset file .*missing.yaml does not exist"):
        preset.load(str(tmp_path / "missing.yaml"))


def test_a_preset_round_trips_through_its_yaml(tmp_path):
    for p in preset.builtin():
        preset.dump(p, tmp_path / f"{p.name}.yaml")
        back = preset.load(str(tmp_path / f"{p.name}.yaml"))
        assert back.settings == p.settings and back.layouts == p.layouts
        assert back.node == p.node and back.match == p.match and back.sources == p.sources
