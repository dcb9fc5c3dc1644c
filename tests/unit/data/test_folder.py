"""The sharded JPEG folder reader (knl_train/data/folder.py): listing and scanning, the train and
eval pipelines per rank, and bad images skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knl_train.data import folder
from knl_train.data.demo import DemoSpec, make_demo, wnid
from knl_train.errors import UserError

SPEC = DemoSpec(classes=3, train_per_class=4, val_per_class=2, size=24, seed=1)


# ---- a small demo dataset, written once -------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ds"
    assert make_demo(out, SPEC, progress=False) is True
    return out


# ---- folder: listing and scanning -----------------------------------------------------------------
def _touch(root, *rels):
    for rel in rels:
        p = Path(root) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_list_classes_is_sorted_and_ignores_files(tmp_path):
    for w in ("n03", "n01", "n10", "n02"):
        (tmp_path / "train" / w).mkdir(parents=True)
    _touch(tmp_path, "train/README.txt")
    assert folder.list_classes(tmp_path) == ["n01", "n02", "n03", "n10"]


def test_scan_lists_images_per_class_in_order(tmp_path):
    _touch(tmp_path, "train/b/2.JPEG", "train/b/1.jpg", "train/a/z.png", "train/a/notes.txt",
           "train/a/y.JPG")
    classes = folder.list_classes(tmp_path)
    assert classes == ["a", "b"]
    split = folder.scan(tmp_path, "train", classes)
    t = tmp_path / "train"
    assert split.files == (str(t / "a/y.JPG"), str(t / "a/z.png"), str(t / "b/1.jpg"), str(t / "b/2.JPEG"))
    assert split.labels == (0, 0, 1, 1)
    assert split.classes == ("a", "b") and len(split) == 4


def test_scan_of_the_demo_matches_its_layout(demo):
    classes = folder.list_classes(demo)
    train, val = folder.scan(demo, "train", classes), folder.scan(demo, "val", classes)
    assert (len(train), len(val)) == (12, 6)
    assert train.labels == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert val.labels == (0, 0, 1, 1, 2, 2)
    assert all(Path(f).parent.name == classes[y] for f, y in zip(val.files, val.labels))


def test_missing_dataset_path(tmp_path):
    with pytest.raises(UserError, match=f"dataset path {tmp_path / 'nope'} does not exist.*make-demo"):
        folder.list_classes(tmp_path / "nope")


def test_no_train_directory(tmp_path):
    (tmp_path / "val" / "n01").mkdir(parents=True)
    with pytest.raises(UserError, match=f"{tmp_path} has no train/ directory"):
        folder.list_classes(tmp_path)


def test_no_class_directories(tmp_path):
    _touch(tmp_path, "train/img.JPEG")
    with pytest.raises(UserError, match="holds no class directories"):
        folder.list_classes(tmp_path)


def test_empty_class_directory_is_named(tmp_path):
    _touch(tmp_path, "train/n01/a.JPEG", "train/n02/readme.txt")
    classes = folder.list_classes(tmp_path)
    with pytest.raises(UserError) as e:
        folder.scan(tmp_path, "train", classes)
    assert str(tmp_path / "train" / "n02") in str(e.value) and "holds no images" in str(e.value)


def test_val_missing_a_class_or_missing_entirely(tmp_path):
    _touch(tmp_path, "train/n01/a.JPEG", "train/n02/b.JPEG")
    classes = folder.list_classes(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path} has no val/ directory"):
        folder.scan(tmp_path, "val", classes)
    _touch(tmp_path, "val/n01/a.JPEG")
    with pytest.raises(UserError) as e:
        folder.scan(tmp_path, "val", classes)
    assert str(tmp_path / "val" / "n02") in str(e.value) and "missing" in str(e.value)


# ---- folder: the sharded tf.data pipelines --------------------------------------------------------
PIPE_SPEC = DemoSpec(classes=3, train_per_class=7, val_per_class=3, size=16, seed=5)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """21 train and 9 val images of 16 px, with reference images decoded straight from the files."""
    import tensorflow as tf
    root = tmp_path_factory.mktemp("pipe") / "ds"
    make_demo(root, PIPE_SPEC, progress=False)
    classes = folder.list_classes(root)
    train, val = folder.scan(root, "train", classes), folder.scan(root, "val", classes)

    def reference(split):
        imgs = [tf.cast(tf.io.decode_jpeg(tf.io.read_file(f), channels=3), tf.float32) for f in split.files]
        return ((np.stack(imgs) - np.array(folder.MEAN_RGB)) / np.array(folder.STDDEV_RGB)).astype(np.float32)

    return {"train": train, "val": val, "ref": {"train": reference(train), "val": reference(val)}}


def _identify(batches, refs, split, flips=False):
    """Which file each yielded image is (an index into split.files); checks its label too."""
    out = []
    for images, labels in batches:
        for img, label in zip(images.numpy(), labels.numpy()):
            err = np.abs(refs - img).max(axis=(1, 2, 3))
            if flips:  # training images may be mirrored left-right
                err = np.minimum(err, np.abs(refs - img[:, ::-1]).max(axis=(1, 2, 3)))
            i = int(err.argmin())
            assert err[i] < 1e-4, f"image matches no file (closest error {err[i]})"
            assert np.sort(err)[1] > 0.1, "two files look the same"
            assert int(label) == split.labels[i]
            out.append(i)
    return out


def _train(pipe, rank, seed=7, world=2, per_rank_batch=3, **kw):
    return folder.train_dataset(pipe["train"], rank=rank, world=world, per_rank_batch=per_rank_batch,
                                image_size=16, seed=seed, **kw)


def test_train_shards_are_disjoint_cover_the_epoch_and_reshuffle(pipe):
    split, refs = pipe["train"], pipe["ref"]["train"]
    steps, global_batch = len(split) // 6, 6
    assert steps == 3
    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(2):
            batches = list(_train(pipe, rank, epoch=epoch))
            assert len(batches) == steps
            assert all(tuple(b[0].shape) == (3, 16, 16, 3) for b in batches)
            shards.append(_identify(batches, refs, split, flips=True))
        a, b = shards
        assert len(a) == len(b) == steps * 3
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b), "ranks saw the same file in one epoch"
        assert len(set(a) | set(b)) == steps * global_batch  # 18 of the 21 files
        epochs.append(shards)
    assert epochs[0][0] != epochs[1][0] and epochs[0][1] != epochs[1][1], "epoch 2 repeats epoch 1"
    # A pipeline built afresh with the same seed (as every other rank builds it) has the same
    # epoch order...
    assert _identify(list(_train(pipe, 0)), refs, split, flips=True) == epochs[0][0]
    # ...which comes from the seed.
    assert _identify(list(_train(pipe, 0, seed=8)), refs, split, flips=True) != epochs[0][0]


def test_a_resumed_epoch_continues_with_the_same_images_and_augmentations(pipe):
    whole = [b[0].numpy() for b in _train(pipe, 1, epoch=3)]
    rest = [b[0].numpy() for b in _train(pipe, 1, epoch=3, skip_batches=1)]
    assert len(whole) == 3 and len(rest) == 2
    # Bit for bit: same files, same random flips (stateless seeds from the epoch position).
    assert all(a.tobytes() == b.tobytes() for a, b in zip(whole[1:], rest))
    assert len(list(_train(pipe, 1, epoch=3, skip_batches=1, num_batches=1))) == 1


def test_train_images_are_normalized_and_labelled(pipe):
    images, labels = next(iter(_train(pipe, 0)))
    assert images.dtype.name == "float32" and labels.dtype.name == "int32"
    assert -2.5 < float(images.numpy().min()) < 0 < float(images.numpy().max()) < 2.7
    assert set(labels.numpy().tolist()) <= {0, 1, 2}


def test_fewer_images_than_one_global_batch(pipe):
    with pytest.raises(UserError) as e:
        _train(pipe, 0, per_rank_batch=11)
    assert "21 images" in str(e.value) and "global batch of 22" in str(e.value)
    # Exactly one global batch is enough.
    assert len(list(_train(pipe, 1, world=3, per_rank_batch=7))) == 1


@pytest.mark.parametrize("world, batch", [(2, 2), (3, 4)])
def test_eval_shards_cover_every_val_file_exactly_once(pipe, world, batch):
    split, refs = pipe["val"], pipe["ref"]["val"]
    seen = []
    for rank in range(world):
        ds = folder.eval_dataset(split, rank=rank, world=world, batch=batch, image_size=16)
        seen += _identify(list(ds), refs, split)
    assert sorted(seen) == list(range(len(split))) == list(range(9))
    # Evaluation is not shuffled: rank r takes every world-th file in order.
    first = _identify(list(folder.eval_dataset(split, rank=0, world=world, batch=batch, image_size=16)),
                      refs, split)
    assert first == list(range(0, 9, world))


# ---- folder: bad images are skipped and counted -----------------------------------------------------
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The 3 x 7 pipe demo plus three bad files in class 0: zero-byte, truncated, garbage body."""
    root = tmp_path_factory.mktemp("damaged") / "ds"
    make_demo(root, PIPE_SPEC, progress=False)
    good = (root / "train" / wnid(0) / f"{wnid(0)}_0.JPEG").read_bytes()
    d = root / "train" / wnid(0)
    (d / "zero.JPEG").write_bytes(b"")
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (d / "garbage.JPEG").write_bytes(good[:20] + bytes(range(256)) * 2 + b"\xff\xd9")
    (root / "val" / wnid(1) / "zero.JPEG").write_bytes(b"")
    return root


