"""Convergence study specs (knl_train.studies.spec, ``kind: convergence``): every field and every
error, each naming its field, and the points: one per (optimizer, global batch, LR, repeat), with
their gradient accumulation, training overrides, ids, job names and walltimes.

The base spec (tests.support.write_convergence_spec): generic-slurm, 1 node x 2 ranks, micro-batch
64 (128 images per pass), global batches 256/1024/4096, optimizers sgd-goyal (LRs 0.1, 0.2) and
lars (LRs 2, 4), 4 epochs, target top-1 0.8, on jobs/train/demo.yaml (seed 1234, micro-batch 32).
"""

from __future__ import annotations

import re

import pytest
import yaml

from knl_train.errors import UserError
from knl_train.studies import spec as study_spec
from knl_train.studies.schedulers import pbs
from knl_train.studies.spec import OptimizerTrial, StudySpec
from tests.support import ROOT, write_convergence_spec as write_spec, write_study_spec

DEMO = ROOT / "jobs" / "train" / "demo.yaml"
LARS = {"set": {"optimizer.name": "lars"}, "lr": [2, 4]}


def load(tmp_path, drop=(), **fields):
    return study_spec.load(write_spec(tmp_path, drop, **fields))


def error(tmp_path, drop=(), **fields) -> str:
    with pytest.raises(UserError) as e:
        load(tmp_path, drop, **fields)
    return str(e.value)


def core(msg: str) -> str:
    """The message without its 'study <where>: ' and 'config: ' prefixes."""
    return re.sub(r"^study \S+: (config: )?", "", msg)


def one(lr=(1.0,), **settings) -> dict:
    """An optimizers: mapping of one optimizer, lars, with ``settings`` as its set."""
    return {"lars": {"set": {"optimizer.name": "lars", **settings}, "lr": list(lr)}}


# ---- the base spec, and fields it takes from elsewhere ---------------------------------------------
def test_base_spec_fields(tmp_path):
    study = load(tmp_path)
    spec = study.spec
    assert (spec.kind, spec.scaling, spec.nodes, spec.per_rank_batch) == ("convergence", None, (1,), 64)
    assert spec.global_batches == (256, 1024, 4096)
    assert (spec.epochs, spec.target_top1, spec.reference_batch) == (4, 0.8, None)
    assert spec.optimizers == {
        "sgd-goyal": OptimizerTrial(lr=(0.1, 0.2), set={"optimizer.name": "sgd", "schedule.scaling": "linear"}),
        "lars": OptimizerTrial(lr=(2.0, 4.0), set={"optimizer.name": "lars"})}
    assert list(spec.optimizers) == ["sgd-goyal", "lars"]          # the spec's order
    assert all(isinstance(v, float) for t in spec.optimizers.values() for v in t.lr)
    assert (spec.log_every, spec.steps, spec.global_batch, spec.array) == (None, None, None, False)
    assert (study.node.ranks_per_node, study.train_config.seed) == (2, 1234)


def test_scaling_is_not_required_but_epochs_is(tmp_path):
    assert "scaling" not in yaml.safe_load(write_spec(tmp_path).read_text())
    assert "'epochs' is required" in error(tmp_path, drop=("epochs",))


@pytest.mark.parametrize("key", ["name", "site", "nodes", "epochs"])
def test_required_fields(tmp_path, key):
    msg = error(tmp_path, drop=(key,))
    assert f"'{key}' is required" in msg and "jobs/studies/" in msg


def test_nodes_as_a_bare_integer(tmp_path):
    study = load(tmp_path, nodes=2)
    assert study.spec.nodes == (2,)
    assert {(p.nodes, p.ranks) for p in study.points} == {(2, 4)}
    # 2 nodes x 2 ranks x 64 = 256 images per pass.
    assert [p.accumulation for p in study.points[:6:2]] == [1, 4, 16]
    assert load(tmp_path, nodes=[1]).spec.nodes == (1,)


def test_per_rank_batch_from_the_training_config(tmp_path):
    """demo.yaml's per_rank_batch is 32: 2 ranks x 32 = 64 images per pass."""
    study = load(tmp_path, drop=("per_rank_batch",))
    assert study.spec.per_rank_batch is None
    assert {p.per_rank_batch for p in study.points} == {32}
    assert {p.global_batch: p.accumulation for p in study.points} == {256: 4, 1024: 16, 4096: 64}


