"""Training data: splits, sources, and one clear DataError line (exit code 6) for each bad input."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keffconvert.cli import cli
from keffconvert.data.sources import load_dataset
from keffconvert.data.splits import stratified_split
from keffconvert.errors import DataError


def tiny_model(size=16, classes=10):
    import keras

    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="stem")(x)
    x = keras.layers.Conv2D(64, 1, activation="relu", name="expand")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="tiny")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_model().save(path)
    return path


def write_images(folder, count, size=12, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def good_npz(path, n_train=60, n_test=20, classes=10, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((n_train, 8, 8)).astype("float32"),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.random((n_test, 8, 8)).astype("float32"),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# Splits


def test_stratified_split_holds_out_each_class_in_proportion_and_is_seeded():
    y = np.repeat(np.arange(4), [50, 30, 10, 2])
    kept, held = stratified_split(y, 0.2, seed=3)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(y)
    assert [int((y[held] == c).sum()) for c in range(4)] == [10, 6, 2, 0]  # 2 * 0.2 rounds to 0
    again_kept, again_held = stratified_split(y, 0.2, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, stratified_split(y, 0.2, seed=4)[1])


def test_digits_splits_are_disjoint_stratified_and_sized():
    data = load_dataset("digits", (16, 16), 3, val_split=0.1, test_split=0.2, seed=0)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 1797
    assert abs(len(data.y_test) - 0.2 * 1797) <= 10
    assert abs(len(data.y_val) - 0.1 * (1797 - len(data.y_test))) <= 10
    assert data.x_train.shape[1:] == (16, 16, 3) and data.x_train.dtype == np.uint8
    assert data.num_classes == 10 and set(np.unique(data.y_test)) == set(range(10))
    # no image of the test split appears in training (the digits have few exact duplicates; compare sets)
    train = {x.tobytes() for x in data.x_train}
    assert sum(x.tobytes() in train for x in data.x_test) <= 5
    assert "never used for model selection" in data.description["test_source"]


def test_npz_in_unit_range_with_one_hot_labels(tmp_path):
    y_train = np.eye(3)[np.arange(30) % 3]
    path = good_npz(tmp_path / "d.npz", n_train=30, n_test=9, classes=3, y_train=y_train)
    data = load_dataset(path, (8, 8), 3, seed=0)
    assert data.num_classes == 3 and data.x_train.max() > 200  # [0, 1] floats scaled to 0..255
    assert len(data.y_train) + len(data.y_val) == 30 and len(data.y_test) == 9
    assert "the file's x_test" in data.description["test_source"]


def test_folder_without_test_split_holds_one_out_and_says_so(tmp_path):
    for name in ("cat", "dog"):
        write_images(tmp_path / "pets" / name, 10)
    data = load_dataset(tmp_path / "pets", (8, 8), 3, test_split=0.2, seed=0)
    assert data.class_names == ["cat", "dog"] and len(data.y_test) == 4
    assert "has no test split" in data.description["test_source"]


def test_folder_with_train_and_test_folders_uses_them(tmp_path):
    for split, count in (("train", 10), ("test", 3)):
        for name in ("a", "b"):
            write_images(tmp_path / "d" / split / name, count)
    data = load_dataset(tmp_path / "d", (8, 8), 3, seed=0)
    assert len(data.y_test) == 6 and len(data.y_train) + len(data.y_val) == 20


# ---------------------------------------------------------------------------------------------
# Bad data: one line, exit code 6


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "is empty"


def _one_class(tmp_path):
    write_images(tmp_path / "one" / "cat", 4)
    return tmp_path / "one", "only one class"


def _undecodable(tmp_path):
    for name in "abcdefghij":  # the model's 10 classes: the file is only read while training
        write_images(tmp_path / "bad" / name, 10)
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path / "bad", "broken.png"


def _mismatched(tmp_path):
    return good_npz(tmp_path / "m.npz", y_train=np.arange(50) % 10), "x_train has 60 images but y_train has 50 labels"


def _shapes(tmp_path):
    return good_npz(tmp_path / "s.npz", x_test=np.zeros((20, 9, 9), "float32")), "x_test images have shape"


def _out_of_range(tmp_path):
    return good_npz(tmp_path / "r.npz", y_test=np.full(20, 12)), "holds label 12, out of range 0..9"


def _negative(tmp_path):
    labels = np.arange(60) % 10
    labels[5] = -1
    return good_npz(tmp_path / "n.npz", y_train=labels), "holds label -1"


def _one_label(tmp_path):
    return good_npz(tmp_path / "o.npz", y_train=np.zeros(60, int), y_test=np.zeros(20, int)), "only one class"


def _missing_key(tmp_path):
    np.savez(tmp_path / "k.npz", x_train=np.zeros((4, 8, 8)), y_train=np.arange(4))
    return tmp_path / "k.npz", "lacks x_test, y_test"


def _wrong_classes(tmp_path):
    return good_npz(tmp_path / "c.npz", classes=4), "the model has 10 outputs but the data has 4 classes"


def _nothing(tmp_path):
    return tmp_path / "nowhere", "no such data"


@pytest.mark.parametrize("case", [_empty, _one_class, _undecodable, _mismatched, _shapes, _out_of_range, _negative,
                                  _one_label, _missing_key, _wrong_classes, _nothing])
def test_bad_data_is_one_line_and_exit_code_6(case, tmp_path, model_file):
    data, expected = case(tmp_path)
    result = CliRunner().invoke(cli, ["train", str(model_file), "--data", str(data), "--epochs", "1",
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 6, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keffconvert: error: "), result.stderr
    assert expected in lines[0]
    if case is _undecodable:  # found while streaming: the run folder is kept, to resume once fixed
        assert "cannot decode image" in lines[0]
    else:
        assert not (tmp_path / "run").exists()  # nothing written, so a corrected command is not refused


def test_bad_data_from_python_raises_data_error(tmp_path):
    path = good_npz(tmp_path / "bad.npz", x_train=np.full((60, 8, 8), np.nan, "float32"))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(path, (8, 8), 3)
