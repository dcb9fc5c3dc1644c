"""The tf.data machinery shared by the folder and TFRecord readers.

* Bad images are skipped and counted (``SkipCounter``), not fatal: a cheap byte check
  (``augment.looks_valid``) catches empty, cut-off and non-image files; anything that still
  fails to read or decode is dropped by ``ignore_errors`` and counted from the gap it leaves in
  the stream's running index.
* A training stream never ends, so one in which nothing is usable (every image unreadable, the
  data directory gone) would spin forever: after ``GIVE_UP`` unusable images in a row it stops
  with a tagged error naming the directory and a few of the files.
* Bad data that is the user's to fix (a TFRecord missing a feature, a label out of range) stops
  the pipeline with a tagged error; ``user_errors()`` turns it into a ``UserError``.
* Each rank's pipeline runs on a private thread pool of ``threads`` threads, so decoding never
  spreads onto TF's inter/intra-op pools, which belong to the compute threads.
"""

from __future__ import annotations

import contextlib
import re

import tensorflow as tf

from knl_train import log as knl_log
from knl_train.data import augment as aug
from knl_train.errors import UserError

TAG = "knl-train data error: "
# Every function the pipelines trace is plain TensorFlow (tf.cond, no Python branch on a tensor),
# so AutoGraph's source-to-source conversion, seconds of start-up, is skipped.
plain = tf.autograph.experimental.do_not_convert
END = " <<end>>"
# Unusable images in a row after which a training stream gives up. Shuffled, a dataset with a
# fraction f of bad images has such a run with odds about f**1000: never, unless nearly all are
# bad; a run costs at most 1000 failed reads (well under a second on local disk).
GIVE_UP = 1000


class SkipCounter:
    """How many images a pipeline skipped (unreadable, empty, truncated or corrupt).

    Pass one to ``train_dataset``/``eval_dataset(skips=...)``; read ``count`` (or ``take()``,
    which also resets it) at the end of an epoch. Counted per rank, as the pipeline meets them
    (a bad image in the read-ahead of the epoch's last batch counts in that epoch).
    """

    def __init__(self):
        self.variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="knl_skipped_images")

    @property
    def count(self) -> int:
        return int(self.variable.numpy())

    def reset(self) -> None:
        self.variable.assign(0)

    def take(self) -> int:
        n = self.count
        self.reset()
        return n


def problem(message):
    """A string tensor stating what is wrong with an element (empty when nothing is)."""
    return tf.strings.join([TAG, message, END])


@contextlib.contextmanager
def user_errors():
    """Turn a pipeline's tagged errors (``problem``) into ``UserError``s; wrap iteration/fit."""
    try:
        yield
    except tf.errors.OpError as e:
        msg = as_user_message(e)
        if msg is None:
            raise
        # The data is this rank's shard: this rank says it, the others stop quietly.
        raise knl_log.this_rank(UserError(msg)) from None


def as_user_message(e):
    m = re.search(re.escape(TAG) + r"(.*?)" + re.escape(END), str(getattr(e, "message", e)), re.S)
    return m.group(1).strip() if m else None