def test_bad_images_are_skipped_and_counted(damaged):
    classes = folder.list_classes(damaged)
    train, val = folder.scan(damaged, "train", classes), folder.scan(damaged, "val", classes)
    assert len(train) == 24 and len(val) == 10
    skips = folder.SkipCounter()
    ds = folder.train_dataset(train, rank=0, world=1, per_rank_batch=4, image_size=16, seed=1, skips=skips)
    for epoch in range(2):
        batches = list(ds)  # the run goes on, with the full number of batches
        assert len(batches) == 6
        assert all(np.isfinite(b[0].numpy()).all() for b in batches)
    # All three were met in each epoch's pass; a bad file in the read-ahead counts early.
    assert 3 <= skips.count <= 9 and skips.take() >= 3 and skips.count == 0
    # Evaluation reads each file once: the count is exact, even for a bad file at the very end.
    eval_skips = folder.SkipCounter()
    n = sum(int(b[1].shape[0]) for b in folder.eval_dataset(train, rank=0, world=1, batch=5, image_size=16,
                                                             skips=eval_skips))
    assert (n, eval_skips.count) == (21, 3)
    vs = folder.SkipCounter()
    assert sum(int(b[1].shape[0]) for b in folder.eval_dataset(val, rank=0, world=1, batch=4, image_size=16,
                                                               skips=vs)) == 9
    assert vs.count == 1


