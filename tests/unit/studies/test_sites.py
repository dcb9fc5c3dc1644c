"""Site profiles (knl_train.studies.sites): a queue's walltime limit checked at load, and whether
a preset is for the CPU of the site's node (preset_mismatch)."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.studies import sites
from knl_train.tuning import preset as presets

SITE = "title: t\nscheduler: slurm\nlauncher: srun\n"


def write_site(tmp_path, text: str):
    path = tmp_path / "site.yaml"
    path.write_text(SITE + text)
    return str(path)


@pytest.mark.parametrize("limit, words", [
    ("00:00:00", "walltime '00:00:00' is zero"),
    ("two hours", "walltime 'two hours'"),
])
def test_queue_walltime_limit_is_checked_at_load(tmp_path, limit, words):
    with pytest.raises(UserError) as e:
        sites.load(write_site(tmp_path, f"queues:\n  - {{name: q, max_walltime: '{limit}'}}\n"))
    assert "queue q: max_walltime:" in str(e.value) and words in str(e.value)
    ok = sites.load(write_site(tmp_path, "queues:\n  - {name: q, max_walltime: '02:00:00'}\n"))
    assert ok.queue("q").max_walltime == "02:00:00" and ok.queue("r") is None


def test_preset_mismatch_on_nominal_sites():
    knl, skx, generic = (presets.load(n) for n in ("knl-7250", "skx-8160", "generic"))
    cori, skx_site, slurm = (sites.load(n) for n in ("cori-knl", "skx-2s", "generic-slurm"))
    # The site's own preset, and a generic one, always fit.
    assert sites.preset_mismatch(cori, knl, None) is None
    assert sites.preset_mismatch(cori, generic, None) is None
    assert sites.preset_mismatch(slurm, generic, None) is None
    assert sites.preset_mismatch(skx_site, knl, None) == (
        "preset knl-7250 is for Intel Xeon Phi 7250 (KNL), but site skx-2s's node is Intel(R) Xeon(R) "
        "Platinum 8160 CPU @ 2.10GHz (2 sockets x 24 cores x 2 threads) (use preset skx-8160)")
    # A node whose site names no CPU family fits only a preset that names none either.
    assert sites.preset_mismatch(slurm, skx, None) == (
        "preset skx-8160 is for 2-socket Intel Xeon Platinum 8160 (Skylake-SP), but site generic-slurm's "
        "node (2 sockets x 24 cores x 2 threads) names no CPU family: its preset is generic (use preset "
        "generic, or a site profile whose preset names the node's CPU)")


def test_site_preset_auto_or_missing_cannot_judge(tmp_path):
    auto = sites.load(write_site(tmp_path, "preset: auto\n"))
    assert sites.preset_mismatch(auto, presets.load("knl-7250"), None) is None
    gone = sites.load(write_site(tmp_path, "preset: nowhere.yaml\n"))
    assert sites.preset_mismatch(gone, presets.load("knl-7250"), None) is None
