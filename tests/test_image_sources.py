"""Calibration and fidelity data as users have it: no labels needed, the classes are the model's."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from keffconvert.cli import cli
from keffconvert.data.model_inputs import calibration_sets, probe_source
from keffconvert.errors import DataError
from keffconvert.report.fidelity import agreement

SIZE = 16


def classifier(classes=10, size=SIZE, seed=0):
    """A small CNN with a Rescaling input (it takes 0..255 pixels) and two eligible 1x1 convs."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="mix")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="mix2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="head")(x), name="net")


def photos(folder, count, seed=0, size=20):
    """`count` RGB images of another size than the model's (they are resized), flat in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"n{i:04d}.jpg")
    return folder


def test_a_flat_folder_of_unlabelled_images_calibrates_with_disjoint_held_out_images(tmp_path):
    sets = calibration_sets(photos(tmp_path / "flat", 30), classifier(), samples=20, held_out=8)
    assert len(sets.calibration) == 20 and len(sets.held_out) == 8
    assert sets.calibration.labels is None
    calibration = np.concatenate(list(sets.calibration.batches(7)))
    held_out = np.concatenate(list(sets.held_out.batches(7)))
    assert calibration.shape == (20, SIZE, SIZE, 3) and calibration.max() > 1.0  # raw 0..255: the model rescales
    assert not any(np.array_equal(a, b) for a in calibration for b in held_out)


def test_a_small_pool_keeps_a_fifth_of_its_images_for_agreement(tmp_path):
    sets = calibration_sets(photos(tmp_path / "few", 10), classifier(), samples=512)
    assert (len(sets.calibration), len(sets.held_out)) == (8, 2)


def test_an_npz_of_x_alone_and_a_thousand_class_model_take_labels_from_the_model_not_the_data(tmp_path):
    """The reported case: train labels even, test labels odd, classes 0..999 -- calibration reads
    no label at all, and fidelity measures both models' accuracy on the labels the data has."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=x)
    np.savez(tmp_path / "split.npz", x_train=x[:16], y_train=2 * np.arange(16), x_test=x[16:], y_test=999 - 2 * np.arange(8))
    model = classifier(classes=1000)
    assert len(calibration_sets(tmp_path / "x.npz", model, samples=16).calibration) == 16
    sets = calibration_sets(tmp_path / "split.npz", model, samples=16)
    assert len(sets.calibration) == 16 and len(sets.held_out) == 8  # the file's own test images
    measured = agreement(model, model, sets.held_out)
    assert measured["top1_agreement"] == 1.0
    predicted = model.predict(x[16:], verbose=0).argmax(1)
    assert measured["original_top1"] == pytest.approx(np.mean(predicted == 999 - 2 * np.arange(8)))


def test_labels_beyond_the_models_outputs_are_refused_where_accuracy_is_measured(tmp_path):
    x = np.random.default_rng(1).integers(0, 255, (6, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 3, 4, 12]))
    model = classifier(classes=10)
    with pytest.raises(DataError, match="labels go to 12, but the model has 10 outputs"):
        agreement(model, model, probe_source(tmp_path / "d.npz", model))


@pytest.mark.parametrize("make, message", [
    (lambda d: np.savez(d / "bad.npz", x=np.zeros((4, 8, 8, 3))), "shape (8, 8, 3); the model takes (16, 16, 3)"),
    (lambda d: np.savez(d / "bad.npz", x=np.full((4, SIZE, SIZE, 3), np.nan)), "NaN or infinite"),
    (lambda d: np.savez(d / "bad.npz", x=np.zeros((4, SIZE, SIZE, 2))), "C 1, 3 or 4"),
    (lambda d: np.savez(d / "bad.npz", labels=np.zeros(3)), "holds no images"),
    (lambda d: (d / "bad").mkdir(), "is empty"),
])
def test_bad_calibration_data_is_one_line_exit_6_and_nothing_is_written(tmp_path, make, message):
    make(tmp_path)
    data = tmp_path / ("bad" if not (tmp_path / "bad.npz").exists() else "bad.npz")
    model_path = tmp_path / "net.keras"
    classifier().save(model_path)
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(cli, [str(model_path), "--calibration", str(data), "-o", str(out)])
    assert result.exit_code == 6, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_the_cli_calibrates_on_a_flat_folder_and_measures_fidelity_on_another_with_labels(tmp_path):
    model_path = tmp_path / "net.keras"
    classifier().save(model_path)
    rng = np.random.default_rng(2)
    probe = rng.integers(0, 255, (12, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "probe.npz", x=probe, y=np.arange(12) % 10)
    out, report = tmp_path / "net_keff.keras", tmp_path / "plan.json"
    result = CliRunner().invoke(cli, [str(model_path), "-c", "8", "--calibration", str(photos(tmp_path / "flat", 24)),
                                      "--fidelity-data", str(tmp_path / "probe.npz"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert out.exists()
    fidelity = json.loads(report.read_text())["plan"]["fidelity"]
    assert fidelity["samples"] == 12 and fidelity["held_out"] is False
    assert 0.0 <= fidelity["converted_top1"] <= 1.0 and "top-1 accuracy on their labels" in result.output


class _Halves:
    """A batch source of the API: `__len__` and re-readable `batches(batch_size)`."""

    def __init__(self, images):
        self.images, self.reads = images, 0

    def __len__(self):
        return len(self.images)

    def batches(self, batch_size):
        self.reads += 1
        for start in range(0, len(self.images), batch_size):
            yield self.images[start:start + batch_size]


def test_the_api_takes_a_batch_source_and_refuses_a_generator_in_one_line():
    import keffconvert

    x = np.random.default_rng(3).uniform(0, 255, (24, SIZE, SIZE, 3)).astype("float32")
    source = _Halves(x)
    from_source, _ = keffconvert.convert(classifier(), 8, calibration=keffconvert.Calibration(source, batch_size=8))
    from_array, _ = keffconvert.convert(classifier(), 8, calibration=keffconvert.Calibration(x, batch_size=8))
    assert source.reads >= 1
    np.testing.assert_allclose(from_source.predict(x, verbose=0), from_array.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(DataError, match="got an iterator, which can be read once"):
        keffconvert.convert(classifier(), 8, calibration=keffconvert.Calibration(batch for batch in [x[:8], x[8:]]))