def test_per_rank_batch_needed_somewhere(tmp_path):
    """A training config that fixes the global batch gives no micro-batch."""
    cfg = tmp_path / "train.yaml"
    data = yaml.safe_load(DEMO.read_text())
    del data["per_rank_batch"]
    cfg.write_text(yaml.safe_dump({**data, "global_batch": 256}))
    msg = error(tmp_path, drop=("per_rank_batch",), train={"config": str(cfg)})
    assert msg.startswith("per_rank_batch:") and "micro-batch" in msg and "training config" in msg


def test_target_top1_and_reference_batch_are_optional(tmp_path):
    spec = load(tmp_path, drop=("target_top1",)).spec
    assert (spec.target_top1, spec.reference_batch) == (None, None)
    spec = load(tmp_path, target_top1=1.0, reference_batch=512).spec    # any batch, not only a studied one
    assert (spec.target_top1, spec.reference_batch) == (1.0, 512)


# ---- every error names its field -------------------------------------------------------------------
@pytest.mark.parametrize("fields, drop, starts, words", [
    ({"scaling": "weak"}, (), "scaling:", ["remove scaling"]),
    ({"scaling": "strong"}, (), "scaling:", ["remove scaling"]),
    ({"nodes": [1, 2]}, (), "nodes:", ["one node count", "[1, 2]"]),
    ({"global_batch": 256}, (), "global_batch:", ["global_batches: [...]"]),
    ({"array": True, "repeats": 2}, (), "array:", ["point of its own", "remove array"]),
    ({}, ("global_batches",), "global_batches:", ["give the global batches"]),
    ({"global_batches": []}, (), "global_batches:", ["give the global batches"]),
    ({"global_batches": [1024, 256]}, (), "global_batches must be increasing", ["[1024, 256]"]),
    ({"global_batches": [256, 1024, 512]}, (), "global_batches must be increasing", ["[256, 1024, 512]"]),
    ({"global_batches": [256, 256]}, (), "global_batches must be increasing, without repeats", ["[256, 256]"]),
    ({"global_batches": [0, 256]}, (), "global_batches must be >= 1", ["[0, 256]"]),
    ({"global_batches": [-128]}, (), "global_batches must be >= 1", ["[-128]"]),
    ({"global_batches": 256}, (), "global_batches: expected a list", ["256"]),
    ({}, ("optimizers",), "optimizers:", ["give at least one"]),
    ({"optimizers": {}}, (), "optimizers:", ["give at least one"]),
    ({"optimizers": ["lars"]}, (), "optimizers: expected a mapping", ["['lars']"]),
    ({"optimizers": {"lars": [2, 4]}}, (), "optimizers.lars: expected a mapping", []),
    ({"reference_batch": 0}, (), "reference_batch must be >= 1", ["got 0"]),
    ({"reference_batch": -256}, (), "reference_batch must be >= 1", ["got -256"]),
    ({"target_top1": 1.5}, (), "target_top1 is a fraction of 1", ["got 1.5"]),
    ({"target_top1": 75}, (), "target_top1 is a fraction of 1", ["0.75 for 75 %", "got 75"]),
    ({"target_top1": 0}, (), "target_top1 is a fraction of 1", ["got 0"]),
    ({"target_top1": -0.1}, (), "target_top1 is a fraction of 1", ["got -0.1"]),
    ({"epochs": 0}, (), "epochs must be >= 1", []),
    ({"per_rank_batch": 0}, (), "per_rank_batch must be >= 1", []),
    ({"repeats": 0}, (), "repeats must be >= 1", []),
    ({"log_every": 0}, (), "log_every must be >= 1", []),
    ({"kind": "convergance", "scaling": "weak"}, (), "kind:", ["scaling", "convergence"]),
])
def test_spec_errors(tmp_path, fields, drop, starts, words):
    msg = error(tmp_path, drop, **fields)
    assert core(msg).startswith(starts), msg
    for w in words:
        assert w in msg, msg


