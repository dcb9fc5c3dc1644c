"""Study spec (knl_train.studies.spec): validation before anything is written, points, queues,
job names and walltimes per point. The walltime parser itself is tested in test_walltime.py."""

from __future__ import annotations

import re

import pytest

from knl_train.errors import UserError
from knl_train.studies import spec as study_spec
from knl_train.studies.schedulers import pbs
from tests.support import ROOT, run_cli, write_study_spec as write_spec

TRAIN = ROOT / "jobs" / "train" / "resnet50-synthetic.yaml"
STUDIES = ROOT / "jobs" / "studies"
SITES = ("cori-knl", "generic-pbs", "generic-slurm", "skx-2s", "stampede2-knl")


def load(tmp_path, drop=(), **fields):
    return study_spec.load(write_spec(tmp_path, drop, **fields))


def error(tmp_path, drop=(), **fields) -> str:
    with pytest.raises(UserError) as e:
        load(tmp_path, drop, **fields)
    return str(e.value)


# ---- required fields and the nodes list ----------------------------------------------------------
@pytest.mark.parametrize("key", ["name", "site", "nodes", "scaling"])
def test_required_fields(tmp_path, key):
    msg = error(tmp_path, drop=(key,))
    assert f"'{key}' is required" in msg


@pytest.mark.parametrize("nodes", [[2, 1], [1, 1, 2], [4, 2, 8]])
def test_nodes_must_increase(tmp_path, nodes):
    msg = error(tmp_path, nodes=nodes)
    assert "nodes must be increasing" in msg and str(nodes) in msg


def test_nodes_at_least_one(tmp_path):
    assert "nodes must be >= 1" in error(tmp_path, nodes=[0, 1])


def test_geometric_nodes(tmp_path):
    study = load(tmp_path, nodes={"start": 1, "factor": 2, "max": 2048})
    assert study.spec.nodes == tuple(2 ** k for k in range(12))
    assert [p.nodes for p in study.points] == [2 ** k for k in range(12)]
    assert [p.id for p in study.points][:2] == ["n0001", "n0002"] and study.points[-1].id == "n2048"
    assert load(tmp_path, nodes={"start": 3, "factor": 3, "max": 100}).spec.nodes == (3, 9, 27, 81)


@pytest.mark.parametrize("nodes, words", [
    ({"start": 1, "factor": 1, "max": 8}, "factor >= 2"),
    ({"start": 1, "factor": 2}, "max: 2048"),
    ({"start": 1, "max": 8, "step": 2}, "unknown key step"),
    ({"start": 16, "max": 8}, "max >= start"),
])
def test_geometric_nodes_errors(tmp_path, nodes, words):
    msg = error(tmp_path, nodes=nodes)
    assert msg.startswith("nodes:") and words in msg


# ---- batch sizes per point ----------------------------------------------------------------------
def test_weak_refuses_global_batch(tmp_path):
    msg = error(tmp_path, global_batch=64)
    assert "global_batch" in msg and "per_rank_batch" in msg and "weak" in msg


def test_strong_refuses_per_rank_batch(tmp_path):
    msg = error(tmp_path, scaling="strong", per_rank_batch=8)
    assert "per_rank_batch" in msg and "global_batch" in msg and "strong" in msg


def test_strong_global_batch_not_divisible(tmp_path):
    """skx-2s runs 2 ranks per node: 100 divides over 2 and 4 ranks but not 8 (4 nodes)."""
    nodes = [1, 2, 4]
    msg = error(tmp_path, scaling="strong", global_batch=100, nodes=nodes)
    assert "global_batch 100" in msg and "4 nodes" in msg and "= 8" in msg
    hint = int(re.search(r"e\.g\. (\d+)", msg).group(1))
    assert all(hint % (n * 2) == 0 for n in nodes)
    # The suggestion is taken: it renders.
    assert load(tmp_path, scaling="strong", global_batch=hint, nodes=nodes).points[-1].per_rank_batch == hint // 8


def test_batches_weak_and_strong(tmp_path):
    weak = load(tmp_path, per_rank_batch=16, nodes=[1, 4])
    assert [(p.ranks, p.per_rank_batch, p.global_batch) for p in weak.points] == [(2, 16, 32), (8, 16, 128)]
    strong = load(tmp_path, scaling="strong", global_batch=1024, nodes=[1, 4])
    assert [(p.ranks, p.per_rank_batch, p.global_batch) for p in strong.points] == [(2, 512, 1024), (8, 128, 1024)]
    # Without per_rank_batch, weak scaling takes the training config's (32).
    assert load(tmp_path).points[0].per_rank_batch == 32