def test_an_empty_val_directory_is_named(tmp_path):
    _touch(tmp_path, "train/n01/a.JPEG")
    (tmp_path / "val" / "n01").mkdir(parents=True)
    with pytest.raises(UserError, match=f"{tmp_path / 'val' / 'n01'} holds no images"):
        folder.scan(tmp_path, "val", folder.list_classes(tmp_path))


# ---- folder: JPEGs with trailing bytes, nothing usable, the directory gone --------------------------
@pytest.fixture()
def small_demo(tmp_path):
    root = tmp_path / "ds"
    make_demo(root, DemoSpec(classes=2, train_per_class=6, val_per_class=1, size=16, seed=2),
              progress=False)
    classes = folder.list_classes(root)
    return root, classes


def _train_files(root):
    return sorted((Path(root) / "train").glob("*/*.JPEG"))


@pytest.mark.parametrize("augment", ["flip", "inception"])
def test_jpegs_with_bytes_after_their_end_marker_train_and_none_is_skipped(small_demo, augment):
    root, classes = small_demo
    split = folder.scan(root, "train", classes)
    clean = [b[0].numpy() for b in folder.train_dataset(split, rank=0, world=1, per_rank_batch=4,
                                                         image_size=16, seed=3, augment=augment)]
    for f in _train_files(root):  # what some cameras and editors leave after the EOI
        f.write_bytes(f.read_bytes() + b"\x00" * 64 + b"trailer")
    skips = folder.SkipCounter()
    trailed = [b[0].numpy() for b in folder.train_dataset(split, rank=0, world=1, per_rank_batch=4,
                                                           image_size=16, seed=3, augment=augment,
                                                           skips=skips)]
    assert len(trailed) == len(clean) == 3 and skips.count == 0
    assert all(a.tobytes() == b.tobytes() for a, b in zip(clean, trailed))


