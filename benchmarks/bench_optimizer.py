"""Optimizer-step cost on ResNet-50's variables and on the demo's small CNN, against legacy SGD
with momentum.

    .venv/bin/python benchmarks/bench_optimizer.py            # full run (idle machine, ~5-10 min)
    .venv/bin/python benchmarks/bench_optimizer.py --quick    # smoke run (~2 min)
    .venv/bin/python benchmarks/bench_optimizer.py --only small_cnn --threads 1   # the demo's rank

Part 1 times ``apply_gradients`` alone, in graph mode (tf.function), on the 214 trainable
variables (25.6M parameters) of ``tf.keras.applications.ResNet50`` with fixed random
gradients: legacy SGD with momentum (the reference), a straightforward element-wise LARS as
Model Garden writes it, knl_train's LARS on its pure-TF path and on the fused op for each
variant, LAMB when ``knl_train.optim.LAMB`` exists, and optionally XLA (``--xla``). Part 2
times a whole training step (forward, backward, apply) with SGD and with LARS.

Part 3 is the other end: the demo's ``small_cnn`` (14 variables, 68k parameters, 32 px, 40
classes, batch 32 per rank), where a step's cost is per variable rather than per parameter.
Both ``apply_gradients`` alone and the whole training step, with SGD, LARS on the fused path
as it runs (one multi-variable op per step), LARS with one fused op per variable (how the
fused path ran before the multi-variable op) and LARS on the pure-TF path. The demo runs
each rank on one thread: ``--threads 1``.

Configurations are interleaved round-robin (each round starts one further along), each
sample is the mean of a few back-to-back steps, and the table reports the median sample and
its ratio to SGD. At the seeds' scale each rank applies the optimizer to all parameters, so
these ratios are what a 2048-rank job pays per step. Results go to
``benchmarks/results/optimizer.{json,md}`` (``optimizer.quick.*`` for --quick), with the
machine, its load average while measuring, and the LARS kernel mode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from knl_train.optim import LARS, kernels  # noqa: E402
from machine import host, load_note, write_results  # noqa: E402
from knl_train.optim.exclusion import ExclusionRule  # noqa: E402

# Each configuration is its own tf.function built by the same closure, which TF's retracing
# heuristic mistakes for a function retraced in a loop.
tf.get_logger().setLevel("ERROR")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESNET50_VARIABLES, RESNET50_PARAMS = 214, 25_583_592
VARIANTS = ("you", "tf_contrib", "model_garden")
# Hyperparameters of a 32K-batch ResNet-50 run; the values do not change the cost.
LARS_HP = dict(learning_rate=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3)
TARGETS = {"lars-fused": 1.6, "lars-tf": 3.0, "lamb": 3.0, "train-lars": 1.03}
FUSED_OPS = {"KnlLarsApply", "KnlLarsApplyMulti"}
# The demo's model and per-rank batch (jobs/train/demo.yaml, make demo's 40 classes).
SMALL_CNN = dict(name="small_cnn", image_size=32, num_classes=40, batch=32)


class ModelGardenLARS(tf.keras.optimizers.legacy.Optimizer):
    """For comparison only: LARS written element-wise the way TF Model Garden writes it
    (g += βw; t = η‖w‖/‖g‖; v = m·v + lr·t·g; w -= v, each an op of its own), with the same
    rank <= 1 exclusions as knl_train's LARS so both do the same work."""

    def __init__(self, learning_rate=1.0, momentum=0.9, weight_decay=1e-4,
                 trust_coefficient=1e-3, name="ModelGardenLARS"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("momentum", momentum)
        self.weight_decay, self.eta = weight_decay, trust_coefficient
        self._excluded = ExclusionRule.from_config(None)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "momentum")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        lr = self._decayed_lr(dtype)
        m = self._get_hyper("momentum", dtype)
        v = self.get_slot(var, "momentum")
        scaled_lr = lr
        if not self._excluded.matches(var):
            grad = grad + self.weight_decay * var
            w_norm, g_norm = tf.norm(var, ord=2), tf.norm(grad, ord=2)
            trust = tf.where(tf.greater(w_norm, 0),
                             tf.where(tf.greater(g_norm, 0), self.eta * w_norm / g_norm, 1.0),
                             1.0)
            scaled_lr = lr * trust
        next_v = tf.multiply(m, v) + scaled_lr * grad
        return tf.group(v.assign(next_v, use_locking=self._use_locking),
                        var.assign_sub(next_v, use_locking=self._use_locking))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError

    def get_config(self):
        return super().get_config()