def test_warmup_must_be_fewer_than_steps(tmp_path):
    msg = error(tmp_path, steps=20, warmup_steps=20)
    assert "warmup_steps (20)" in msg and "steps (20)" in msg
    assert load(tmp_path, steps=20, warmup_steps=19).spec.warmup_steps == 19


def test_array_needs_repeats(tmp_path):
    msg = error(tmp_path, array=True, repeats=1)
    assert "array" in msg and "repeats >= 2" in msg
    assert load(tmp_path, array=True, repeats=2).spec.array


# ---- names: sites, presets, fields -------------------------------------------------------------
def test_unknown_site_lists_sites_and_suggests(tmp_path):
    msg = error(tmp_path, site="skx-2")
    assert "unknown site 'skx-2'" in msg and "did you mean skx-2s?" in msg
    assert all(s in msg for s in SITES)
    assert "did you mean cori-knl?" in error(tmp_path, site="cori")


def test_unknown_preset(tmp_path):
    msg = error(tmp_path, preset="nosuch")
    assert "unknown preset 'nosuch'" in msg and "skx-8160" in msg and "knl-7250" in msg


def test_unknown_field_lists_allowed(tmp_path):
    msg = error(tmp_path, nodez=[1])
    assert "unknown config field 'nodez'" in msg
    for allowed in ("nodes", "scaling", "walltime", "warmup_steps", "per_rank_batch", "templates"):
        assert allowed in msg


def test_training_config_error_is_named(tmp_path):
    msg = error(tmp_path, train={"config": str(TRAIN), "set": {"optimizer.name": "adam"}})
    assert "training config" in msg and "optimizer.name" in msg and "'adam'" in msg


def test_memory_mode_needs_a_knl_site(tmp_path):
    msg = error(tmp_path, memory_mode="flat")
    assert "memory_mode flat" in msg and "skx-2s" in msg


# ---- directive safety -----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("account", "x; rm -rf ~"),
    ("queue", "debug queue"),
    ("qos", "a$(id)"),
    ("constraints", ['knl,"quad']),
])
def test_unsafe_directive_values_refused(tmp_path, field, value):
    msg = error(tmp_path, **{field: value})
    assert f"{field}:" in msg and "cannot carry safely" in msg


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "   ", ""])
def test_name_must_be_one_printable_line(tmp_path, name):
    assert "name must be 1-200 printable characters on one line" in error(tmp_path, name=name)


# ---- job names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alexnet-bn-pbs-weak", "a-very-long-study-name-for-pbs-indeed",
                                  "9lives", "2048-nodes", "___", 'a"; rm -rf ~; "', "ünïcode"])
def test_pbs_job_names(name):
    for nodes in (1, 16, 512, 2048, 99999):
        job = study_spec.job_name(name, nodes, "pbs")
        assert len(job) <= 15 and job[0].isascii() and job[0].isalpha(), job
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", job) and job.endswith(f"_n{nodes}")


def test_job_names_examples():
    assert study_spec.job_name("alexnet-bn-pbs-weak", 1, "pbs") == "alexnet_bn_p_n1"
    assert study_spec.job_name("alexnet-bn-pbs-weak", 2048, "pbs") == "alexnet_b_n2048"
    assert study_spec.job_name("9lives", 4, "pbs") == "s9lives_n4"
    assert study_spec.job_name("9lives", 4, "slurm") == "s9lives_n4"
    assert study_spec.job_name('a"; rm -rf ~; "', 2, "slurm") == "a_rm_rf_n2"


def test_pbs_points_of_a_long_name_pass_the_checker(tmp_path):
    study = load(tmp_path, site="generic-pbs", name="9-a-very-long-study-name",
                 nodes={"start": 1, "max": 2048})
    for p in study.points:
        assert len(p.job_name) <= 15 and p.job_name[0].isalpha()
        assert pbs.rule_job_name(f"#PBS -N {p.job_name}\n") == []


# ---- queues and KNL modes ------------------------------------------------------------------------
def test_stampede2_queue_by_node_count(tmp_path):
    study = load(tmp_path, site="stampede2-knl", nodes=[1, 16, 17, 256, 257, 2048])
    assert [p.queue for p in study.points] == ["development", "development", "normal", "normal",
                                               "large", "large"]
    assert study.memory_mode == "cache"


def test_stampede2_development_only_for_short_jobs(tmp_path):
    study = load(tmp_path, site="stampede2-knl", nodes=[1], walltime="03:00:00")
    assert study.points[0].queue == "normal"