def test_steps_refused(tmp_path):
    """A convergence study compares batches at one epoch budget: steps is refused with the reason,
    before the general 'not both'."""
    assert core(error(tmp_path, steps=100)) == "steps: a convergence study compares batches at one epoch budget: set epochs"
    assert "'epochs' is required" in error(tmp_path, drop=("epochs",), steps=100)
    with pytest.raises(ValueError, match=r"^steps: a convergence study compares batches at one epoch "
                                         r"budget: set epochs$"):
        StudySpec(name="cv", site="generic-slurm", nodes=(1,), kind="convergence", steps=100,
                  global_batches=(256,), optimizers={"lars": OptimizerTrial(lr=(1.0,))})


@pytest.mark.parametrize("label", ["1lars", "la rs", "a/b", "../up", "a" * 41, "a--b", "-lars", "lars-",
                                   "lars.v2", "lårs", 1])
def test_bad_optimizer_labels(tmp_path, label):
    msg = core(error(tmp_path, optimizers={label: {"lr": [1]}}))
    assert msg.startswith(f"optimizers: label {str(label)!r} must be a letter then letters, digits, _ or single -")
    assert "(at most 40)" in msg and "names directories and jobs" in msg


@pytest.mark.parametrize("label", ["a", "lars", "sgd-goyal", "LAMB_v2", "a-b-c", "a" * 40])
def test_good_optimizer_labels(tmp_path, label):
    study = load(tmp_path, optimizers={label: {"lr": [1]}})
    assert [p.optimizer for p in study.points] == [label] * 3
    assert study.points[0].id == f"{label}-b000256-lr1-r0"


@pytest.mark.parametrize("lr, starts, words", [
    (None, "config field 'optimizers.lars.lr' is required", []),
    ([], "optimizers.lars: lr: give at least one peak learning rate", []),
    ([-1], "optimizers.lars: lr: every learning rate must be a number > 0", ["got [-1.0]"]),
    ([0], "optimizers.lars: lr: every learning rate must be a number > 0", ["got [0.0]"]),
    ([0.1, 0.0], "optimizers.lars: lr: every learning rate must be a number > 0", ["got [0.1, 0.0]"]),
    ([float("nan")], "optimizers.lars: lr: every learning rate must be a number > 0", ["nan"]),
    ([float("inf")], "optimizers.lars: lr: every learning rate must be a number > 0", ["inf"]),
    ([1, 1.0], "optimizers.lars: lr: [1.0, 1.0] repeats a value", []),
    ([2, 4, 2], "optimizers.lars: lr: [2.0, 4.0, 2.0] repeats a value", []),
    # Distinct numbers that a point id (6 significant digits) would write alike.
    ([0.1000001, 0.1000002], "optimizers.lars: lr: [0.1000001, 0.1000002] repeats a value", []),
    (0.1, "optimizers.lars.lr: expected a list", ["0.1"]),
    ("0.1, 0.2", "optimizers.lars.lr: expected a list", []),
    ([True], "optimizers.lars.lr[0]: expected a number", ["True"]),
    (["fast"], "optimizers.lars.lr[0]:", ["fast"]),
])
def test_lr_errors(tmp_path, lr, starts, words):
    trial = {"set": {"optimizer.name": "lars"}} if lr is None else {"set": {"optimizer.name": "lars"}, "lr": lr}
    msg = core(error(tmp_path, optimizers={"lars": trial}))
    assert msg.startswith(starts), msg
    for w in words:
        assert w in msg, msg


