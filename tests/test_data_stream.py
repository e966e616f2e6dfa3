"""Streamed data: image folders and TFRecord shards read as tf.data pipelines, the same stream for
training, calibration and fidelity, and one DataError line (exit code 6) for each bad input."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keffconvert.cli import cli
from keffconvert.data.sources import load_dataset, open_data
from keffconvert.data.stream import StreamDataset, data_errors
from keffconvert.errors import DataError
from keffconvert.data.tfrecords import write_shard


def write_folder(root, classes=3, per_class=10, size=12, seed=0, suffix=".png"):
    """A folder of per-class images whose pixels encode their class (so a mislabelled image shows)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8) + np.uint8(60 * c)
            Image.fromarray(image).save(root / f"c{c}" / f"{i}{suffix}")
    return root


def records(count=40, classes=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    images = rng.integers(0, 40, (count, size, size, 3), dtype=np.uint8) + (60 * labels).astype(np.uint8)[:, None, None, None]
    return images, labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("stream") / "images")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images, labels = records()
    write_shard(root / "toy-train.tfrecord-00000-of-00002", images[:20], labels[:20])
    write_shard(root / "toy-train.tfrecord-00001-of-00002", images[20:], labels[20:])
    write_shard(root / "toy-test.tfrecord-00000-of-00001", images[:8], labels[:8])
    return root, images, labels


def test_folder_is_streamed_with_splits_from_the_file_list(folder):
    data = open_data(folder, (8, 8), 3, seed=0)
    assert isinstance(data, StreamDataset)
    assert data.sizes == {"train": 21, "val": 3, "test": 6}  # 20% test, then 10% of the rest, per class
    assert all(np.bincount(data.labels(s), minlength=3).min() > 0 for s in ("train", "val", "test"))
    again = open_data(folder, (8, 8), 3, seed=0)
    other = open_data(folder, (8, 8), 3, seed=1)
    assert list(again.splits["test"].paths) == list(data.splits["test"].paths)
    assert list(other.splits["test"].paths) != list(data.splits["test"].paths)
    splits = [set(data.splits[s].paths) for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == 30 and len(set.union(*splits)) == 30  # disjoint


def test_streamed_pixels_match_the_in_memory_resize(folder):
    from keffconvert.data.images_tf import fit_images

    data = open_data(folder, (8, 8), 3, seed=0)
    paths = data.splits["test"].paths
    expected = fit_images(np.stack([np.asarray(Image.open(p)) for p in paths]), 8, 8, 3)
    got = data.sample(("test",))
    assert got.dtype == np.uint8 and got.shape == (6, 8, 8, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # same bilinear resize, rounded
    gray = open_data(folder, (8, 8), 1, seed=0).sample(("test",), 2)
    assert gray.shape == (2, 8, 8, 1)


def test_training_pipeline_reshuffles_each_epoch_and_is_seeded(folder):
    data = open_data(folder, (8, 8), 3, seed=0)

    def epochs(seed, count=2):
        ds = data.pipeline("train", 32, scale="unit", training=True, seed=seed)
        return [np.concatenate([b.numpy() for _, b in ds]) for _ in range(count)]

    first, second = epochs(5)
    assert sorted(first) == sorted(data.labels("train")) and not np.array_equal(first, second)
    assert all(np.array_equal(a, b) for a, b in zip(epochs(5), (first, second)))
    x, _ = next(iter(data.pipeline("val", 2, scale="unit")))
    assert x.dtype.name == "float32" and float(x.numpy().max()) <= 1.0
    endless = data.pipeline("train", 8, training=True, repeat=True)
    assert len(list(endless.take(7))) == 7  # 21 images give 3 batches a pass; repeat goes on
    cached = data.pipeline("train", 32, training=True, seed=5, cache="memory")
    passes = [np.concatenate([b.numpy() for _, b in cached]) for _ in range(2)]
    assert all(sorted(p) == sorted(data.labels("train")) for p in passes) and not np.array_equal(*passes)


def test_sample_draws_the_same_images_as_the_in_memory_data(folder):
    stream = open_data(folder, (8, 8), 3, seed=0)
    memory = load_dataset(folder, (8, 8), 3, seed=0)
    assert np.array_equal(stream.sample(("train", "val"), 7, seed=3), memory.sample(("train", "val"), 7, seed=3))
    assert np.array_equal(memory.x_test, stream.sample(("test",)))


def test_calibration_and_fidelity_read_the_folder_through_the_stream(folder):
    import keras

    from keffconvert.data.model_inputs import calibration_sets, probe_source

    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inp)))
    images = calibration_sets(folder, model, samples=5, held_out=4, seed=2)
    calibration = np.concatenate(list(images.calibration.batches(2)))
    held_out = np.concatenate(list(images.held_out.batches(3)))
    assert calibration.shape == (5, 8, 8, 3) and held_out.shape == (4, 8, 8, 3)
    every = open_data(folder, (8, 8), 3, seed=0)
    decoded = np.concatenate([every.sample((s,)) for s in ("train", "val", "test")]).astype("float32") / 255.0
    # 'unit' pixels (the model does not rescale), each image one of the folder's, none in both sets
    rows = [int(np.flatnonzero(np.all(decoded == image, axis=(1, 2, 3)))[0]) for image in [*calibration, *held_out]]
    assert len(set(rows)) == 9
    probe = probe_source(str(folder), model, limit=3)
    assert len(probe) == 3 and probe.labels is not None and np.concatenate(list(probe.batches(8))).max() <= 1.0