def images(ds, load, transform, *, name, image_size: int, seed: int, rank: int, threads: int,
           skips: "SkipCounter | None", epoch=0, start=0, give_up: "int | None" = None,
           where: str = ""):
    """Map a stream of raw elements to (image, label), skipping and counting bad images.

    ``load(elem) -> (bytes, label int32, problem string)``; ``problem`` non-empty stops the run.
    ``name(elem)``: a string naming the element's file (for messages; it must not fail).
    ``transform(bytes, seed[2]) -> float32 [image_size, image_size, 3]``. Element i of the
    stream (counted from ``start``, its position in the epoch) is augmented with the stateless
    seed (seed, rank, epoch, i), so a resumed epoch repeats its augmentations exactly.
    ``epoch`` and ``start`` may be tensors (inside ``across_epochs``). ``give_up``: stop with a
    problem naming ``where`` (the data's directory) after this many unusable images in a row: a
    training stream never ends, so one that finds nothing usable would otherwise spin forever.
    """
    base = tf.cast(stream_seed(seed, rank, epoch), tf.int64)
    zeros = tf.zeros([image_size, image_size, 3], tf.float32)

    def stage(idx, elem, tick):
        def decode():
            data, label, why = load(elem)
            ok = aug.looks_valid(data)
            img = tf.cond(ok, lambda: transform(data, tf.stack([base, idx])), lambda: zeros)
            img.set_shape([image_size, image_size, 3])
            return img, label, why, ok

        # A tick reads nothing, so it cannot fail.
        img, label, why, ok = tf.cond(tick, lambda: (zeros, tf.constant(-1, tf.int32),
                                                     tf.constant(""), tf.constant(False)), decode)
        return idx, img, label, why, ok, tick, name(elem)

    # Whatever fails to read or decode is dropped by ignore_errors and counted from the gap it
    # leaves in the running index. Each chunk of elements ends with a tick (a copy of its last
    # element that is not read), which always comes through: so a gap at the very end of a finite
    # stream is counted, and a stream in which everything fails still shows its growing gap.
    chunk = 256 if give_up is None else max(1, min(64, give_up // 4))
    ds = ds.enumerate(start=start).batch(chunk).map(plain(_with_tick)).unbatch()
    ds = ds.map(plain(stage), num_parallel_calls=threads, deterministic=True).ignore_errors()
    counter = skips.variable if skips is not None else None
    where = tf.constant(where)

    def count(state, e):
        last, run, seen = state
        idx, img, label, why, ok, tick, source = e
        bad = tf.logical_not(ok | tick)  # arrived, and not an image
        lost = idx - last - 1 + tf.cast(tick, tf.int64)  # failed to read or decode
        run = run + lost + tf.cast(bad, tf.int64)
        # The last three bad files met (a tick names its chunk's last, if that one was lost).
        named = bad | (tick & (lost > 0))
        seen = tf.where(named & tf.not_equal(source, seen[-1]), tf.concat([seen[1:], [source]], 0),
                        seen)
        # A tagged problem is the user's to fix: stop (after ignore_errors, which must not eat it).
        checks = [tf.debugging.Assert(tf.equal(tf.strings.length(why), 0), [why])]
        if give_up is not None:
            stop = tf.cond(run >= give_up, lambda: _nothing_usable(give_up, seen, where),
                           lambda: tf.constant(""))
            checks.append(tf.debugging.Assert(tf.equal(tf.strings.length(stop), 0), [stop]))
        if counter is not None:
            checks.append(counter.assign_add(lost + tf.cast(bad, tf.int64)))
        with tf.control_dependencies(checks):
            state = (tf.maximum(last, idx), tf.where(ok, tf.zeros_like(run), run), seen)
            return state, (tf.identity(img), label, ok)

    ds = ds.scan((tf.cast(start, tf.int64) - 1, tf.constant(0, tf.int64), tf.fill([3], "")),
                 plain(count))
    return ds.filter(plain(_keep)).map(plain(_drop_flag))


def _with_tick(idx, elem):
    """A chunk of (index, element) rows, and a tick row after them: its last row again, flagged."""
    def again(t):
        return tf.concat([t, t[-1:]], 0)
    tick = tf.concat([tf.zeros_like(idx, tf.bool), [True]], 0)
    return again(idx), tf.nest.map_structure(again, elem), tick


def _nothing_usable(give_up: int, seen, where):
    """The problem of a stream whose last ``give_up`` images were all unusable."""
    examples = tf.strings.reduce_join(tf.boolean_mask(seen, tf.strings.length(seen) > 0),
                                      separator=", ")
    gone = tf.equal(tf.size(tf.io.matching_files(glob_literal(where))), 0)
    return problem(tf.where(
        gone,
        tf.strings.join([where, " no longer exists (deleted, moved or unmounted during the run?); "
                         "restore it and rerun the same command to resume"]),
        tf.strings.join([f"none of the last {give_up} training images this rank read from ", where,
                         " could be read and decoded (e.g. ", examples, "); check that the files "
                         "are whole JPEG or PNG images, and replace or remove the bad ones"])))


def glob_literal(path):
    """``path`` (a string tensor) as a ``matching_files`` pattern that matches itself only."""
    return tf.strings.regex_replace(path, r"([\[*?])", r"[\1]")


def stream_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The first half of the stateless seeds of one rank's stream in one epoch."""
    return seed * 1_000_003 + rank + epoch * 1_000_000_007


def train_batches(ds, load, *, name, where: str, size: int, rank: int, world: int,
                  per_rank_batch: int, image_size: int, seed: int, threads: int, augment, skips,
                  epoch, skip_batches, num_batches=None, inner: bool = False):
    """A reader's training batches from ``ds``, its raw stream from batch ``skip_batches`` on
    (the reader has dropped what precedes it): decode, augment, batch, take, prefetch.

    ``size``: the split's image count; the epoch has ``size // global_batch`` batches.
    ``name``, ``where``: as in ``images`` (the stream gives up after ``GIVE_UP`` bad images).
    ``inner``: one epoch of ``across_epochs``, which prefetches and sets the threads itself.
    """
    augment = aug.resolve(augment)
    steps = check_global_batch(size, per_rank_batch * world)
    if num_batches is None:
        num_batches = steps - skip_batches
    ds = images(ds, load, lambda data, s: aug.train_image(data, s, image_size, augment),
                name=name, image_size=image_size, seed=seed, rank=rank, threads=threads,
                skips=skips, epoch=epoch, start=skip_batches * per_rank_batch, give_up=GIVE_UP,
                where=where)
    ds = ds.batch(per_rank_batch, drop_remainder=True).take(num_batches)
    return ds if inner else with_threads(ds.prefetch(2), threads)


def across_epochs(one_epoch, *, first_epoch: int, skip_batches: int, batches_per_epoch: int,
                  num_batches: int, threads: int, prefetch: int = 2):
    """``num_batches`` training batches from batch ``skip_batches`` of epoch ``first_epoch`` on,
    epoch after epoch, as one stream.

    ``one_epoch(epoch, skip, count)`` builds an epoch's batches ``skip .. skip + count - 1``
    from tensors, so each epoch's order stays a pure function of (seed, epoch, position), yet the
    stream is built once: nothing is rebuilt in Python at an epoch boundary, and the prefetch
    runs on into the next epoch while this one's last steps train.
    """
    last_epoch = first_epoch + (skip_batches + num_batches - 1) // batches_per_epoch

    def epoch_batches(epoch):
        skip = tf.where(epoch == first_epoch, tf.constant(skip_batches, tf.int64),
                        tf.constant(0, tf.int64))
        return one_epoch(epoch, skip, batches_per_epoch - skip)

    ds = tf.data.Dataset.range(first_epoch, last_epoch + 1).flat_map(plain(epoch_batches))
    return with_threads(ds.take(num_batches).prefetch(prefetch), threads)


def eval_batches(ds, load, *, name, batch: int, image_size: int, threads: int, augment, skips,
                 cache: bool = False):
    """A reader's evaluation batches from ``ds``, its raw stream: decode, center, batch.

    ``cache``: keep the decoded batches in memory after the first pass, so later evaluations
    read no file and decode nothing (unreadable images are then counted in the first only).
    """
    augment = aug.resolve(augment)
    ds = images(ds, load, lambda data, s: aug.eval_image(data, image_size, augment),
                name=name, image_size=image_size, seed=0, rank=0, threads=threads, skips=skips)
    ds = ds.batch(batch)
    if cache:
        ds = ds.cache()
    return with_threads(ds.prefetch(2), threads)


def _keep(img, label, ok):
    return ok


def _drop_flag(img, label, ok):
    return img, label


def with_threads(ds, threads: int):
    """Run ``ds`` on a private pool of ``threads`` threads (decoding stays off the compute pools)."""
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    # The parallelism and buffers are set explicitly, so autotuning has nothing to tune; and its
    # model thread can hold up the iterator's deletion (the end of a fit, of an evaluation) for
    # up to its optimisation period, which grows to a minute.
    opts.autotune.enabled = False
    return ds.with_options(opts)


def check_global_batch(n: int, global_batch: int, what: str = "the training set"):
    steps = n // global_batch
    if steps == 0:
        raise UserError(f"{what} has {n} images, fewer than one global batch "
                        f"of {global_batch}; lower global_batch or add data")
    return steps
