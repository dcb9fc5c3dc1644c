"""TFRecord writer and reader (knl_train/data/tfrecord.py) in the standard ImageNet schema."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from knl_train.data import folder, tfrecord
from knl_train.data.demo import DemoSpec, make_demo
from knl_train.data.pipeline import as_user_message, user_errors
from knl_train.errors import UserError
from tests.support import run_cli

SPEC = DemoSpec(classes=3, train_per_class=8, val_per_class=3, size=16, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfr")
    src = base / "demo"
    make_demo(src, SPEC, progress=False)
    tfrecord.to_tfrecord(src, base / "rec4", shards=4, val_shards=2, progress=False)
    tfrecord.to_tfrecord(src, base / "rec3", shards=3, val_shards=3, label_offset=0, progress=False)
    classes = folder.list_classes(src)
    return {"src": src, "base": base, "classes": classes,
            "train": folder.scan(src, "train", classes), "val": folder.scan(src, "val", classes)}


def _folder_set(split):
    return sorted((Path(f).read_bytes(), y) for f, y in zip(split.files, split.labels))


def read_examples(split):
    """Every (encoded bytes, 0-based label) of ``split`` in file order, through the reader's own
    record parser (schema and label problems raise the reader's UserError)."""
    load = tfrecord._loader(split)
    out = []
    for record, source in tfrecord._records(split, rank=0, world=1, seed=None, threads=1):
        data, label, why = load((record, source))
        if why.numpy():
            raise UserError(as_user_message(why.numpy().decode()))
        out.append((data.numpy(), int(label.numpy())))
    return out


@pytest.mark.parametrize("rec", ["rec4", "rec3"])
def test_round_trip_yields_the_folder_examples(data, rec):
    for name, key in (("train", "train"), ("val", "val")):
        split = tfrecord.scan(data["base"] / rec, name)
        assert len(split) == len(data[key]) and split.classes == tuple(data["classes"])
        assert sorted(read_examples(split)) == _folder_set(data[key])


def test_records_hold_the_standard_schema_with_1_based_labels(data):
    path = data["base"] / "rec4" / "train-00000-of-00004"
    raw = next(iter(tf.data.TFRecordDataset(str(path))))
    ex = tf.train.Example.FromString(raw.numpy()).features.feature
    for key in ("image/encoded", "image/format", "image/filename", "image/class/label",
                "image/class/synset", "image/height", "image/width"):
        assert key in ex, key
    label = ex["image/class/label"].int64_list.value[0]
    synset = ex["image/class/synset"].bytes_list.value[0].decode()
    assert 1 <= label <= 3 and data["classes"][label - 1] == synset
    assert ex["image/height"].int64_list.value[0] == 16
    # The 0-offset copy stores 0-based labels; both read back as the same 0-based labels.
    assert tfrecord.scan(data["base"] / "rec3", "train").label_offset == 0


def test_shard_assignment_is_deterministic_and_balanced(data, tmp_path):
    tfrecord.to_tfrecord(data["src"], tmp_path / "again", shards=4, val_shards=2, progress=False)
    for name in tfrecord.shard_names("train", 4):
        assert (tmp_path / "again" / name).read_bytes() == (data["base"] / "rec4" / name).read_bytes()
    sizes = [len(p) for p in tfrecord.assign(24, 5)]
    assert sum(sizes) == 24 and max(sizes) - min(sizes) <= 1


def _bytes_of(batches_images, refs):
    """Indices into refs of each yielded image (exact match, augment='none')."""
    out = []
    for images, labels in batches_images:
        for img, y in zip(images.numpy(), labels.numpy()):
            err = np.abs(refs[0] - img).max(axis=(1, 2, 3))
            i = int(err.argmin())
            assert err[i] < 1e-4 and refs[1][i] == y
            out.append(i)
    return out


def _refs(split):
    from knl_train.data import augment as aug
    imgs = np.stack([aug.eval_image(tf.constant(Path(f).read_bytes()), 16, aug.Augment()).numpy()
                     for f in split.files])
    return imgs, list(split.labels)


@pytest.mark.parametrize("rec", ["rec4", "rec3"])  # 4 shards: file-level sharding; 3: example-level
def test_sharding_is_disjoint_and_complete_across_two_ranks(data, rec):
    root = data["base"] / rec
    assert tfrecord._file_level(4, 2) and not tfrecord._file_level(3, 2)
    train, val = tfrecord.scan(root, "train"), tfrecord.scan(root, "val")
    refs_t, refs_v = _refs(data["train"]), _refs(data["val"])
    shards = [_bytes_of(tfrecord.train_dataset(train, rank=r, world=2, per_rank_batch=4, image_size=16,
                                               seed=5, augment="none", shuffle_buffer=8), refs_t)
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 24
    again = _bytes_of(tfrecord.train_dataset(train, rank=0, world=2, per_rank_batch=4, image_size=16,
                                             seed=5, augment="none", shuffle_buffer=8), refs_t)
    assert again == shards[0]  # deterministic for a seed
    seen = []
    for r in range(2):
        seen += _bytes_of(tfrecord.eval_dataset(val, rank=r, world=2, batch=2, image_size=16), refs_v)
    assert sorted(seen) == list(range(9))


def _write(path, features):
    with tf.io.TFRecordWriter(str(path)) as w:
        for feats in features:
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def _feature_bytes(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _feature_int(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))


def _iterate(split, **kw):
    with user_errors():
        for _ in tfrecord.train_dataset(split, rank=0, world=1, per_rank_batch=2, image_size=16, seed=0, **kw):
            pass


def test_missing_feature_is_a_clear_error(data, tmp_path):
    jpeg = Path(data["train"].files[0]).read_bytes()
    _write(tmp_path / "train-00000-of-00001",
           [{"image/encoded": _feature_bytes(jpeg), "image/class/label": _feature_int(1)}] * 3
           + [{"image/encoded": _feature_bytes(jpeg)}])
    split = tfrecord.scan(tmp_path, "train", num_classes=3)
    assert len(split) == 4  # counted without metadata
    with pytest.raises(UserError) as e:
        _iterate(split)
    msg = str(e.value)
    assert "image/class/label" in msg and "train-00000-of-00001" in msg and "to-tfrecord" in msg


def test_label_out_of_range_is_a_clear_error(data, tmp_path):
    jpeg = Path(data["train"].files[0]).read_bytes()
    _write(tmp_path / "train-00000-of-00001",
           [{"image/encoded": _feature_bytes(jpeg), "image/class/label": _feature_int(y)} for y in (1, 2, 3, 9)])
    with pytest.raises(UserError) as e:
        _iterate(tfrecord.scan(tmp_path, "train", num_classes=3))
    msg = str(e.value)
    assert "label 9" in msg and "[0, 3)" in msg and "label_offset 1" in msg
    # 0-based data read with the default offset of 1: label 0 becomes -1.
    with pytest.raises(UserError, match=r"label 0 .* outside \[0, 3\).*got -1"):
        _iterate(tfrecord.scan(data["base"] / "rec3", "train", label_offset=1))


def test_missing_paths_and_no_shards(tmp_path):
    with pytest.raises(UserError, match=f"dataset path {tmp_path / 'nope'} does not exist"):
        tfrecord.scan(tmp_path / "nope", "train")
    with pytest.raises(UserError, match="holds no train TFRecord shards"):
        tfrecord.scan(tmp_path, "train")
    with pytest.raises(UserError, match="does not exist"):
        tfrecord.to_tfrecord(tmp_path / "nope", tmp_path / "out", shards=2, progress=False)


def test_no_metadata_needs_num_classes(data, tmp_path):
    (tmp_path / "train-00000-of-00001").write_bytes((data["base"] / "rec4" / "train-00000-of-00004").read_bytes())
    with pytest.raises(UserError, match="num_classes"):
        tfrecord.scan(tmp_path, "train")


def test_fewer_examples_than_the_global_batch(data):
    split = tfrecord.scan(data["base"] / "rec4", "train")
    with pytest.raises(UserError) as e:
        tfrecord.train_dataset(split, rank=0, world=2, per_rank_batch=13, image_size=16, seed=0)
    assert "24 images" in str(e.value) and "global batch of 26" in str(e.value)


@pytest.mark.slow
def test_cli_to_tfrecord_in_parallel(data, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("data", "to-tfrecord", "--src", data["src"], "--out", out, "--shards", "2",
                   "--workers", "2", "--quiet", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 24 train examples in 2 shards" in proc.stdout
    assert sorted(read_examples(tfrecord.scan(out, "train"))) == _folder_set(data["train"])
    bad = run_cli("data", "to-tfrecord", "--src", tmp_path / "missing", "--out", out, "--shards", "2")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("rec", ["rec4", "rec3"])
def test_a_resumed_epoch_continues_where_it_left_off(data, rec):
    train = tfrecord.scan(data["base"] / rec, "train")
    refs_t = _refs(data["train"])
    kw = dict(rank=1, world=2, per_rank_batch=4, image_size=16, seed=5, augment="none",
              shuffle_buffer=8)
    whole = _bytes_of(tfrecord.train_dataset(train, epoch=2, **kw), refs_t)
    rest = _bytes_of(tfrecord.train_dataset(train, epoch=2, skip_batches=1, **kw), refs_t)
    assert len(whole) == 12 and rest == whole[4:]
    # Another epoch, another order.
    assert _bytes_of(tfrecord.train_dataset(train, epoch=3, **kw), refs_t) != whole


# ---- errors a rank meets in its own shard; unreadable sources at conversion -------------------------
def test_a_bad_label_in_rank_1s_shard_is_rank_1s_user_error(data, tmp_path):
    from knl_train import log as knl_log
    jpeg = Path(data["train"].files[0]).read_bytes()

    def shard(path, label):
        _write(path, [{"image/encoded": _feature_bytes(jpeg), "image/class/label": _feature_int(label),
                       "image/filename": _feature_bytes(f"img{k}.JPEG".encode())} for k in range(4)])

    names = [tmp_path / n for n in tfrecord.shard_names("train", 2)]
    for n in names:
        shard(n, 1)
    split = tfrecord.scan(tmp_path, "train", num_classes=3)
    kw = dict(world=2, per_rank_batch=2, image_size=16, seed=4)
    # Two files, two ranks: each rank reads one file per epoch; find rank 1's in epoch 0.
    (theirs,) = {s.numpy().decode() for _, s in tfrecord._records(split, rank=1, world=2, seed=4,
                                                                  threads=1)}
    shard(theirs, 7)  # outside [0, 3) after the offset of 1
    assert len(list(tfrecord.train_dataset(split, rank=0, **kw))) == 2  # rank 0's shard is fine
    with pytest.raises(UserError) as e, user_errors():
        for _ in tfrecord.train_dataset(split, rank=1, **kw):
            pass
    msg = str(e.value)
    assert re.match(rf"label 7 of the record of image img[0-3]\.JPEG in {re.escape(theirs)} is "
                    r"outside \[0, 3\)", msg), msg
    assert "\n" not in msg and "data.label_offset" in msg
    assert knl_log.seen_by_this_rank(e.value)  # this rank's to say


def test_a_shard_deleted_mid_run_is_a_one_line_error(data, tmp_path):
    import shutil
    root = tmp_path / "rec"
    shutil.copytree(data["base"] / "rec4", root)
    split = tfrecord.scan(root, "train")
    it = iter(tfrecord.train_dataset(split, rank=0, world=1, per_rank_batch=2, image_size=16,
                                     seed=0, num_batches=100))
    next(it)
    shutil.rmtree(root)
    with pytest.raises(UserError) as e, user_errors():
        for _ in it:
            pass
    msg = str(e.value)
    assert msg.startswith(f"TFRecord shard {root}/train-0000") and "no longer exists" in msg
    assert "\n" not in msg


def test_shards_with_no_usable_image_are_an_error_naming_them(tmp_path, monkeypatch):
    from knl_train.data import pipeline
    monkeypatch.setattr(pipeline, "GIVE_UP", 30)
    for name in tfrecord.shard_names("train", 2):
        _write(tmp_path / name, [{"image/encoded": _feature_bytes(b"not an image"),
                                  "image/class/label": _feature_int(1)}] * 5)
    with pytest.raises(UserError) as e:
        _iterate(tfrecord.scan(tmp_path, "train", num_classes=3))
    msg = str(e.value)
    assert msg.startswith(f"none of the last 30 training images this rank read from {tmp_path} could "
                          f"be read and decoded (e.g. {tmp_path}/train-0000")


def _damage(src, dst, bad):
    """A copy of the folder dataset ``src`` whose first ``bad`` train images are unreadable."""
    import shutil
    shutil.copytree(src, dst)
    files = sorted((dst / "train").glob("*/*.JPEG"))
    for i, f in enumerate(files[:bad]):
        good = f.read_bytes()
        f.write_bytes([b"", good[: len(good) // 2], b"not an image"][i % 3])
    return [str(f) for f in files[:bad]]


def test_to_tfrecord_leaves_out_unreadable_images_and_names_them(data, tmp_path, capsys):
    bad = _damage(data["src"], tmp_path / "src", 4)
    (tmp_path / "out").mkdir()
    meta = tfrecord.to_tfrecord(tmp_path / "src", tmp_path / "out", shards=2, progress=False)
    assert meta["splits"]["train"] == {"shards": 2, "examples": 20, "unreadable": 4}
    assert meta["splits"]["validation"]["unreadable"] == 0
    listed = (tmp_path / "out" / tfrecord.UNREADABLE).read_text().splitlines()
    assert listed == sorted(bad)
    err = capsys.readouterr().err
    assert f"knl-train: warning: left out 4 of 24 train images that cannot be read and decoded (e.g. " \
           f"{sorted(bad)[0]}" in err and str(tmp_path / "out" / tfrecord.UNREADABLE) in err
    split = tfrecord.scan(tmp_path / "out", "train")
    assert len(split) == 20 and len(read_examples(split)) == 20
    kept = {Path(f).read_bytes() for f in folder.scan(tmp_path / "src", "train", data["classes"]).files
            if f not in bad}
    assert {d for d, _ in read_examples(split)} == kept
    # Converted again after a fix, the stale list goes.
    for f in bad:
        Path(f).unlink()
    tfrecord.to_tfrecord(tmp_path / "src", tmp_path / "out", shards=2, progress=False)
    assert not (tmp_path / "out" / tfrecord.UNREADABLE).exists()


def test_to_tfrecord_fails_when_nothing_is_readable(data, tmp_path):
    _damage(data["src"], tmp_path / "src", len(data["train"]))
    proc = run_cli("data", "to-tfrecord", "--src", tmp_path / "src", "--out", tmp_path / "out",
                   "--shards", "2", "--quiet")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"knl-train: error: none of the 24 images in {tmp_path / 'src' / 'train'} can be read")
    assert "nothing was written" in lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