def test_stampede2_flat_mode(tmp_path):
    study = load(tmp_path, site="stampede2-knl", memory_mode="flat", nodes=[1, 24])
    assert [p.queue for p in study.points] == ["flat-quadrant", "flat-quadrant"]
    msg = error(tmp_path, site="stampede2-knl", memory_mode="flat", nodes=[1, 32])
    assert "32-node point" in msg and "flat mode" in msg
    for q in ("development", "normal", "large", "flat-quadrant"):
        assert q in msg


def test_stampede2_fixed_queue_that_does_not_fit(tmp_path):
    msg = error(tmp_path, site="stampede2-knl", queue="development", nodes=[1, 32])
    assert "queue development" in msg and "at most 16 nodes" in msg and "32-node point" in msg


def test_cori_constraints_by_mode(tmp_path):
    cache = load(tmp_path, site="cori-knl")
    assert cache.points[0].constraints == ("knl", "quad", "cache") and cache.node.numactl == ()
    flat = load(tmp_path, site="cori-knl", memory_mode="flat")
    assert flat.points[0].constraints == ("knl", "quad", "flat")
    assert flat.node.numactl == ("numactl", "--preferred=1")
    # A constraints string is split at commas; the spec's constraints replace the site's.
    own = load(tmp_path, site="cori-knl", constraints="knl,quad,cache,hbm")
    assert own.points[0].constraints == ("knl", "quad", "cache", "hbm")


# ---- walltime per point ------------------------------------------------------------------------------
def test_walltime_in_points(tmp_path):
    assert [p.walltime for p in load(tmp_path).points] == ["00:30:00", "00:30:00"]
    assert load(tmp_path, walltime="10 + repeats * 2", repeats=3).points[0].walltime == "00:16:00"
    # An array task runs one repeat: the formula sees repeats = 1.
    assert load(tmp_path, walltime="10 + repeats * 2", repeats=3, array=True).points[0].walltime == "00:12:00"
    per_node = load(tmp_path, walltime="5 + nodes", nodes=[1, 8])
    assert [p.walltime for p in per_node.points] == ["00:06:00", "00:13:00"]
    assert load(tmp_path, walltime="1-02:03:04").points[0].walltime == "26:04:00"


@pytest.mark.parametrize("formula, words", [
    ("10 + bogus", "unknown name 'bogus'"),
    ('__import__("os")', "only numbers, the variables"),
    ("().__class__", "only numbers, the variables"),
    ("5 - 10", "must be > 0"),
    ("1 / 0", "division by zero"),
    ("10 +", "walltime '10 +'"),
])
def test_walltime_errors(tmp_path, formula, words):
    msg = error(tmp_path, walltime=formula)
    assert msg.startswith(f"walltime {formula!r}") and words in msg
    if "unknown name" in words:
        assert "nodes" in msg and "repeats" in msg    # the variables it may use


# ---- the example studies ---------------------------------------------------------------------------------
def test_example_studies_load():
    knl = study_spec.load(STUDIES / "resnet50-knl-weak.yaml")
    assert [p.nodes for p in knl.points] == [2 ** k for k in range(12)]
    assert knl.points[-1].global_batch == 32768 and knl.node.ranks_per_node == 1
    skx = study_spec.load(STUDIES / "resnet50-skx-strong.yaml")
    assert {p.global_batch for p in skx.points} == {1024} and skx.points[-1].per_rank_batch == 8
    assert (skx.node.ranks_per_node, skx.node.cpus_per_task) == (2, 48)
    alex = study_spec.load(STUDIES / "alexnet-bn-pbs-weak.yaml")
    assert [p.nodes for p in alex.points] == [2 ** k for k in range(10)]
    assert {p.per_rank_batch for p in alex.points} == {128} and alex.points[0].queue == "workq"


# ---- through the CLI: a clean error, rc 2, nothing written ------------------------------------------------
@pytest.mark.parametrize("fields, drop, words", [
    ({}, ("scaling",), "'scaling' is required"),
    ({"nodes": [4, 2]}, (), "nodes must be increasing"),
    ({"scaling": "strong", "global_batch": 100, "nodes": [1, 2, 4]}, (), "does not divide over 4 nodes"),
    ({"site": "skx-2"}, (), "did you mean skx-2s?"),
    ({"walltime": '__import__("os")'}, (), "walltime"),
    ({"account": "x; rm -rf ~"}, (), "account:"),
    ({"constraints": ['knl"']}, (), "constraints:"),
    ({"train": {"config": str(TRAIN), "set": {"optimizer.name": "adam"}}}, (), "optimizer.name"),
])
def test_cli_spec_errors(tmp_path, fields, drop, words):
    path = write_spec(tmp_path, drop, **fields)
    out = tmp_path / "study"
    proc = run_cli("study", "render", path, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("knl-train: error:") and "Traceback" not in proc.stderr
    assert words in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