def test_lr_written_as_yaml_exponent(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string; the LR list still takes it as a number."""
    path = write_spec(tmp_path, optimizers={"lars": {"lr": "LRS"}})
    path.write_text(path.read_text().replace("lr: LRS", "lr: [1e-3, 2.5e-2]"))
    study = study_spec.load(path)
    assert study.spec.optimizers["lars"].lr == (0.001, 0.025)
    assert [p.id for p in study.points][:2] == ["lars-b000256-lr0.001-r0", "lars-b000256-lr0.025-r0"]
    assert study.points[0].overrides[-1] == "schedule.peak_lr=0.001"


def test_unknown_key_in_an_optimizer(tmp_path):
    msg = core(error(tmp_path, optimizers={"lars": {**LARS, "momentum": 0.9}}))
    assert msg == "unknown config field 'optimizers.lars.momentum'; allowed in optimizers.lars: lr, set"


@pytest.mark.parametrize("settings, words", [
    ({"optimizer.foo": 1}, ["unknown config field 'optimizer.foo'", "allowed in optimizer:", "momentum"]),
    ({"optimizer.name": "adam"}, ["optimizer.name: 'adam' is not allowed", "lars, lamb, sgd"]),
    ({"schedule.scaling": "quadratic"}, ["schedule.scaling: 'quadratic' is not allowed", "linear"]),
    ({"optimizer.momentum": "high"}, ["optimizer.momentum"]),
])
def test_bad_optimizer_set_is_named(tmp_path, settings, words):
    msg = error(tmp_path, optimizers={"sgd": {"set": {"optimizer.name": "sgd"}, "lr": [0.1]},
                                      "lars": {"set": settings, "lr": [2]}})
    assert msg.startswith("study cv: optimizers.lars.set: "), msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("value", ["optimizer.name=lars", ["optimizer.name=lars"]])
def test_optimizer_set_must_be_a_mapping(tmp_path, value):
    msg = core(error(tmp_path, optimizers={"lars": {"set": value, "lr": [2]}}))
    assert msg == "optimizers.lars: set must be a mapping of dotted config keys to values"


PER_POINT = {"global_batch": 512, "per_rank_batch": 32, "epochs": 2, "steps": 10,
             "horovod.backward_passes_per_step": 2, "schedule.peak_lr": 1.0, "schedule.reference_batch": 256}


def test_the_per_point_keys():
    assert set(study_spec.PER_POINT) == set(PER_POINT)


@pytest.mark.parametrize("key", sorted(PER_POINT))
def test_per_point_key_in_an_optimizer_set(tmp_path, key):
    msg = core(error(tmp_path, optimizers=one(**{key: PER_POINT[key]})))
    assert msg == f"optimizers.lars.set: {key} is set per point by the study (lr: and global_batches:); remove it"


@pytest.mark.parametrize("key", sorted(PER_POINT))
def test_per_point_key_in_train_set(tmp_path, key):
    msg = core(error(tmp_path, train={"config": str(DEMO), "set": {key: PER_POINT[key]}}))
    assert msg == f"train.set: {key} is set per point by the study; remove it"


# ---- global batches the ranks and micro-batch cannot make ------------------------------------------
@pytest.mark.parametrize("fields, batch, per_pass", [
    ({"global_batches": [256, 320]}, 320, 128),
    ({"global_batches": [64, 256]}, 64, 128),                      # less than one pass
    ({"global_batches": [256, 384], "nodes": 2}, 384, 256),        # 2 nodes x 2 ranks x 64
    ({"global_batches": [256, 1000], "per_rank_batch": 50}, 256, 100),
])
def test_batch_not_made_exactly(tmp_path, fields, batch, per_pass):
    nodes = fields.get("nodes", 1)
    micro = fields.get("per_rank_batch", 64)
    msg = error(tmp_path, **fields)
    assert msg == (f"global_batches: {batch} cannot be made of {nodes} node(s) x 2 ranks x per_rank_batch "
                   f"{micro} = {per_pass} images per pass, accumulated; use multiples of {per_pass}")


# ---- a scaling study keeps its fields --------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("global_batches", [256, 1024]), ("optimizers", {"lars": {"lr": [2]}}), ("target_top1", 0.75),
    ("reference_batch", 256), ("target_top1", 0), ("reference_batch", 0),
])
def test_scaling_study_refuses_convergence_fields(tmp_path, name, value):
    with pytest.raises(UserError) as e:
        study_spec.load(write_study_spec(tmp_path, **{name: value}))
    assert core(str(e.value)) == (f"{name} belongs to a convergence study: set kind: convergence, "
                                  f"or remove {name}")


def test_scaling_study_still_needs_scaling(tmp_path):
    with pytest.raises(UserError, match="'scaling' is required"):
        study_spec.load(write_study_spec(tmp_path, drop=("scaling",)))
    with pytest.raises(ValueError, match=r"^scaling is required: weak or strong \(or set kind: convergence\)$"):
        StudySpec(name="t", site="skx-2s", nodes=(1,))


def test_scaling_points_carry_no_convergence_fields(tmp_path):
    study = study_spec.load(write_study_spec(tmp_path, kind="scaling"))
    assert study.spec.kind == "scaling" and study.spec.optimizers == {} and study.spec.global_batches == ()
    for p in study.points:
        assert (p.optimizer, p.lr, p.repeat, p.accumulation) == (None, None, None, 1)
        assert p.overrides == (f"per_rank_batch={p.per_rank_batch}", "steps=20")
        assert p.job_name == f"t_n{p.nodes}"


# ---- points ----------------------------------------------------------------------------------------
def test_points_count_order_and_ids(tmp_path):
    study = load(tmp_path)
    assert [p.id for p in study.points] == [
        "sgd-goyal-b000256-lr0.1-r0", "sgd-goyal-b000256-lr0.2-r0",
        "sgd-goyal-b001024-lr0.1-r0", "sgd-goyal-b001024-lr0.2-r0",
        "sgd-goyal-b004096-lr0.1-r0", "sgd-goyal-b004096-lr0.2-r0",
        "lars-b000256-lr2-r0", "lars-b000256-lr4-r0",
        "lars-b001024-lr2-r0", "lars-b001024-lr4-r0",
        "lars-b004096-lr2-r0", "lars-b004096-lr4-r0"]
    assert [p.directory for p in study.points][-1] == "points/lars-b004096-lr4-r0"
    assert [(p.optimizer, p.global_batch, p.lr, p.repeat) for p in study.points[6:8]] == [
        ("lars", 256, 2.0, 0), ("lars", 256, 4.0, 0)]


def test_point_count_is_the_product(tmp_path):
    """Per optimizer: batches x its LRs x repeats; sgd 4 x 3 x 3, lars 4 x 2 x 3."""
    study = load(tmp_path, repeats=3, global_batches=[128, 256, 1024, 4096],
                 optimizers={"sgd": {"set": {"optimizer.name": "sgd"}, "lr": [0.05, 0.1, 0.2]},
                             "lars": LARS})
    assert len(study.points) == 4 * 3 * 3 + 4 * 2 * 3 == 60
    assert len({p.id for p in study.points}) == 60
    # Repeats innermost, then LRs, then batches, then optimizers.
    assert [p.id for p in study.points[:4]] == ["sgd-b000128-lr0.05-r0", "sgd-b000128-lr0.05-r1",
                                                "sgd-b000128-lr0.05-r2", "sgd-b000128-lr0.1-r0"]
    assert study.points[36].id == "lars-b000128-lr2-r0" and study.points[-1].id == "lars-b004096-lr4-r2"
    assert [p.repeat for p in study.points[:6]] == [0, 1, 2, 0, 1, 2]


def test_point_shapes_and_accumulation(tmp_path):
    """k = G / (ranks x micro-batch): 256, 1024, 4096 over 2 ranks x 64."""
    study = load(tmp_path)
    for p in study.points:
        assert (p.nodes, p.ranks_per_node, p.ranks, p.per_rank_batch) == (1, 2, 2, 64)
        assert (p.steps, p.epochs) == (None, 4)
        assert p.accumulation == p.global_batch // (2 * 64)
        assert p.cores_per_rank == 24 and p.cpus_per_task == 48            # the generic preset's node
    assert {p.global_batch: p.accumulation for p in study.points} == {256: 2, 1024: 8, 4096: 32}


def test_point_overrides(tmp_path):
    study = load(tmp_path)
    by_id = {p.id: p for p in study.points}
    assert by_id["lars-b004096-lr2-r0"].overrides == (
        "optimizer.name=lars", "global_batch=4096", "horovod.backward_passes_per_step=32", "epochs=4",
        "schedule.reference_batch=256", "schedule.peak_lr=2.0")
    assert by_id["sgd-goyal-b000256-lr0.2-r0"].overrides == (
        "optimizer.name=sgd", "schedule.scaling=linear", "global_batch=256",
        "horovod.backward_passes_per_step=2", "epochs=4", "schedule.reference_batch=256", "schedule.peak_lr=0.2")


def test_overrides_follow_the_optimizer_set_in_order(tmp_path):
    """The optimizer's set first, in its own order, as YAML scalars; then the per-point settings."""
    study = load(tmp_path, optimizers=one(lr=[0.5], **{"optimizer.exclude_from_weight_decay": ["bn", "bias"],
                                                        "optimizer.momentum": 0.95,
                                                        "schedule.warmup_epochs": 2}))
    assert study.points[0].overrides == (
        "optimizer.name=lars", "optimizer.exclude_from_weight_decay=[bn, bias]", "optimizer.momentum=0.95",
        "schedule.warmup_epochs=2", "global_batch=256", "horovod.backward_passes_per_step=2", "epochs=4",
        "schedule.reference_batch=256", "schedule.peak_lr=0.5")


def test_reference_batch_from_the_spec(tmp_path):
    study = load(tmp_path, reference_batch=1024)
    assert {p.overrides[-2] for p in study.points} == {"schedule.reference_batch=1024"}
    default = load(tmp_path, global_batches=[1024, 4096])          # the smallest batch
    assert {p.overrides[-2] for p in default.points} == {"schedule.reference_batch=1024"}


def test_repeats_get_seeds_of_their_own(tmp_path):
    """demo.yaml's seed is 1234: repeat r > 0 trains with seed 1234 + r; repeat 0 with the config's."""
    study = load(tmp_path, repeats=3)
    seeds = {p.id: [o for o in p.overrides if o.startswith("seed=")] for p in study.points}
    assert seeds["lars-b001024-lr4-r0"] == []
    assert seeds["lars-b001024-lr4-r1"] == ["seed=1235"] and seeds["lars-b001024-lr4-r2"] == ["seed=1236"]
    assert all(p.overrides[-1] == f"seed={1234 + p.repeat}" for p in study.points if p.repeat)


def test_repeat_seeds_start_from_the_optimizer_or_train_set(tmp_path):
    study = load(tmp_path, repeats=2, optimizers=one(seed=7),
                 train={"config": str(DEMO), "set": {"seed": 100}})
    r0, r1 = study.points[:2]
    assert r0.overrides[:2] == ("optimizer.name=lars", "seed=7") and r0.overrides[-1] == "schedule.peak_lr=1.0"
    assert r1.overrides[-1] == "seed=8"
    study = load(tmp_path, repeats=2, train={"config": str(DEMO), "set": {"seed": 100}})
    assert study.train_config.seed == 100 and study.points[1].overrides[-1] == "seed=101"


def test_walltime_formula_over_accumulation_and_batch(tmp_path):
    study = load(tmp_path, walltime="10 + accumulation * global_batch / 1024")
    # 256: 10 + 2 x 0.25 = 10.5 -> 11 min; 1024: 10 + 8 = 18; 4096: 10 + 32 x 4 = 138.
    assert {p.global_batch: p.walltime for p in study.points} == {256: "00:11:00", 1024: "00:18:00",
                                                                  4096: "02:18:00"}
    study = load(tmp_path, walltime="epochs * accumulation + ranks + nodes + per_rank_batch + repeats")
    assert {p.global_batch: p.walltime for p in study.points} == {256: "01:16:00", 1024: "01:40:00",
                                                                  4096: "03:16:00"}
    assert {p.walltime for p in load(tmp_path).points} == {"00:30:00"}


def test_walltime_formula_error_lists_accumulation(tmp_path):
    msg = error(tmp_path, walltime="10 + speed")
    assert msg.startswith("walltime '10 + speed'") and "accumulation" in msg and "global_batch" in msg


def test_job_names_unique_and_pbs_safe(tmp_path):
    study = load(tmp_path, site="generic-pbs", name="large-batch-convergence-mini", repeats=2)
    names = [p.job_name for p in study.points]
    assert len(names) == 24 and len(set(names)) == 24
    for name in names:
        assert len(name) <= 15 and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name), name
        assert pbs.rule_job_name(f"#PBS -N {name}\n") == []
    assert names[0] == "large_batch_p1" and names[-1] == "large_batch_p24"


def test_job_names_slurm(tmp_path):
    study = load(tmp_path)
    assert [p.job_name for p in study.points] == [f"cv_p{i}" for i in range(1, 13)]
    assert study_spec.job_name("9 lives", "p7", "pbs") == "s9_lives_p7"
    assert study_spec.job_name("cv", 4, "pbs") == "cv_n4"          # a node count, as before


def test_queue_and_constraints_per_point(tmp_path):
    """stampede2-knl picks its queue per point by walltime: the longest points leave development."""
    study = load(tmp_path, site="stampede2-knl", walltime="20 + accumulation * 4")
    # 28, 52 and 148 minutes; development takes at most 02:00:00.
    assert {p.global_batch: p.queue for p in study.points} == {256: "development", 1024: "development",
                                                               4096: "normal"}
    assert {p.walltime for p in study.points if p.global_batch == 4096} == {"02:28:00"}
