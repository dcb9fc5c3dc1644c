"""Load-time checks of a study against its site and its training config (issue 16): the model
name, queue names, the preset's CPU family against the site's node, a zero walltime. Each is an
error at render time, one line naming the bad thing, where before every job would have failed
(or run without a limit)."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.studies import spec as study_spec
from tests.support import ROOT, run_cli, write_convergence_spec, write_study_spec as write_spec

TRAIN = str(ROOT / "jobs" / "train" / "resnet50-synthetic.yaml")


def load(tmp_path, **fields):
    return study_spec.load(write_spec(tmp_path, **fields))


def error(tmp_path, **fields) -> str:
    with pytest.raises(UserError) as e:
        load(tmp_path, **fields)
    return str(e.value)


# ---- the training config's model ------------------------------------------------------------------
def test_model_typo_in_train_set_is_an_error_with_a_suggestion(tmp_path):
    msg = error(tmp_path, train={"config": TRAIN, "set": {"model": "resnet05"}})
    assert msg == ("study t: training config: unknown model 'resnet05' (did you mean resnet50?); "
                   "models: alexnet, alexnet_bn, resnet20, resnet50, resnet50_v1_5, resnet50_v2, "
                   "small_cnn")


def test_model_typo_in_the_train_file_is_an_error(tmp_path):
    (tmp_path / "train.yaml").write_text("model: smal_cnn\nper_rank_batch: 8\n")
    msg = error(tmp_path, train={"config": "train.yaml"})
    assert msg.startswith("study t: training config: unknown model 'smal_cnn' (did you mean small_cnn?)")
    (tmp_path / "train.yaml").write_text("model: small_cnn\nper_rank_batch: 8\n")
    assert load(tmp_path, train={"config": "train.yaml"}).train_config.model == "small_cnn"


def test_model_typo_in_an_optimizers_set_names_that_optimizer(tmp_path):
    path = write_convergence_spec(tmp_path, optimizers={
        "lars": {"set": {"optimizer.name": "lars", "model": "resnet_50"}, "lr": [2]}})
    with pytest.raises(UserError) as e:
        study_spec.load(path)
    assert str(e.value).startswith("study cv: optimizers.lars.set: unknown model 'resnet_50' "
                                   "(did you mean resnet50?)")


def test_model_names_load_without_tensorflow():
    import subprocess
    import sys
    code = ("import sys; from knl_train.models.model_names import MODEL_NAMES; "
            "assert 'tensorflow' not in sys.modules; print(' '.join(MODEL_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    # The registry checks the same list when it first loads the networks (test_registry.py).
    assert out.stdout.split() == ["alexnet", "alexnet_bn", "resnet20", "resnet50", "resnet50_v1_5",
                                  "resnet50_v2", "small_cnn"]


# ---- queue names --------------------------------------------------------------------------------
def test_unknown_queue_is_an_error_listing_the_sites_queues(tmp_path):
    msg = error(tmp_path, site="stampede2-knl", queue="normall")
    assert msg == ("queue normall: site stampede2-knl has no such queue (did you mean normal?); its "
                   "queues: development, normal, large, flat-quadrant (or drop queue to let the site pick)")
    assert [p.queue for p in load(tmp_path, site="stampede2-knl", queue="normal").points] == ["normal"] * 2


def test_queue_on_a_site_without_queues_is_passed_on_with_a_note(tmp_path):
    study = load(tmp_path, site="generic-pbs", queue="workq")
    assert [p.queue for p in study.points] == ["workq", "workq"]
    assert study.notes[0] == ("queue workq is passed on unchecked: site generic-pbs lists no queues "
                              "(list them under queues: in a copy of the site profile to have them checked)")
    assert not any("queue" in n for n in load(tmp_path, site="generic-pbs").notes)


# ---- the preset's CPU against the site's node -------------------------------------------------------
def test_knl_preset_on_the_generic_slurm_site_is_an_error(tmp_path):
    # The case: a 48-core, 2-socket "KNL" rank planned with only a socket warning.
    msg = error(tmp_path, site="generic-slurm", preset="knl-7250")
    assert msg == ("preset knl-7250 is for Intel Xeon Phi 7250 (KNL), but site generic-slurm's node "
                   "(2 sockets x 24 cores x 2 threads) names no CPU family: its preset is generic "
                   "(use preset generic, or a site profile whose preset names the node's CPU); or set "
                   "allow_preset_mismatch: true in the study to plan knl-7250's rules on this node anyway")


@pytest.mark.parametrize("site, preset, node, right", [
    ("skx-2s", "knl-7250", "Intel(R) Xeon(R) Platinum 8160 CPU @ 2.10GHz (2 sockets x 24 cores x 2 threads)",
     "skx-8160"),
    ("cori-knl", "skx-8160", "Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz (1 socket x 68 cores x 4 threads)",
     "knl-7250"),
    ("stampede2-knl", "epyc", "Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz (1 socket x 68 cores x 4 threads)",
     "knl-7250"),
])
def test_preset_for_another_cpu_names_both_and_the_right_preset(tmp_path, site, preset, node, right):
    msg = error(tmp_path, site=site, preset=preset)
    assert msg.startswith(f"preset {preset} is for ")
    assert f"but site {site}'s node is {node} (use preset {right}); or set allow_preset_mismatch: true" in msg


def test_presets_of_the_sites_cpu_family_fit(tmp_path):
    assert load(tmp_path, site="skx-2s", preset="skx-8160").node.preset.name == "skx-8160"
    # A preset that names no CPU (generic) fits any node (one that gives its counts).
    generic = load(tmp_path, site="generic-slurm", preset="generic")
    assert generic.node.preset.name == "generic" and generic.notes == ()
    # The Cascade Lake preset's flags are a subset of Ice Lake's: the same family, it fits.
    (tmp_path / "icx.yaml").write_text("title: ICX\nscheduler: slurm\nlauncher: srun\npreset: icx-8380\n")
    assert load(tmp_path, site="icx.yaml", preset="clx").node.preset.name == "clx"


def test_allow_preset_mismatch_plans_it_with_a_note(tmp_path):
    study = load(tmp_path, site="generic-slurm", preset="knl-7250", allow_preset_mismatch=True)
    assert study.node.preset.name == "knl-7250"
    assert study.notes[0].startswith("allow_preset_mismatch: preset knl-7250 is for Intel Xeon Phi "
                                     "7250 (KNL), but site generic-slurm's node (2 sockets x 24 cores")
    assert study.spec.allow_preset_mismatch is True
    assert "allow_preset_mismatch" in error(tmp_path, allow_preset_mismatch="yes please")


def test_detected_node_is_compared_with_the_chosen_preset(tmp_path):
    from knl_train.studies import sites
    from knl_train.tuning import preset as presets, topology
    site = sites.load(str(ROOT / "tests" / "fixtures" / "studies" / "ci-slurm.yaml"))
    here = topology.detect()
    # A preset for a CPU this host is not (the KNL one, or on a KNL the EPYC one).
    other = presets.load("epyc" if here.is_knl else "knl-7250")
    assert not other.matches(here)
    why = sites.preset_mismatch(site, other, here)
    assert why == (f"preset {other.name} is for {other.title.split(', ')[0]}, but site {site.name}'s "
                   f"node is a {here.model_name} (use preset {presets.detect(here).name})")
    assert sites.preset_mismatch(site, presets.detect(here), here) is None


# ---- walltime ------------------------------------------------------------------------------------
def test_zero_walltime_is_an_error_at_load(tmp_path):
    assert error(tmp_path, walltime="00:00:00") == ("walltime '00:00:00' is zero: give the time a "
                                                    "point needs, e.g. 00:30:00")


def test_a_200000_term_walltime_is_one_line(tmp_path):
    msg = error(tmp_path, walltime="+".join(["1"] * 200_000))
    assert msg.startswith("walltime '1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+... (399,999 characters)': "
                          "a formula of 399,999 characters is too long (at most 500)")


# ---- through the CLI: one line, rc 2, nothing written ------------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"train": {"config": TRAIN, "set": {"model": "resnet05"}}}, "unknown model 'resnet05' (did you mean resnet50?)"),
    ({"site": "stampede2-knl", "queue": "normall"}, "queue normall: site stampede2-knl has no such queue"),
    ({"site": "generic-slurm", "preset": "knl-7250"}, "allow_preset_mismatch: true"),
    ({"walltime": "00:00:00"}, "walltime '00:00:00' is zero"),
    ({"walltime": "+".join(["1"] * 200_000)}, "too long (at most 500)"),
])
def test_cli_render_refuses_in_one_line(tmp_path, fields, words):
    out = tmp_path / "study"
    proc = run_cli("study", "render", write_spec(tmp_path, **fields), "--out", out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knl-train: error:") and words in lines[0]
    assert not out.exists()