class PerVariableLARS(LARS):
    """For comparison only: knl_train's LARS with one fused op per variable (``KnlLarsApply``
    in Keras' per-variable loop), as the fused path ran before the multi-variable op."""

    def _fused_groups(self, grads_and_vars, apply_state):
        return None


@contextlib.contextmanager
def lars_kernel(mode):
    """KNL_TRAIN_LARS_KERNEL while a step is traced (the path is chosen at trace time)."""
    old = os.environ.get(kernels.ENV_VAR)
    os.environ[kernels.ENV_VAR] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = old


class Config:
    """One timed configuration: a traced step function and how to trace it. ``ops``, if
    given, is the set of fused LARS ops its traced step must contain (empty: none)."""

    def __init__(self, name, group, make_step, mode="auto", target=None, note="", ops=None):
        self.name, self.group, self.mode, self.target, self.note = name, group, mode, target, note
        self.ops = ops
        self.make_step = make_step
        self.step = None
        self.samples = []  # ms per step

    def trace(self):
        with lars_kernel(self.mode):
            self.step = self.make_step()
            self.step()  # traces and creates slots
            self.step()
        return self

    def graph_ops(self):
        return {op.type for op in self.step.get_concrete_function().graph.get_operations()}

    def check_path(self):
        """The fused ops a LARS configuration claims are the ones its traced step runs."""
        if self.ops is not None and self.graph_ops() & FUSED_OPS != self.ops:
            found = sorted(self.graph_ops() & FUSED_OPS) or "no fused op"
            raise SystemExit(f"{self.name}: the traced step runs {found}, not {sorted(self.ops)}")


