"""The convergence report's charts: written as PNGs, whole epochs on the curves' axis even for one
epoch, no empty panel, nothing drawn (matplotlib not even loaded) when a chart would be empty."""

from __future__ import annotations

import sys

import pytest

from knl_train.studies import accuracy as acc
from knl_train.studies import accuracy_charts as charts
from knl_train.studies import accuracy_report as ar
from tests.unit.studies.test_accuracy import point, save_manifest, study, write_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_pngs_are_written(tmp_path):
    root = study(tmp_path)
    paths = ar.report(root)
    assert set(paths) == {"results", "csv", "md", "png", "curves"}
    for key, name in (("png", "convergence.png"), ("curves", "convergence-curves.png")):
        assert paths[key] == root / "report" / name
        data = paths[key].read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    assert not list((root / "report").glob(".*"))     # no temporary file left behind


def test_without_matplotlib_skips_the_pngs(tmp_path, monkeypatch):
    root = study(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not available") as w:
        paths = ar.report(root)
    assert str(root / "report" / "convergence-curves.png") in str(w[0].message)
    assert set(paths) == {"results", "csv", "md"}
    assert not (root / "report" / "convergence.png").exists()


def _drawn(monkeypatch) -> list:
    """What each saved figure shows: per axes its title, x limits and x ticks in view, and the
    figure's own texts."""
    seen = []

    def save(fig, path):
        fig.canvas.draw()
        axes = []
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            axes.append((ax.get_title(), (lo, hi), [t for t in ax.get_xticks() if lo <= t <= hi]))
        seen.append((path.name, axes, [t.get_text() for t in fig.texts]))
    monkeypatch.setattr(charts, "save_figure_atomic", save)
    return seen


def test_one_epoch_has_whole_epoch_ticks_and_an_optimizer_without_curves_no_panel(
        tmp_path, monkeypatch):
    root = tmp_path / "s"
    pts = [point("lars", 256, 1.0), point("lars", 512, 1.0), point("sgd", 256, 0.1, state="failed")]
    write_run(root / pts[0].run_dirs[0], 256, [0.5])
    write_run(root / pts[1].run_dirs[0], 512, [0.45])
    (root / pts[2].run_dirs[0]).mkdir(parents=True)     # started, failed before its first epoch
    save_manifest(root, pts, epochs=1)
    seen = _drawn(monkeypatch)
    results = acc.collect(root)
    assert charts.curves_chart(results, tmp_path / "curves.png") is True
    ((name, axes, texts),) = seen
    assert name == "curves.png"
    assert axes == [("lb-test: lars", (0.5, 1.5), [1.0])]
    assert texts == ["no curves (no epoch evaluated): sgd"]


def test_several_epochs_have_integer_ticks(tmp_path, monkeypatch):
    seen = _drawn(monkeypatch)
    charts.curves_chart(acc.collect(study(tmp_path)), tmp_path / "curves.png")
    ((_, axes, texts),) = seen
    assert [a[0] for a in axes] == ["lb-test: lars", "lb-test: sgd-goyal"]
    for _, (lo, hi), ticks in axes:
        assert (lo, hi) == (0.5, 4.5) and ticks and all(t == int(t) for t in ticks)
    assert texts == []


def test_empty_charts_are_not_drawn_and_need_no_matplotlib(tmp_path, monkeypatch):
    root = tmp_path / "s"
    p = point("lars", 256, 1.0, state="failed")
    (root / p.run_dirs[0]).mkdir(parents=True)
    save_manifest(root, [p])
    results = acc.collect(root)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert charts.chart(results, acc.table(results), tmp_path / "a.png") is False
    assert charts.curves_chart(results, tmp_path / "b.png") is False
    assert list(tmp_path.glob("*.png")) == []