def _all_of_one_rank(split, **kw):
    """Iterate rank 1's training stream of a two-rank job as the trainer does, under user_errors."""
    from knl_train.data.pipeline import user_errors
    with user_errors():
        return list(folder.train_dataset(split, rank=1, world=2, per_rank_batch=2, image_size=16,
                                         seed=0, **kw))


def test_a_stream_with_no_usable_image_is_an_error_naming_the_directory_and_files(small_demo,
                                                                                 monkeypatch):
    from knl_train.data import pipeline
    monkeypatch.setattr(pipeline, "GIVE_UP", 40)
    root, classes = small_demo
    files = _train_files(root)
    for i, f in enumerate(files):  # empty, cut off, not an image, a header and garbage
        good = f.read_bytes()
        f.write_bytes([b"", good[: len(good) // 2], b"text" * 30,
                       good[:20] + b"\x00" * 99 + b"\xff\xd9"][i % 4])
    split = folder.scan(root, "train", classes)
    skips = folder.SkipCounter()
    with pytest.raises(UserError) as e:
        _all_of_one_rank(split, skips=skips)
    msg = str(e.value)
    assert f"none of the last 40 training images this rank read from {root / 'train'}" in msg
    named = [n for n in (str(f) for f in files) if n in msg]
    assert len(named) == 3, msg  # examples of the bad files
    assert skips.count >= 40  # the 40 at least (a gap counts when the next element comes)
    # One usable image in the rank's share is enough: the stream fills its batches with it.
    good_root = root.parent / "good"
    make_demo(good_root, DemoSpec(classes=2, train_per_class=6, val_per_class=1, size=16, seed=2),
              progress=False)
    kept = files[0]
    kept.write_bytes((good_root / kept.relative_to(root)).read_bytes())
    batches = folder.train_dataset(split, rank=0, world=1, per_rank_batch=2, image_size=16, seed=0)
    assert len(list(batches)) == 6


def test_the_data_directory_deleted_mid_run_is_a_one_line_error(small_demo, monkeypatch):
    import shutil

    from knl_train.data import pipeline
    monkeypatch.setattr(pipeline, "GIVE_UP", 40)
    root, classes = small_demo
    split = folder.scan(root, "train", classes)
    ds = folder.train_dataset(split, rank=0, world=1, per_rank_batch=2, image_size=16, seed=0,
                              num_batches=100)
    it = iter(ds)
    next(it)  # reading...
    shutil.rmtree(root)  # ...when the data goes away
    with pytest.raises(UserError) as e, pipeline.user_errors():
        for _ in it:
            pass
    msg = str(e.value)
    assert msg.startswith(f"{root / 'train'} no longer exists") and "\n" not in msg
    assert "rerun the same command to resume" in msg
