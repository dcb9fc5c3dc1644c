"""ImageNet TFRecords in the standard schema (TF's ``build_imagenet_data.py``): writer and reader.

Each record is a ``tf.train.Example`` with ``image/encoded`` (the file's bytes, unchanged),
``image/format``, ``image/filename``, ``image/class/label`` (``index + label_offset``: 1-based
by default, as build_imagenet_data writes it, 0 is background), ``image/class/synset`` (the
wnid), ``image/height``, ``image/width``, ``image/colorspace`` and ``image/channels``. Shards are
named ``train-00000-of-01024`` and ``validation-00000-of-00128``; ``knl_tfrecord.json`` beside
them records the classes, the label offset and the example counts (the reader uses it when it
is there; plain ImageNet TFRecords need ``num_classes`` and optionally ``num_examples``).
The writer leaves out images the trainer could not use and lists them in ``unreadable.txt``.

Reader sharding: when the split has at least ``world`` files and a multiple of ``world``, rank r
reads every world-th file of the epoch's (seeded, identical on all ranks) file order; otherwise
every rank reads all files and keeps every world-th record. Either way the ranks' shares are
disjoint and together cover the split once per pass. The reader half is a ``source.Reader``
(``train_dataset``, ``eval_dataset``) of ``TFRecordSplit``s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from knl_train.errors import UserError

METADATA = "knl_tfrecord.json"
PREFIX = {"train": "train", "val": "validation", "validation": "validation"}


# ---- writer ---------------------------------------------------------------------------------------
def shard_names(prefix: str, shards: int):
    return [f"{prefix}-{k:05d}-of-{shards:05d}" for k in range(shards)]


def assign(n: int, shards: int, seed: int = 0):
    """Deterministic shard assignment: a seeded permutation of 0..n-1 cut into ``shards``
    contiguous, balanced (±1) pieces, so every shard mixes classes."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(n)
    return [piece.tolist() for piece in np.array_split(order, shards)]


