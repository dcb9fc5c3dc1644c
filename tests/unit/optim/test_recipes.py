"""Published recipes (knl_train/optim/recipes.py + recipes.yaml): every number against the
reference notes (lars.md §1, §2.4-§2.6, §5; seeds.md §1, §3), the schedules they build (through
``to_config_dict``, as the trainer gets them), lookup and errors."""

from __future__ import annotations

import configparser
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.optim import recipes
from knl_train.optim.scaling import scale_schedule
from knl_train.optim.schedules import (WarmupMomentumCorrection, WarmupPolyDecay, build_lr_schedule,
                                       build_momentum)
from tests.support import ROOT


def lrs(schedule, steps):
    return schedule(tf.constant(steps, tf.int64)).numpy().astype(np.float64)


def recipe_schedule(name, steps_per_epoch, epochs=None):
    """(LR schedule, momentum) of recipe ``name`` as the trainer builds them: from the recipe's
    config values (``to_config_dict``) through the schedule builders. Durations are the
    recipe's epochs (or ``epochs``): ``round(warmup_epochs · steps_per_epoch)`` warmup steps of
    ``round(epochs · steps_per_epoch)``; at the published iterations per epoch (e.g. 40 for the
    4,000-iteration AlexNet-BN 32K runs) these are the published iteration counts."""
    values = recipes.get(name).to_config_dict()
    schedule = dict(values["schedule"])
    lr = build_lr_schedule(schedule.pop("kind"), steps_per_epoch=steps_per_epoch,
                           epochs=values["epochs"] if epochs is None else epochs, **schedule)
    optimizer = values["optimizer"]
    return lr, build_momentum(optimizer["momentum"], lr, optimizer["momentum_correction"])