def time_interleaved(configs, rounds, steps_per_sample, label):
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            t0 = time.perf_counter()
            for _ in range(steps_per_sample):
                c.step()
            c.samples.append((time.perf_counter() - t0) * 1e3 / steps_per_sample)
        print(f"  {label}: round {r + 1}/{rounds}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def summarize(configs, reference):
    ref = statistics.median(reference.samples)
    rows = []
    for c in configs:
        med = statistics.median(c.samples)
        q = np.percentile(c.samples, [25, 75])
        ratio = med / ref
        rows.append({
            "name": c.name, "group": c.group, "median_ms": round(med, 3),
            "p25_ms": round(float(q[0]), 3), "p75_ms": round(float(q[1]), 3),
            "min_ms": round(min(c.samples), 3), "samples": len(c.samples),
            "ratio_to_sgd": round(ratio, 3), "target": c.target,
            "meets_target": None if c.target is None else bool(ratio <= c.target),
            "note": c.note,
        })
    return rows


def machine_info():
    return {
        **host(), "tf_version": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "lars_kernel": kernels.status(),
    }


def find_lamb():
    """knl_train's LAMB if this checkout has one (exported, or still only in its module)."""
    import importlib

    for module in ("knl_train.optim", "knl_train.optim.lamb"):
        try:
            found = getattr(importlib.import_module(module), "LAMB", None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return None


def optimizer_configs(variables, grads, args, fused_ok):
    pairs = list(zip(grads, variables))

    def stepper(make_opt, jit=False):
        def make():
            opt = make_opt()

            @tf.function(jit_compile=jit)
            def step():
                opt.apply_gradients(pairs)
            return step
        return make

    sgd = lambda: tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)  # noqa: E731
    configs = [Config("SGD momentum (legacy Keras)", "reference", stepper(sgd)),
               Config("LARS element-wise (Model Garden style)", "reference",
                      stepper(lambda: ModelGardenLARS(**LARS_HP)))]
    for variant in VARIANTS:
        configs.append(Config(f"LARS {variant}, pure TF", "lars-tf",
                              stepper(lambda v=variant: LARS(**LARS_HP, variant=v)), mode="tf",
                              target=TARGETS["lars-tf"], ops=set()))
    for variant in VARIANTS:
        if fused_ok:
            configs.append(Config(f"LARS {variant}, fused op", "lars-fused",
                                  stepper(lambda v=variant: LARS(**LARS_HP, variant=v)),
                                  mode="fused", target=TARGETS["lars-fused"],
                                  ops={"KnlLarsApplyMulti"}))
    lamb_cls = find_lamb()
    if lamb_cls is not None:
        configs.append(Config("LAMB", "lamb", stepper(lambda: lamb_cls(learning_rate=1e-3)),
                              target=TARGETS["lamb"]))
    if args.xla:
        configs.append(Config("SGD momentum, XLA", "xla", stepper(sgd, jit=True)))
        configs.append(Config("LARS you, pure TF, XLA", "xla",
                              stepper(lambda: LARS(**LARS_HP, variant="you"), jit=True),
                              mode="tf", ops=set()))
    notes = []
    if not fused_ok:
        notes.append(f"fused LARS op not measured: {kernels.status()['reason']}")
    if lamb_cls is None:
        notes.append("LAMB not measured: knl_train.optim.LAMB does not exist in this checkout")
    return configs, notes


def train_stepper(model, images, labels, loss_fn):
    """make_opt -> a ``make`` that traces one whole training step with that optimizer."""
    variables = model.trainable_variables

    def stepper(make_opt):
        def make():
            opt = make_opt()

            @tf.function
            def step():
                with tf.GradientTape() as tape:
                    loss = loss_fn(labels, model(images, training=True))
                opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return step
        return make
    return stepper


def train_configs(model, images, labels, optimizers):
    stepper = train_stepper(model, images, labels,
                            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    configs = [Config("train step, SGD momentum", "reference",
                      stepper(lambda: tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)))]
    for name, mode in optimizers:  # the target is the fused op's; pure TF for comparison
        configs.append(Config(f"train step, LARS you, {name}", "train-lars",
                              stepper(lambda: LARS(**LARS_HP, variant="you")), mode=mode,
                              target=TARGETS["train-lars"] if mode == "fused" else None,
                              ops={"KnlLarsApplyMulti"} if mode == "fused" else set()))
    return configs


def small_cnn_configs(model, images, labels, grads, fused_ok):
    """Part 3: apply_gradients alone and the whole training step on the demo's model, with SGD
    and LARS ("you", the demo's variant) on each path."""
    pairs = list(zip(grads, model.trainable_variables))

    def apply_stepper(make_opt):
        def make():
            opt = make_opt()

            @tf.function
            def step():
                opt.apply_gradients(pairs)
            return step
        return make

    sgd = lambda: tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)  # noqa: E731
    paths = [("fused, one op per step", "fused", LARS, {"KnlLarsApplyMulti"}),
             ("fused, one op per variable", "fused", PerVariableLARS, {"KnlLarsApply"})]
    paths = (paths if fused_ok else []) + [("pure TF", "tf", LARS, set())]
    configs = {}
    whole_step = train_stepper(model, images, labels,
                               tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for part, stepper in (("apply", apply_stepper), ("train", whole_step)):
        what = "apply_gradients" if part == "apply" else "train step"
        configs[part] = [Config(f"{what}, SGD momentum", "reference", stepper(sgd))] + [
            Config(f"{what}, LARS you, {label}", f"small-{part}",
                   stepper(lambda cls=cls: cls(**LARS_HP, variant="you")), mode=mode, ops=ops)
            for label, mode, cls, ops in paths]
    return configs


def run_small_cnn(rounds, steps, fused_ok):
    """Part 3: {"setup": ..., "apply": rows, "train": rows}."""
    from knl_train.models import build

    spec = SMALL_CNN
    tf.keras.utils.set_random_seed(1)
    model = build(spec["name"], num_classes=spec["num_classes"], image_size=spec["image_size"])
    variables = model.trainable_variables
    rng = np.random.default_rng(1)
    grads = [tf.constant(rng.normal(scale=1e-2, size=v.shape).astype(np.float32))
             for v in variables]
    size, batch = spec["image_size"], spec["batch"]
    images = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
    labels = tf.constant(rng.integers(0, spec["num_classes"], size=(batch,)))
    setup = (f"{spec['name']}, {len(variables)} variables, "
             f"{sum(v.shape.num_elements() for v in variables):,} parameters, {size} px, "
             f"{spec['num_classes']} classes, batch {batch}, "
             f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} "
             "intra-op threads")
    print(f"\n{setup}")
    out = {"setup": setup}
    for part, configs in small_cnn_configs(model, images, labels, grads, fused_ok).items():
        configs = [c.trace() for c in configs]
        for c in configs:
            c.check_path()
        time_interleaved(configs, rounds, steps, f"small_cnn {part}")
        out[part] = summarize(configs, configs[0])
        print_table(f"small_cnn, {'apply_gradients' if part == 'apply' else 'whole training step'}"
                    f" ({setup})", out[part])
    return out