def to_tfrecord(src, out, *, shards: int, workers: int = 1, label_offset: int = 1,
                val_shards: Optional[int] = None, progress: bool = True) -> dict:
    """Convert the folder dataset ``src`` (train/ and, if present, val/) into TFRecord shards in
    ``out``. Returns the metadata written to ``out/knl_tfrecord.json``.

    Images the trainer could not use (``augment.readable``: empty, cut-off, not JPEG or PNG) are
    left out, counted in the metadata, listed in ``out/unreadable.txt`` and named in a warning.
    A split with no usable image at all is an error, and nothing is left behind."""
    from knl_train.data import folder
    if shards < 1:
        raise UserError(f"--shards must be >= 1, got {shards}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    classes = folder.list_classes(src)
    splits = {"train": (folder.scan(src, "train", classes), shards)}
    if (Path(src) / "val").is_dir():
        splits["validation"] = (folder.scan(src, "val", classes), val_shards or shards)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    jobs, prefix_of = [], {}
    for prefix, (split, n_shards) in splits.items():
        if n_shards > len(split):
            raise UserError(f"{prefix} has {len(split)} images, fewer than --shards {n_shards}")
        for name, idx in zip(shard_names(prefix, n_shards), assign(len(split), n_shards)):
            items = [(split.files[i], split.labels[i] + label_offset, classes[split.labels[i]]) for i in idx]
            jobs.append((str(out / name), items))
            prefix_of[str(out / name)] = prefix
    bad = {prefix: [] for prefix in splits}
    for path, unreadable in _write_all(jobs, workers, progress, desc=f"to-tfrecord {out.name}"):
        bad[prefix_of[path]].extend(unreadable)
    for prefix, (split, _) in splits.items():
        if len(bad[prefix]) == len(split):
            for path in prefix_of:
                Path(path).unlink(missing_ok=True)
            where = Path(src) / ("train" if prefix == "train" else "val")
            raise UserError(f"none of the {len(split)} images in {where} can be read and decoded "
                            f"(e.g. {_examples(bad[prefix])}); nothing was written: check that "
                            "they are whole JPEG or PNG files")
    meta = {"classes": list(classes), "label_offset": label_offset,
            "splits": {p: {"shards": n, "examples": len(s) - len(bad[p]), "unreadable": len(bad[p])}
                       for p, (s, n) in splits.items()}}
    _report_unreadable(out, {p: sorted(b) for p, b in bad.items()},
                       {p: len(s) for p, (s, _) in splits.items()})
    from knl_train.atomic import write_json_atomic
    write_json_atomic(out / METADATA, meta)
    return meta


UNREADABLE = "unreadable.txt"


def _examples(paths, k: int = 3) -> str:
    return ", ".join(sorted(paths)[:k]) + (", ..." if len(paths) > k else "")


def _report_unreadable(out: Path, bad: dict, totals: dict) -> None:
    """List the left-out images in ``out/unreadable.txt`` (removed when there are none) and say
    how many there were, naming a few."""
    from knl_train import log as knl_log
    from knl_train.atomic import write_text_atomic
    listing = out / UNREADABLE
    if not any(bad.values()):
        listing.unlink(missing_ok=True)
        return
    write_text_atomic(listing, "".join(f"{path}\n" for paths in bad.values() for path in paths))
    for prefix, paths in bad.items():
        if paths:
            knl_log.get(__name__).warning(
                f"left out {len(paths)} of {totals[prefix]} {prefix} images that cannot be read "
                f"and decoded (e.g. {_examples(paths)}); all are listed in {listing}")


def _write_all(jobs, workers: int, progress: bool, desc: str) -> list:
    """Write the shards of ``jobs``; returns each one's (path, unreadable sources)."""
    from tqdm import tqdm
    done = []
    with tqdm(total=sum(len(items) for _, items in jobs), desc=desc, unit="img",
              disable=not progress, mininterval=1.0) as bar:
        def collect(results):
            for path, n, unreadable in results:
                bar.update(n)
                done.append((path, unreadable))

        if workers == 1:
            collect(map(write_shard, jobs))
        else:
            import multiprocessing
            # spawn: the parent may have TF loaded, and a forked TF runtime is not safe.
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                collect(pool.imap_unordered(write_shard, jobs))
    return done


def write_shard(job):
    """Write one shard (temporary file, then rename) of the usable images among its sources;
    returns (its path, the number of sources, the unusable sources)."""
    path, items = job
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from PIL import Image

    from knl_train.data.augment import readable
    tmp = f"{path}.tmp-{os.getpid()}"

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    unreadable = []
    try:
        with tf.io.TFRecordWriter(tmp) as w:
            for file, label, synset in items:
                try:
                    data = Path(file).read_bytes()
                except OSError:
                    data = b""
                if not readable(data):
                    unreadable.append(file)
                    continue
                try:
                    with Image.open(file) as im:
                        (width, height), fmt = im.size, (im.format or "JPEG")
                except Exception:  # TF decodes it, PIL cannot say its size: size unknown
                    width = height = 0
                    fmt = "JPEG"
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "image/encoded": b(data), "image/format": b(fmt.encode()),
                    "image/filename": b(os.path.basename(file).encode()),
                    "image/class/label": i(label), "image/class/synset": b(synset.encode()),
                    "image/height": i(height), "image/width": i(width),
                    "image/colorspace": b(b"RGB"), "image/channels": i(3)}))
                w.write(ex.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, len(items), unreadable


# ---- reader ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TFRecordSplit:
    files: Tuple[str, ...]
    num_examples: int
    classes: Tuple[str, ...]
    label_offset: int = 1

    def __len__(self):
        return self.num_examples


def read_metadata(root) -> Optional[dict]:
    p = Path(root) / METADATA
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON ({e}); rewrite it with 'knl-train data to-tfrecord'") from None


def scan(root, split: str, *, num_classes: Optional[int] = None, label_offset: Optional[int] = None,
         num_examples: Optional[int] = None) -> TFRecordSplit:
    """The shard files of ``split`` ("train" or "val"/"validation") under ``root``.

    Classes, label offset and example count come from ``knl_tfrecord.json`` when present; the
    arguments override it. Without it, ``num_classes`` is required and the examples are counted
    by reading every record once (pass ``num_examples`` to skip that on full ImageNet)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset path {root} does not exist; write TFRecords with "
                        "'knl-train data to-tfrecord --src DIR --out DIR' or point data.path at them")
    if not root.is_dir():
        raise UserError(f"dataset path {root} is not a directory of TFRecord shards")
    prefix = PREFIX.get(split)
    if prefix is None:
        raise UserError(f"unknown split {split!r}: use train or val")
    files = sorted(str(p) for p in root.glob(f"{prefix}-*") if p.is_file() and ".tmp-" not in p.name)
    if not files:
        raise UserError(f"{root} holds no {prefix} TFRecord shards ({prefix}-*-of-*)")
    meta = read_metadata(root) or {}
    if num_classes is not None:
        classes = tuple(meta["classes"]) if len(meta.get("classes", ())) == num_classes else \
            tuple(str(i) for i in range(num_classes))
    elif "classes" in meta:
        classes = tuple(meta["classes"])
    else:
        raise UserError(f"{root} has no {METADATA}: give the number of classes (data.num_classes, "
                        "1000 for ImageNet)")
    offset = label_offset if label_offset is not None else int(meta.get("label_offset", 1))
    if num_examples is None:
        num_examples = meta.get("splits", {}).get(prefix, {}).get("examples")
    if num_examples is None:
        import tensorflow as tf
        num_examples = int(tf.data.TFRecordDataset(files).reduce(tf.constant(0, tf.int64),
                                                                 lambda n, _: n + 1).numpy())
    return TFRecordSplit(tuple(files), int(num_examples), classes, offset)


def _file_level(n_files: int, world: int) -> bool:
    return n_files >= world and n_files % world == 0


def _records(split: TFRecordSplit, *, rank: int, world: int, seed: Optional[int], threads: int,
             shuffle_buffer: int = 0, epoch=0):
    """(serialized record, source file) of this rank's share; shuffled when ``seed`` is given.

    The file order is a stateless permutation of (seed, epoch), so ``epoch`` may be a tensor
    (inside ``pipeline.across_epochs``); the record buffer's seed is a plain number, since
    ``Dataset.shuffle`` cannot take a tensor seed under a global seed of 0. Its draws repeat
    from epoch to epoch, but it shuffles a different file order each time."""
    import tensorflow as tf
    from knl_train.data.pipeline import plain
    names = tf.constant(list(split.files))
    if seed is not None:
        names = tf.random.experimental.stateless_shuffle(
            names, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))
    files = tf.data.Dataset.from_tensor_slices(names)
    if _file_level(len(split.files), world):
        files = files.shard(world, rank)
        n = -(-len(split.files) // world)
        ds = files.interleave(plain(_read_shard), cycle_length=max(1, min(threads, n)), block_length=1,
                              num_parallel_calls=max(1, min(threads, n)), deterministic=True)
    else:
        ds = files.flat_map(plain(_read_shard)).shard(world, rank)
    if seed is not None and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed * 7919 + rank, reshuffle_each_iteration=True)
    return ds


# Stands in for the records of a shard that no longer exists (never a serialized Example, whose
# first byte is a field tag, never 0): the loader turns it into a tagged error naming the shard.
GONE = b"\x00knl-train: shard gone"


def _read_shard(f):
    """(record, f) of shard ``f``; if ``f`` is gone (the data deleted or unmounted since the
    listing), a single ``GONE`` record instead of an open error, which ``ignore_errors`` would
    swallow, retrying it forever."""
    import tensorflow as tf
    from knl_train.data.pipeline import glob_literal, plain
    there = tf.size(tf.io.matching_files(glob_literal(f))) > 0
    records = tf.data.TFRecordDataset(tf.boolean_mask(tf.reshape(f, [1]), tf.reshape(there, [1])))
    gone = tf.data.Dataset.from_tensors(tf.constant(GONE)).repeat(1 - tf.cast(there, tf.int64))
    return records.concatenate(gone).map(plain(lambda r: (r, f)))


def _loader(split: TFRecordSplit):
    import tensorflow as tf
    from knl_train.data.pipeline import problem
    offset, n = int(split.label_offset), len(split.classes)
    spec = {"image/encoded": tf.io.VarLenFeature(tf.string),
            "image/class/label": tf.io.VarLenFeature(tf.int64),
            "image/filename": tf.io.VarLenFeature(tf.string)}

    def load(elem):
        record, source = elem
        is_gone = tf.equal(record, GONE)
        f = tf.io.parse_single_example(tf.where(is_gone, tf.constant(b""), record), spec)
        enc, lab = f["image/encoded"].values, f["image/class/label"].values
        data = tf.strings.reduce_join(enc[:1])
        raw = tf.reduce_sum(lab[:1])
        label = raw - offset
        # "the record of image x.JPEG in shard-path", or "a record in shard-path" without a name
        name = tf.strings.reduce_join(f["image/filename"].values[:1])
        record_in = tf.where(tf.strings.length(name) > 0,
                             tf.strings.join(["the record of image ", name, " in ", source]),
                             tf.strings.join(["a record in ", source]))
        missing = lambda key: problem(tf.strings.join([  # noqa: E731
            record_in, f" has no feature {key} (the standard ImageNet schema has "
            "image/encoded and image/class/label); rewrite the shards with 'knl-train data to-tfrecord'"]))
        bad_label = problem(tf.strings.join([
            "label ", tf.strings.as_string(raw), " of ", record_in, f" is outside [0, {n}) after "
            f"subtracting label_offset {offset} (got ", tf.strings.as_string(label),
            "); set data.label_offset (1 for TF's build_imagenet_data, 0 for 0-based labels) "
            "or data.num_classes to match the data"]))
        gone = problem(tf.strings.join([
            "TFRecord shard ", source, " no longer exists (deleted, moved or unmounted during the "
            "run?); restore it and rerun the same command to resume"]))
        why = tf.where(is_gone, gone, tf.where(
            tf.size(enc) == 0, missing("image/encoded"),
            tf.where(tf.size(lab) == 0, missing("image/class/label"),
                     tf.where((label < 0) | (label >= n), bad_label, tf.constant("")))))
        return data, tf.cast(label, tf.int32), why

    return load


def _source(elem):
    return elem[1]


def train_dataset(split: TFRecordSplit, *, rank: int, world: int, per_rank_batch: int, image_size: int,
                  seed: int, threads: int = 1, augment=None, skips=None,
                  shuffle_buffer: int = 1024, epoch=0, skip_batches=0, num_batches=None,
                  inner: bool = False):
    """Like ``folder.train_dataset``: epoch ``epoch`` from batch ``skip_batches`` on, 0-based
    labels, bad images skipped and counted, tagged errors for schema and label problems (wrap
    iteration in ``pipeline.user_errors()`` to get them as ``UserError``). Skipped batches are
    read (the shuffle buffer must replay) but not decoded."""
    from knl_train.data.pipeline import train_batches
    ds = _records(split, rank=rank, world=world, seed=seed, epoch=epoch, threads=threads,
                  shuffle_buffer=shuffle_buffer).skip(skip_batches * per_rank_batch)
    # Runs on in a fixed order if skipped images leave a rank short (see folder.train_dataset).
    ds = ds.concatenate(_records(split, rank=rank, world=world, seed=None, threads=threads).repeat())
    return train_batches(ds, _loader(split), name=_source, where=os.path.dirname(split.files[0]),
                         size=len(split), rank=rank, world=world,
                         per_rank_batch=per_rank_batch, image_size=image_size, seed=seed,
                         threads=threads, augment=augment, skips=skips, epoch=epoch,
                         skip_batches=skip_batches, num_batches=num_batches, inner=inner)


def eval_dataset(split: TFRecordSplit, *, rank: int, world: int, batch: int, image_size: int,
                 threads: int = 1, augment=None, skips=None, cache: bool = False):
    from knl_train.data.pipeline import eval_batches
    ds = _records(split, rank=rank, world=world, seed=None, threads=threads)
    return eval_batches(ds, _loader(split), name=_source, batch=batch, image_size=image_size,
                        threads=threads, augment=augment, skips=skips, cache=cache)

