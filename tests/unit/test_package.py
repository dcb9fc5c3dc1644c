"""The package's exports (knl_train/__init__.py, optim/, data/): each resolves, and those that
need TensorFlow load it only when first used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("package", ["knl_train", "knl_train.optim", "knl_train.data"])
def test_import_alone_leaves_tensorflow_out(package):
    proc = _python(f"import sys, {package}; assert 'tensorflow' not in sys.modules, 'tensorflow'")
    assert proc.returncode == 0, proc.stderr


def test_every_export_resolves():
    import knl_train
    import knl_train.data
    import knl_train.optim
    from knl_train.models import build
    from knl_train.optim.lamb import LAMB
    from knl_train.optim.lars import LARS
    from knl_train.train.trainer import run
    for package in (knl_train, knl_train.optim, knl_train.data):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
            assert name in dir(package)
    assert (knl_train.LARS, knl_train.LAMB) == (LARS, LAMB)
    assert knl_train.build_model is build and knl_train.run_training is run
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        knl_train.nope  # noqa: B018


def test_submodules_still_import_by_name():
    proc = _python("from knl_train.optim import LARS, kernels, recipes; "
                   "from knl_train.data import folder, open_source; print(LARS.__name__)")
    assert proc.returncode == 0 and proc.stdout.strip() == "LARS", proc.stderr