def _table(title, rows):
    lines = [f"## {title}", "", "| configuration | median ms | p25-p75 ms | × SGD | target |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        target = "" if r["target"] is None else (
            f"≤ {r['target']} {'✓' if r['meets_target'] else '✗'}")
        lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['p25_ms']:.2f}-"
                     f"{r['p75_ms']:.2f} | {r['ratio_to_sgd']:.2f} | {target} |")
    return lines + [""]


def markdown(record):
    m = record["machine"]
    quick = " (quick smoke run)" if record["quick"] else ""
    models = " and ".join(x for x, key in (("ResNet-50's variables", "optimizer"),
                                           ("the demo's small CNN", "small_cnn")) if record[key])
    lines = [f"# Optimizer step on {models}{quick}", "",
             f"{m['cpu']}, {m['cpus_available']} CPUs available, TF {m['tf_version']}, "
             f"{m['intra_op_threads'] or 'default'} intra-op threads, "
             f"LARS kernel mode `{m['lars_kernel'].get('mode')}` "
             f"(fused op {'built' if m['lars_kernel'].get('fused') else 'not available'}); "
             f"load average {record['load_before']} before, {record['load_after']} after; "
             f"{m['date']}, commit {m['git_commit'] or '?'}.",
             "",
             f"Median of {record['rounds']} interleaved samples of {record['steps_per_sample']} "
             "steps each.", ""]
    if record["optimizer"]:
        lines += [f"ResNet-50: {record['variables']} variables, {record['parameters']:,} "
                  "parameters.", ""]
    for title, rows in (("ResNet-50: apply_gradients (graph mode)", record["optimizer"]),
                        (f"ResNet-50: whole training step ({record['train_setup']})",
                         record["train"])):
        if rows:
            lines += _table(title, rows)
    small = record["small_cnn"]
    if small:
        lines += [f"Small CNN: {small['setup']}.", ""]
        lines += _table("Small CNN: apply_gradients (graph mode)", small["apply"])
        lines += _table("Small CNN: whole training step", small["train"])
    for note in record["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def print_table(title, rows):
    print(f"\n{title}")
    print(f"  {'configuration':54s} {'median ms':>10s} {'p25-p75':>15s} {'x SGD':>7s}  target")
    for r in rows:
        target = "" if r["target"] is None else (
            f"<= {r['target']} {'ok' if r['meets_target'] else 'MISSED'}")
        print(f"  {r['name']:54s} {r['median_ms']:10.2f} {r['p25_ms']:7.2f}-{r['p75_ms']:<7.2f}"
              f" {r['ratio_to_sgd']:7.2f}  {target}")


def run_resnet50(args, rounds, steps, train_rounds, fused_ok, notes):
    """Parts 1 and 2: {"variables", "parameters", "optimizer": rows, "train": rows,
    "train_setup"}."""
    tf.keras.utils.set_random_seed(0)
    size = args.image_size
    model = tf.keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    variables = model.trainable_variables
    n_params = sum(v.shape.num_elements() for v in variables)
    print(f"ResNet-50: {len(variables)} trainable variables, {n_params:,} parameters "
          f"({sum(v.shape.rank <= 1 for v in variables)} of rank <= 1, excluded from LARS "
          "adaptation and weight decay by default)")
    if (len(variables), n_params) != (RESNET50_VARIABLES, RESNET50_PARAMS):
        raise SystemExit(f"expected {RESNET50_VARIABLES} variables / {RESNET50_PARAMS:,} "
                         "parameters: this Keras builds a different ResNet-50")
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.normal(scale=1e-3, size=v.shape).astype(np.float32))
             for v in variables]

    configs, more_notes = optimizer_configs(variables, grads, args, fused_ok)
    notes += more_notes
    print(f"\ntracing {len(configs)} optimizer configurations ...")
    traced = []
    for c in configs:
        try:
            traced.append(c.trace())
        except Exception as e:  # noqa: BLE001 (e.g. a LAMB still being written)
            notes.append(f"{c.name} not measured: {type(e).__name__}: {e}")
    configs = traced
    for c in configs:
        c.check_path()
    time_interleaved(configs, rounds, steps, "apply_gradients")
    opt_rows = summarize(configs, configs[0])
    print_table("apply_gradients on ResNet-50's variables (graph mode)", opt_rows)

    train_rows = []
    train_setup = f"{size} px, batch {args.batch}"
    if not args.no_train_step:
        images = tf.constant(rng.random((args.batch, size, size, 3), dtype=np.float32))
        labels = tf.constant(rng.integers(0, 1000, size=(args.batch,)))
        paths = [("fused op", "fused")] if fused_ok else []
        paths.append(("pure TF", "tf"))
        tconfigs = [c.trace() for c in train_configs(model, images, labels, paths)]
        for c in tconfigs:
            c.check_path()
        print(f"\ntiming {len(tconfigs)} training-step configurations ({train_setup}) ...")
        time_interleaved(tconfigs, train_rounds, max(1, steps // 2), "train step")
        train_rows = summarize(tconfigs, tconfigs[0])
        print_table(f"whole ResNet-50 training step ({train_setup})", train_rows)
    return {"variables": len(variables), "parameters": n_params, "optimizer": opt_rows,
            "train": train_rows, "train_setup": train_setup}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--rounds", type=int, help="interleaved samples per configuration")
    p.add_argument("--steps", type=int, help="steps per sample")
    p.add_argument("--image-size", type=int, default=128, help="ResNet-50's input size")
    p.add_argument("--batch", type=int, default=8, help="ResNet-50's training-step batch")
    p.add_argument("--no-train-step", action="store_true", help="skip part 2")
    p.add_argument("--only", choices=("resnet50", "small_cnn"),
                   help="run only parts 1-2 (resnet50) or part 3 (small_cnn)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads (default TensorFlow's; the demo's ranks use 1)")
    p.add_argument("--xla", action="store_true", help="also time XLA-compiled SGD and LARS")
    p.add_argument("--out", type=Path, help="output stem (default benchmarks/results/optimizer"
                   "[.small_cnn][.quick])")
    args = p.parse_args(argv)
    if args.threads:  # before TensorFlow's runtime starts
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 5)
    train_rounds = 2 if args.quick else 9
    stem = "optimizer" + (".small_cnn" if args.only == "small_cnn" else "") + (
        ".quick" if args.quick else "")
    out = args.out or RESULTS / stem

    machine = machine_info()
    fused_ok = bool(machine["lars_kernel"].get("fused"))
    print(f"{machine['cpu']} ({machine['cpus_available']} CPUs), TF {machine['tf_version']}, "
          f"LARS kernel: {machine['lars_kernel']}")
    load_before = [round(x, 2) for x in os.getloadavg()]

    notes = []
    resnet = {"variables": None, "parameters": None, "optimizer": [], "train": [],
              "train_setup": None}
    if args.only != "small_cnn":
        resnet = run_resnet50(args, rounds, steps, train_rounds, fused_ok, notes)
    small = None
    if args.only != "resnet50":
        small = run_small_cnn(rounds, steps, fused_ok)

    # Before we started (afterwards the load average counts this benchmark itself).
    notes += [n for n in [load_note(load_before, machine["cpus_available"])] if n]
    record = {
        "quick": args.quick, "machine": machine, "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds, "steps_per_sample": steps, "train_rounds": train_rounds,
        "targets": TARGETS, **resnet, "small_cnn": small, "notes": notes,
    }
    json_path, md_path = (out.parent / f"{out.name}.{ext}" for ext in ("json", "md"))
    write_results(json_path, md_path, record, markdown(record))
    for note in notes:
        print(f"note: {note}")
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