# name: (global_batch, epochs, peak_lr, warmup_epochs, warmup_start_lr, end_lr, power, decay_over,
#        momentum, weight_decay, trust_coefficient, epsilon, variant, momentum_correction,
#        label_smoothing, iterations (warmup, total))
EXPECTED = {
    # lars.md §5 table + §2.6; seeds.md §1
    "alexnet_bn_8k_nvcaffe": (8192, 100, 10.0, 100 * 600 / 15600, 1.0, 0.0, 2.0, "global",
                              0.9, 5e-4, 1e-3, 0.0, "you", False, None, (600, 15600)),
    "alexnet_bn_16k_nvcaffe": (16384, 100, 24.0, 100 * 400 / 7800, 1.0, 0.0, 2.0, "global",
                               0.9, 5e-4, 1e-3, 0.0, "you", False, None, (400, 7800)),
    "alexnet_bn_32k_nvcaffe": (32768, 100, 32.0, 10.0, 1.0, 0.0, 2.0, "global",
                               0.9, 5e-4, 1e-3, 0.0, "you", False, None, (400, 4000)),
    "alexnet_bn_32k_intel_32nodes": (32768, 100, 33.0, 10.0, 1.0, 0.0, 2.0, "global",
                                     0.9, 5e-4, 1e-3, 0.0, "you", True, None, (400, 4000)),
    "alexnet_bn_32k_intel_64nodes": (32768, 100, 32.0, 10.0, 1.0, 0.0, 2.0, "global",
                                     0.9, 5e-4, 1e-3, 0.0, "you", True, None, (400, 4000)),
    # lars.md §2.4 / §5 (Google TPU lars_util + contrib LARS), §2.5 (MLPerf TF2 reference)
    "resnet50_lt16k_tpu": (None, 90, 10.0, 5.0, 0.0, 1e-4, 2.0, "after_warmup",
                           0.9, 1e-4, 1e-3, 0.0, "tf_contrib", False, 0.1, None),
    "resnet50_16k_32k_tpu": (None, 90, 25.0, 5.0, 0.0, 1e-4, 2.0, "after_warmup",
                             0.9, 1e-4, 1e-3, 0.0, "tf_contrib", False, 0.1, None),
    "resnet50_32k_tpu": (32768, 91, 32.0, 14.0, 0.0, 1e-4, 2.0, "after_warmup",
                         0.9, 1e-4, 1e-3, 0.0, "tf_contrib", False, 0.1, (None, 3558)),
    "resnet50_32k_mlperf_v06": (None, 90, 33.0, 25.0, 0.0, 1e-4, 2.0, "after_warmup",
                                0.9, 1e-4, 1e-3, 0.0, "tf_contrib", False, None, None),
    "resnet50_32k_mlperf_v07_tf2": (None, 90, 31.2, 25.0, 0.0, 1e-4, 2.0, "after_warmup",
                                    0.9, 1e-4, 1e-3, 1e-7, "you", False, None, None),
    # lars.md §5 (NUS README table) and its LEGW extrapolations
    "resnet50_512_nus": (512, 90, 2 ** 2, 10 / 2 ** 6, 0.0, 0.0, 2.0, "after_warmup",
                         0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    "resnet50_1k_nus": (1024, 90, 2 ** 2.5, 10 / 2 ** 5, 0.0, 0.0, 2.0, "after_warmup",
                        0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    "resnet50_4k_nus": (4096, 90, 2 ** 3.5, 10 / 2 ** 3, 0.0, 0.0, 2.0, "after_warmup",
                        0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    "resnet50_8k_nus": (8192, 90, 16.0, 2.5, 0.0, 0.0, 2.0, "after_warmup",
                        0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    "resnet50_16k_nus_legw": (16384, 90, 2 ** 4.5, 5.0, 0.0, 0.0, 2.0, "after_warmup",
                              0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    "resnet50_32k_nus_legw": (32768, 90, 32.0, 10.0, 0.0, 0.0, 2.0, "after_warmup",
                              0.9, 1e-4, 1e-3, 1e-5, "you", False, 0.1, None),
    # seeds.md §3 (sara-nl/caffe resnet50_448nodes solver.prototxt)
    "resnet50_14k_codreanu_448nodes": (14336, 90, 4.8, 5.0, 0.1, 0.0, 1.0, "global",
                                       0.9, 5e-5, None, 0.0, None, True, None, (446, 8040)),
}


def test_names_lists_every_recipe_sorted():
    assert recipes.names() == tuple(sorted(EXPECTED))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_numbers_match_the_reference(name):
    r = recipes.get(name)
    (batch, epochs, peak, warmup, start, end, power, decay_over, momentum, wd, eta, eps, variant,
     correction, smoothing, iterations) = EXPECTED[name]
    s, o = r.schedule, r.optimizer
    assert (r.global_batch, r.epochs) == (batch, epochs)
    assert s.kind == "poly" and s.decay_over == decay_over
    assert s.peak_lr == pytest.approx(peak, rel=1e-12)
    assert s.warmup_epochs == pytest.approx(warmup, rel=1e-12)
    assert (s.warmup_start_lr, s.end_lr, s.power) == (start, end, power)
    assert (o.momentum, o.weight_decay, o.trust_coefficient, o.epsilon) == (momentum, wd, eta, eps)
    assert (o.variant, o.momentum_correction) == (variant, correction)
    assert o.name == ("sgd" if variant is None else "lars")
    assert r.label_smoothing == smoothing
    got_iters = None if r.iterations is None else (r.iterations.warmup, r.iterations.total)
    assert got_iters == iterations


def test_model_and_exclusions():
    for name in recipes.names():
        r = recipes.get(name)
        assert r.model == ("alexnet_bn" if name.startswith("alexnet") else "resnet50")
        if name.startswith("alexnet"):  # Caffe: no skip list, biases get LARS and weight decay
            assert r.optimizer.exclude_from_weight_decay == ()
            assert r.optimizer.exclude_from_layer_adaptation == ()
        elif r.optimizer.name == "lars":  # Google / MLPerf / NUS skip BN and biases
            assert r.optimizer.exclude_from_layer_adaptation == ("@rank<=1",)
            assert r.optimizer.exclude_from_weight_decay == ("@rank<=1",)


def test_reported_accuracies():
    top1 = {n: recipes.get(n).reported_top1 for n in recipes.names()}
    assert {n: v for n, v in top1.items() if v is not None} == {
        "resnet50_512_nus": 77.02, "resnet50_1k_nus": 76.96, "resnet50_4k_nus": 77.38,
        "resnet50_8k_nus": 77.14, "resnet50_14k_codreanu_448nodes": 75.6}


# ---- the 32K AlexNet-BN recipe (Intel Caffe) ----------------------------------------------------------------
def test_alexnet_bn_32k_base_lr_33_on_32_nodes_32_elsewhere():
    assert recipes.get("alexnet_bn_32k_intel_32nodes").schedule.peak_lr == 33.0
    assert recipes.get("alexnet_bn_32k_intel_64nodes").schedule.peak_lr == 32.0
    assert recipes.get("alexnet_bn_32k_nvcaffe").schedule.peak_lr == 32.0


def test_alexnet_bn_32k_intel_schedule_drops_to_26_73_after_warmup():
    # 4,000 iterations = 100 epochs: 40 iterations per epoch.
    s, m = recipe_schedule("alexnet_bn_32k_intel_32nodes", steps_per_epoch=40)
    assert isinstance(s, WarmupPolyDecay)
    assert (s.total_steps, s.warmup_steps, s.power, s.decay_over) == (4000, 400, 2.0, "global")
    # lars.md §5: iter 0 -> 1.0, 200 -> 17.0, 399 -> 32.92, 400 -> 26.73, 2000 -> 8.25.
    np.testing.assert_allclose(lrs(s, [0, 200, 399, 400, 2000, 4000]),
                               [1.0, 17.0, 32.92, 26.73, 8.25, 0.0], rtol=1e-6, atol=1e-7)
    assert isinstance(m, WarmupMomentumCorrection) and m.warmup_steps == 400
    np.testing.assert_allclose(lrs(m, [0, 1, 399, 400]), [0.9, 0.972, 0.9 * 32.92 / 32.84, 0.9],
                               rtol=1e-6)


@pytest.mark.parametrize("name, spe", [
    ("alexnet_bn_8k_nvcaffe", 156), ("alexnet_bn_16k_nvcaffe", 78), ("alexnet_bn_32k_nvcaffe", 40),
    ("alexnet_bn_32k_intel_64nodes", 40),
])
def test_published_iterations_at_the_published_steps_per_epoch(name, spe):
    r = recipes.get(name)
    s, _ = recipe_schedule(name, steps_per_epoch=spe)
    assert (s.warmup_steps, s.total_steps) == (r.iterations.warmup, r.iterations.total)
    assert lrs(s, [0])[0] == pytest.approx(1.0) and lrs(s, [s.warmup_steps - 1])[0] < r.schedule.peak_lr


def test_derived_warmup_is_marked_inferred():
    assert "schedule.warmup_epochs" in recipes.get("alexnet_bn_8k_nvcaffe").inferred
    assert "schedule.warmup_epochs" not in recipes.get("alexnet_bn_32k_intel_32nodes").inferred
    assert recipes.get("alexnet_bn_32k_intel_32nodes").inferred == ()


# ---- ResNet-50 schedules against the values lars.md computes from the reference code ---------------------------
def test_tpu_32k_recipe_against_lars_md_example():
    """lars.md §2.4: tensorflow/tpu, B=32768, 3558 steps, plr 32, 14 epochs (w_steps 547).

    Google counts the warmup in float epochs and decays over T = train_steps − w_steps + 1 steps;
    WarmupPolyDecay counts integer steps and decays over train_steps − w_steps: within 0.07%
    except in the last 20% of training, and 1e-4 instead of 1.04e-4 at the last step.
    """
    r = recipes.get("resnet50_32k_tpu")
    s = WarmupPolyDecay(peak_lr=r.schedule.peak_lr, total_steps=r.iterations.total,
                        warmup_steps=547, warmup_start_lr=r.schedule.warmup_start_lr,
                        end_lr=r.schedule.end_lr, power=r.schedule.power,
                        decay_over=r.schedule.decay_over)
    steps = [1, 100, 547, 548, 1000, 2000]
    ref = [0.058461, 5.846099, 31.978159, 31.978755, 23.098360, 8.573062]
    np.testing.assert_allclose(lrs(s, steps), ref, rtol=7e-4)
    np.testing.assert_allclose(lrs(s, [3000, 3558]), [1.102305, 0.000104], rtol=5e-3, atol=5e-6)
    assert r.epochs == round(3558 * 32768 / 1281167)


def test_mlperf_v07_recipe_against_lars_md_example():
    """lars.md §2.5: B=32768, 90 epochs, 39 steps/epoch, warmup 975 steps, decay over 2536."""
    s, _ = recipe_schedule("resnet50_32k_mlperf_v07_tf2", steps_per_epoch=39)
    assert (s.warmup_steps, s.total_steps) == (975, 3510)
    np.testing.assert_allclose(lrs(s, [487, 975, 976]), [15.584, 31.2, 31.175399], rtol=1e-6)
    np.testing.assert_allclose(lrs(s, [1500, 3000]), [19.619189, 1.266866], rtol=4e-3)
    assert lrs(s, [3510])[0] == pytest.approx(0.000105, abs=6e-6)


def test_nus_recipes_follow_legw_from_512():
    base = recipes.get("resnet50_512_nus")
    for name in ("resnet50_1k_nus", "resnet50_4k_nus", "resnet50_8k_nus", "resnet50_16k_nus_legw",
                 "resnet50_32k_nus_legw"):
        r = recipes.get(name)
        want = scale_schedule(base.schedule.peak_lr, base.schedule.warmup_epochs,
                              base.global_batch, r.global_batch, rule="sqrt", warmup_rule="legw")
        assert r.schedule.peak_lr == pytest.approx(want.peak_lr, rel=1e-12), name
        assert r.schedule.warmup_epochs == pytest.approx(want.warmup_epochs, rel=1e-12), name
    for name in ("resnet50_16k_nus_legw", "resnet50_32k_nus_legw"):  # extrapolated, not published
        assert {"schedule.peak_lr", "schedule.warmup_epochs"} <= set(recipes.get(name).inferred)


def test_codreanu_schedule():
    s, m = recipe_schedule("resnet50_14k_codreanu_448nodes", steps_per_epoch=100)
    assert (s.warmup_steps, s.total_steps, s.power) == (500, 9000, 1.0)
    # 0.1 -> 4.8 in 5 epochs, then linear over the global step: 4.8·(1 − 5/90) right after.
    np.testing.assert_allclose(lrs(s, [0, 250, 500, 4500]),
                               [0.1, 2.45, 4.8 * 85 / 90, 2.4], rtol=1e-6)
    assert isinstance(m, WarmupMomentumCorrection)
    assert recipe_schedule("resnet50_8k_nus", steps_per_epoch=100)[1] == 0.9


# ---- lookup, selection, config dict -------------------------------------------------------------------------
def test_unknown_name_lists_the_names():
    with pytest.raises(recipes.RecipeError) as info:
        recipes.get("alexnet_bn_32k")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    msg = str(info.value)
    assert "unknown recipe 'alexnet_bn_32k'" in msg and "did you mean" in msg
    for name in recipes.names():
        assert name in msg


def test_recipes_are_frozen():
    r = recipes.get("resnet50_8k_nus")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epochs = 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.schedule.peak_lr = 1.0
    assert recipes.get("resnet50_8k_nus").schedule.peak_lr == 16.0


def test_every_recipe_cites_its_source():
    for name in recipes.names():
        r = recipes.get(name)
        assert ":" in r.source and ("lars.md" in r.source or "seeds.md" in r.source), name
        for path in r.inferred:  # every inferred entry names a real field
            obj = r
            for part in path.split("."):
                obj = getattr(obj, part)


def matching(global_batch, model=None):
    """Names of the recipes whose source uses them at ``global_batch`` (and for ``model``)."""
    return tuple(n for n in recipes.names() if recipes.get(n).applies_to(global_batch)
                 and (model is None or recipes.get(n).model == model))


def test_batch_selection():
    assert set(matching(32768)) == {
        "alexnet_bn_32k_intel_32nodes", "alexnet_bn_32k_intel_64nodes", "alexnet_bn_32k_nvcaffe",
        "resnet50_32k_mlperf_v06", "resnet50_32k_mlperf_v07_tf2", "resnet50_32k_nus_legw",
        "resnet50_32k_tpu"}
    assert matching(8192, model="resnet50") == ("resnet50_8k_nus", "resnet50_lt16k_tpu")
    lt16, mid = recipes.get("resnet50_lt16k_tpu"), recipes.get("resnet50_16k_32k_tpu")
    assert lt16.applies_to(16383) and not lt16.applies_to(16384)
    assert mid.applies_to(16384) and not mid.applies_to(32768)
    assert recipes.get("resnet50_32k_mlperf_v06").applies_to(65536)


def test_to_config_dict():
    d = recipes.get("alexnet_bn_32k_intel_32nodes").to_config_dict()
    assert d == {
        "epochs": 100, "global_batch": 32768,
        "optimizer": {"name": "lars", "variant": "you", "momentum": 0.9, "weight_decay": 0.0005,
                      "trust_coefficient": 0.001, "epsilon": 0.0, "momentum_correction": True,
                      "exclude_from_weight_decay": [], "exclude_from_layer_adaptation": []},
        "schedule": {"kind": "poly", "peak_lr": 33.0, "warmup_epochs": 10.0,
                     "warmup_start_lr": 1.0, "end_lr": 0.0, "power": 2.0, "decay_over": "global"}}
    tpu = recipes.get("resnet50_lt16k_tpu").to_config_dict()
    assert "global_batch" not in tpu and tpu["label_smoothing"] == 0.1
    sgd = recipes.get("resnet50_14k_codreanu_448nodes").to_config_dict()["optimizer"]
    assert sgd["name"] == "sgd" and "variant" not in sgd and "trust_coefficient" not in sgd


def test_schedule_epochs_override():
    s, _ = recipe_schedule("resnet50_8k_nus", steps_per_epoch=10, epochs=45)
    assert (s.warmup_steps, s.total_steps) == (25, 450)


# ---- the data file ----------------------------------------------------------------------------------------
def test_recipes_yaml_is_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entries = [e.strip() for e in cfg["options.package_data"]["knl_train"].split(",")]
    assert "optim/recipes.yaml" in entries
    assert (ROOT / "knl_train" / "optim" / "recipes.yaml").is_file()


def _good():
    return {
        "model": "resnet50", "global_batch": 8192, "epochs": 90, "label_smoothing": None,
        "source": "x:y", "inferred": [],
        "optimizer": {"name": "lars", "variant": "you", "momentum": 0.9, "weight_decay": 1e-4,
                      "trust_coefficient": 1e-3, "epsilon": 0.0, "momentum_correction": False,
                      "exclude_from_weight_decay": [], "exclude_from_layer_adaptation": []},
        "schedule": {"kind": "poly", "peak_lr": 16.0, "warmup_epochs": 2.5, "warmup_start_lr": 0.0,
                     "end_lr": 0.0, "power": 2.0, "decay_over": "after_warmup"},
    }


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("source"), "field 'source' is required"),
    (lambda d: d.update(lr=1), "unknown config field 'lr'"),
    (lambda d: d["optimizer"].update(variant="nus"), "optimizer.variant: 'nus'"),
    (lambda d: d["schedule"].update(kind="linear"), "schedule.kind: 'linear'"),
    (lambda d: d["schedule"].update(peak_lr=0), "schedule: peak_lr must be > 0"),
    (lambda d: d["schedule"].pop("warmup_epochs"), "schedule.warmup_epochs is required"),
    (lambda d: d.update(inferred=["schedule.lr"]), "'schedule.lr', which is not a recipe field"),
    (lambda d: d.update(global_batch=None), "give global_batch, batch_range or both"),
    (lambda d: d.update(batch_range=[16384, None]), "outside batch_range"),
    (lambda d: d.update(batch_range=[16384]), "batch_range: expected a list of 2 items"),
    (lambda d: d.update(name="x"), "unknown key 'name'"),
    (lambda d: d["optimizer"].update(name="lamb"), "optimizer: name: 'lamb' is not allowed"),
    (lambda d: d["optimizer"].update(variant=None), "variant is required for LARS"),
    (lambda d: d["optimizer"].update(momentum=-0.9), "optimizer: momentum must be >= 0"),
])
def test_malformed_recipes_are_rejected(edit, message):
    assert recipes._parse("ok", _good()).schedule.peak_lr == 16.0
    data = _good()
    edit(data)
    with pytest.raises(recipes.RecipeError, match=message):
        recipes._parse("bad", data)
