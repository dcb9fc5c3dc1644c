"""Training configs (knl_train/train/config.py): YAML + ``--set`` overrides into frozen, validated
dataclasses; recipes, schedule kinds, scaling and the newer sections."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from knl_train.errors import UserError
from knl_train.train import config as train_config
from knl_train.train.config import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from tests.support import ROOT

DEMO = ROOT / "jobs" / "train" / "demo.yaml"


def test_demo_job_loads_with_its_values():
    cfg = train_config.load(str(DEMO))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model == "small_cnn"
    assert cfg.data == DataConfig(path="data/demo", format="folder", image_size=32, threads=1)
    assert cfg.optimizer.name == "lars" and cfg.optimizer.variant == "you"
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 0.0005
    assert cfg.optimizer.trust_coefficient == 0.001
    assert cfg.schedule.peak_lr == 8.0 and cfg.schedule.power == 2.0
    # YAML ints become floats where the field is a float.
    assert isinstance(cfg.schedule.warmup_epochs, float) and cfg.schedule.warmup_epochs == 1.0
    assert cfg.per_rank_batch == 32 and cfg.global_batch is None
    assert (cfg.epochs, cfg.seed, cfg.run_dir, cfg.log_every) == (5, 1234, "runs/demo", 10)


def test_no_file_gives_the_defaults():
    assert train_config.load(None) == TrainConfig()
    assert train_config.load(None).optimizer == OptimizerConfig()


def test_overrides_nested_keys_with_yaml_typed_values():
    cfg = train_config.load(str(DEMO), [
        "optimizer.momentum=0.95", "optimizer.nesterov=true", "schedule.peak_lr=3",
        "data.path=/data/imagenet", "data.image_size=224", "epochs=90", "run_dir=runs/x",
    ])
    assert cfg.optimizer.momentum == 0.95
    assert cfg.optimizer.nesterov is True
    assert cfg.schedule.peak_lr == 3.0 and isinstance(cfg.schedule.peak_lr, float)
    assert cfg.data.path == "/data/imagenet" and cfg.data.image_size == 224
    assert cfg.epochs == 90 and cfg.run_dir == "runs/x"
    # Untouched siblings of an overridden field keep their file values.
    assert cfg.optimizer.weight_decay == 0.0005 and cfg.data.threads == 1
    assert cfg.schedule.power == 2.0


def test_later_override_wins_and_value_may_contain_equals():
    cfg = train_config.load(None, ["epochs=2", "epochs=3", "run_dir=runs/a=b"])
    assert cfg.epochs == 3 and cfg.run_dir == "runs/a=b"


def test_list_override_becomes_a_tuple():
    cfg = train_config.load(None, ["optimizer.exclude_from_weight_decay=[bn, bias]",
                                   "optimizer.exclude_from_layer_adaptation=[]"])
    assert cfg.optimizer.exclude_from_weight_decay == ("bn", "bias")
    assert cfg.optimizer.exclude_from_layer_adaptation == ()
    assert train_config.load(None, ["optimizer.exclude_from_weight_decay=null"]) \
        .optimizer.exclude_from_weight_decay is None


@pytest.mark.parametrize("override, needle", [
    ("data.image_size=big", "data.image_size: expected an integer, got 'big'"),
    ("epochs=2.5", "epochs: expected an integer, got 2.5"),
    ("epochs=true", "epochs: expected an integer, got True"),
    ("optimizer.momentum=fast", "optimizer.momentum: expected a number, got 'fast'"),
    ("optimizer.nesterov=1", "optimizer.nesterov: expected true or false, got 1"),
    ("optimizer.exclude_from_weight_decay=bn", "optimizer.exclude_from_weight_decay: expected a list"),
    ("optimizer.exclude_from_weight_decay=[bn, [x]]", "optimizer.exclude_from_weight_decay[1]: expected a string"),
    ("schedule.decay_over=never", "schedule.decay_over: 'never' is not allowed; choose one of after_warmup, global"),
    ("optimizer=0.9", "optimizer: expected a mapping, got float"),
    ("model=[a]", "model: expected a string"),
])
def test_type_errors_name_the_dotted_field(override, needle):
    with pytest.raises(UserError) as e:
        train_config.load(None, [override])
    assert needle in str(e.value)


def test_unknown_field_lists_the_allowed_ones():
    with pytest.raises(UserError) as e:
        train_config.load(None, ["optimizer.momentom=0.9"])
    msg = str(e.value)
    assert "'optimizer.momentom'" in msg
    assert "momentum" in msg and "weight_decay" in msg and "trust_coefficient" in msg
    with pytest.raises(UserError, match="unknown config field 'epoch'; allowed in the top level: .*epochs"):
        train_config.load(None, ["epoch=3"])


def test_override_without_equals_is_an_error():
    with pytest.raises(UserError, match="expected key=value"):
        train_config.load(None, ["epochs"])


@pytest.mark.parametrize("override, needle", [
    ("epochs=0", "epochs must be > 0, got 0"),
    ("data.threads=-1", "data: threads must be >= 0"),
    ("schedule.peak_lr=0", "schedule: peak_lr must be > 0"),
    ("schedule.warmup_epochs=-1", "warmup_epochs must be >= 0"),
    ("global_batch=-8", "global_batch must be > 0, got -8"),
])
def test_value_checks_are_user_errors(override, needle):
    with pytest.raises(UserError, match=needle):
        train_config.load(None, [override])


def test_configs_are_frozen():
    cfg = train_config.load(str(DEMO))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.momentum = 0.0
    assert cfg.epochs == 5 and cfg.optimizer.momentum == 0.9


def test_global_and_per_rank_batch_together_is_an_error():
    with pytest.raises(UserError, match="set global_batch or per_rank_batch, not both"):
        train_config.load(str(DEMO), ["global_batch=256"])  # demo.yaml sets per_rank_batch
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(global_batch=64, per_rank_batch=8)


@pytest.mark.parametrize("kwargs, world, expected", [
    ({}, 1, (32, 32)),
    ({}, 4, (128, 32)),
    ({"per_rank_batch": 8}, 2, (16, 8)),
    ({"per_rank_batch": 8}, 6, (48, 8)),
    ({"global_batch": 96}, 1, (96, 96)),
    ({"global_batch": 96}, 4, (96, 24)),
    ({"global_batch": 96}, 96, (96, 1)),
])
def test_batch_sizes(kwargs, world, expected):
    assert TrainConfig(**kwargs).batch_sizes(world) == expected


def test_non_divisible_global_batch_names_both_numbers():
    with pytest.raises(ValueError) as e:
        TrainConfig(global_batch=100).batch_sizes(3)
    msg = str(e.value)
    assert "global_batch 100" in msg and "3 ranks" in msg and "multiple of 3" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=f"config file {tmp_path / 'nope.yaml'} does not exist"):
        train_config.load(str(tmp_path / "nope.yaml"))


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer: {momentum: 0.9\nepochs: [\n")
    with pytest.raises(UserError, match=f"config file {path} is not valid YAML"):
        train_config.load(str(path))


@pytest.mark.parametrize("text", ["- epochs\n- 3\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="the top level must be a mapping"):
        train_config.load(str(path))


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert train_config.load(str(path)) == TrainConfig()


def test_hash_is_stable_and_tracks_every_field():
    a = train_config.load(str(DEMO))
    b = train_config.load(str(DEMO))
    assert a.hash() == b.hash()
    assert len(a.hash()) == 16 and int(a.hash(), 16) >= 0
    # It hashes the field values, not object identity: an equal config built by hand agrees,
    # and so does another interpreter (with another PYTHONHASHSEED).
    assert a.hash() == TrainConfig(
        data=DataConfig(path="data/demo", threads=1),
        optimizer=OptimizerConfig(momentum=0.9, weight_decay=0.0005),
        schedule=ScheduleConfig(peak_lr=8.0, warmup_epochs=1.0, power=2.0),
        per_rank_batch=32, epochs=5, seed=1234, run_dir="runs/demo", log_every=10).hash()
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from knl_train.train import config as c; "
                               "print(c.load(sys.argv[1]).hash())", str(DEMO)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == a.hash()
    changed = {train_config.load(str(DEMO), [o]).hash() for o in
               ("epochs=6", "optimizer.momentum=0.91", "schedule.end_lr=0.1", "data.threads=2",
                "optimizer.exclude_from_weight_decay=[bn]")}
    assert len(changed) == 5 and a.hash() not in changed


# ---- recipes, schedule kinds, scaling, momentum correction -----------------------------------
def test_recipe_fills_in_what_yaml_and_set_leave_open(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("recipe: alexnet_bn_32k_intel_32nodes\nepochs: 3\n")
    cfg = train_config.load(str(cfg_file), ["schedule.end_lr=0.5"])
    assert cfg.recipe == "alexnet_bn_32k_intel_32nodes"
    assert cfg.schedule.peak_lr == 33.0 and cfg.schedule.warmup_epochs == 10.0
    assert cfg.schedule.decay_over == "global" and cfg.schedule.warmup_start_lr == 1.0
    assert cfg.optimizer.weight_decay == 0.0005 and cfg.optimizer.momentum_correction is True
    assert cfg.global_batch == 32768
    assert cfg.epochs == 3                      # YAML beats the recipe's 100
    assert cfg.schedule.end_lr == 0.5           # --set beats both


def test_a_batch_setting_replaces_the_recipe_batch():
    cfg = train_config.load(None, ["recipe=alexnet_bn_32k_intel_32nodes", "per_rank_batch=16"])
    assert cfg.global_batch is None and cfg.per_rank_batch == 16


def test_unknown_recipe_lists_the_names():
    with pytest.raises(UserError, match="alexnet_bn_32k_intel_32nodes"):
        train_config.load(None, ["recipe=alexnet_bn_1m"])


def test_schedule_kinds_and_scaling_fields():
    cfg = train_config.load(None, ["schedule.kind=step", "schedule.reference_batch=256",
                                   "schedule.scaling=linear", "schedule.boundary_epochs=[30, 60]"])
    assert cfg.schedule.kind == "step" and cfg.schedule.boundary_epochs == (30.0, 60.0)
    with pytest.raises(UserError, match="schedule.kind"):
        train_config.load(None, ["schedule.kind=exp"])
    with pytest.raises(UserError, match="schedule.scaling"):
        train_config.load(None, ["schedule.scaling=cubic"])
    with pytest.raises(UserError, match="reference_batch"):
        train_config.load(None, ["schedule.reference_batch=0"])


@pytest.mark.parametrize("overrides", [["optimizer.momentum_correction=true", "optimizer.variant=tf_contrib"],
                                       ["optimizer.momentum_correction=true", "optimizer.name=lamb"]])
def test_momentum_correction_needs_lr_inside_momentum(overrides):
    with pytest.raises(UserError, match="momentum_correction"):
        train_config.load(None, overrides)


def test_exponent_notation_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-5 as a string; in a float field it is the number users meant.
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  weight_decay: 5e-5\n")
    cfg = train_config.load(str(path), ["schedule.peak_lr=1e12"])
    assert cfg.optimizer.weight_decay == 5e-5 and cfg.schedule.peak_lr == 1e12
    with pytest.raises(UserError, match="schedule.peak_lr: expected a number, got 'fast'"):
        train_config.load(None, ["schedule.peak_lr=fast"])


def test_new_sections_load_and_validate():
    cfg = train_config.load(None, ["steps=500", "precision=mixed_bf16", "horovod.compression=fp16",
                                   "horovod.backward_passes_per_step=4", "checkpoint.every_minutes=30",
                                   "eval.every_epochs=5", "threads.intra_op=16", "guard.every=50"])
    assert (cfg.steps, cfg.precision, cfg.guard.every) == (500, "mixed_bf16", 50)
    assert cfg.horovod.backward_passes_per_step == 4 and cfg.checkpoint.every_minutes == 30.0
    assert cfg.batch_sizes(8) == (32 * 8 * 4, 32)
    with pytest.raises(UserError, match=r"precision: 'fp16' is not allowed; choose one of fp32, mixed_bf16"):
        train_config.load(None, ["precision=fp16"])
    with pytest.raises(UserError, match="backward_passes_per_step must be > 0"):
        train_config.load(None, ["horovod.backward_passes_per_step=0"])
    with pytest.raises(ValueError, match=r"not divisible by the 8 ranks x 4 accumulated micro-batches; "
                                         r"use a multiple of 32"):
        train_config.load(None, ["global_batch=1000", "horovod.backward_passes_per_step=4"]).batch_sizes(8)


def test_steps_in_the_config_replace_a_recipes_epochs():
    cfg = train_config.load(None, ["recipe=resnet50_32k_tpu", "steps=100"])
    assert cfg.steps == 100


def test_guard_section_defaults_validates_and_names_the_old_field():
    cfg = train_config.load(None, [])
    assert (cfg.guard.every, cfg.guard.stall_seconds) == (20, 120.0)
    assert train_config.load(None, ["guard.stall_seconds=null"]).guard.stall_seconds is None
    assert train_config.load(None, ["guard.stall_seconds=7.5"]).guard.stall_seconds == 7.5
    with pytest.raises(UserError, match=r"guard: stall_seconds must be > 0 \(null turns stall "
                                        r"detection off\), got 0"):
        train_config.load(None, ["guard.stall_seconds=0"])
    with pytest.raises(UserError, match=r"guard: every must be > 0"):
        train_config.load(None, ["guard.every=0"])
    with pytest.raises(UserError, match=r"^config field 'guard_every' is now 'guard.every' "):
        train_config.load(None, ["guard_every=10"])