def test_tfrecord_shards_by_split_name_and_by_glob(shards):
    root, images, labels = shards
    data = open_data(root, (8, 8), 3, seed=0)
    assert data.sizes == {"train": 36, "val": 4, "test": 8} and data.num_classes == 4
    train = data.splits["train"]
    assert np.array_equal(data.sample(("train",)), images[train.keep])  # PNG records, read back exactly
    assert np.array_equal(data.labels("train"), labels[train.keep])
    batches = list(data.pipeline("train", 16, training=True, seed=1))
    assert sorted(np.concatenate([b.numpy() for _, b in batches])) == sorted(labels[train.keep])
    glob = open_data(str(root / "*-train.tfrecord-*"), (8, 8), 3, seed=0)
    assert glob.sizes == {"train": 28, "val": 4, "test": 8}  # test held out of the training records
    held = set(glob.splits["test"].keep)
    assert not held & set(glob.splits["train"].keep) and np.bincount(glob.labels("test")).tolist() == [2, 2, 2, 2]


def _not_a_record(root):
    images, labels = records(8)
    write_shard(root / "d-train.tfrecord-00000-of-00002", images, labels)
    (root / "d-train.tfrecord-00001-of-00002").write_bytes(b"these bytes are no TFRecord at all" * 4)
    return root, "d-train.tfrecord-00001-of-00002: not a TFRecord file"


def _no_image_key(root):
    images, labels = records(8)
    write_shard(root / "d-train.tfrecord", images, labels, image_key="image/png")
    return root / "d-train.tfrecord", "has no 'image/encoded' feature"


def _one_class(root):
    images, _ = records(8)
    write_shard(root / "d-train.tfrecord", images, np.zeros(8, int))
    return root / "d-train.tfrecord", "only one class"


def _empty_folder(root):
    (root / "nothing").mkdir()
    return root / "nothing", "is empty"


@pytest.mark.parametrize("case", [_not_a_record, _no_image_key, _one_class, _empty_folder])
def test_bad_streamed_data_is_one_line_exit_6_and_writes_nothing(case, tmp_path):
    data, expected = case(tmp_path)
    result = CliRunner().invoke(cli, ["train", "efficientnetb0", "--data", str(data), "--image-size", "16",
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 6, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_image_key_option_reads_other_feature_names(tmp_path):
    images, labels = records(20, classes=2)
    write_shard(tmp_path / "d-train.tfrecord", images, labels, image_key="png", label_key="y")
    data = open_data(tmp_path / "d-train.tfrecord", (8, 8), 3, seed=0, image_key="png", label_key="y")
    assert sum(data.sizes.values()) == 20 and data.num_classes == 2


def test_an_undecodable_image_mid_stream_is_named(tmp_path):
    root = write_folder(tmp_path / "bad", classes=2, per_class=6)
    (root / "c1" / "notes.jpg").write_text("not an image, only named like one")
    (root / "c0" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n the body is gone")
    data = open_data(root, (8, 8), 3, seed=0)
    with pytest.raises(DataError, match=r"cannot decode image .*(notes\.jpg|cut\.png)"):
        with data_errors(data):
            for _ in data.pipeline("train", 4, training=True):
                pass
    (root / "c1" / "notes.jpg").unlink()  # the one a header check cannot catch: found by a scan
    data = open_data(root, (8, 8), 3, seed=0)
    with pytest.raises(DataError, match=r"cannot decode image .*cut\.png"):
        data.sample(("train", "val", "test"))


def test_train_steps_per_epoch_on_a_streamed_folder(folder, tmp_path):
    import json

    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(64, 1, activation="relu", name="expand")(x)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inp, out, name="tiny").save(tmp_path / "tiny.keras")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "tiny.keras"), "--data", str(folder), "--epochs", "1",
                                      "--steps-per-epoch", "2", "--batch-size", "4", "--heatmaps", "0",
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, (result.output, result.stderr)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["recipe"]["steps_per_epoch"] == 2 and report["data"]["streamed"]
    assert len(report["models"][-1]["history"]) == 1 and 0 <= report["models"][-1]["test_accuracy"] <= 1


def test_one_resampling_resize_and_augment_matches_the_plain_resize_and_stays_in_range(folder):
    import tensorflow as tf

    from keffconvert.data.stream import resize_and_augment
    from keffconvert.data.images_tf import augmenter

    image = tf.constant(np.asarray(Image.open(folder / "c1" / "0.png")))
    plain = tf.image.resize(tf.cast(image, tf.float32), (20, 28), method="bilinear")
    same = resize_and_augment(image, 20, 28, 0.0, 0.0, False)
    assert np.allclose(same.numpy()[1:-1, 1:-1], plain.numpy()[1:-1, 1:-1], atol=1e-3)  # edges: fill mode
    flipped = resize_and_augment(image, 20, 28, 0.0, 0.0, True).numpy()[1:-1, 1:-1]  # flipped or not, at random
    assert np.allclose(flipped, plain.numpy()[:, ::-1][1:-1, 1:-1], atol=1e-3) or np.allclose(
        flipped, plain.numpy()[1:-1, 1:-1], atol=1e-3)
    moved = resize_and_augment(image, 20, 28, 0.2, 0.2, False).numpy()
    assert moved.min() >= 60 and moved.max() <= 60 + 40  # class 1's pixel range: nearest fill, no black edges
    data = open_data(folder, (16, 16), 3, seed=0)
    batches = list(data.pipeline("train", 8, scale="unit", training=True, augment=augmenter(0.1, 0.1)))
    labels = np.concatenate([b.numpy() for _, b in batches])
    assert sorted(labels) == sorted(data.labels("train")) and batches[0][0].shape[1:] == (16, 16, 3)
    for x, y in batches:  # each image keeps its class's pixel range: labels travel with their images
        means = x.numpy().mean(axis=(1, 2, 3)) * 255
        assert np.all(np.abs(means - (60 * y.numpy() + 20)) < 12)
