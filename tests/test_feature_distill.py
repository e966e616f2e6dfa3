"""Feature distillation: which block outputs are matched, the tapped models, and the loss."""

import keras
import numpy as np
import pytest

import keffconvert
from keffconvert.train.feature_distill import feature_loss, matching_layers, tapped
from keffconvert.train.distill import Distiller
from tests.conftest import randomize, small_cnn


def expansion_into_add():
    """Two expansions (K without L: their channels may be reordered) summed, then a projection
    (with L: the original's order) added to the block input."""
    inp = keras.Input((8, 8, 32))
    a = keras.layers.Conv2D(64, 1, name="expand_a")(inp)
    b = keras.layers.Conv2D(64, 1, name="expand_b")(inp)
    x = keras.layers.Add(name="expansions")([a, b])
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.Conv2D(32, 1, name="project")(x)
    x = keras.layers.Add(name="residual")([x, inp])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x))


def test_matches_block_outputs_but_not_what_a_reordering_reaches():
    original = randomize(expansion_into_add())
    converted, _ = keffconvert.convert(original, channels_per_group=16)
    assert matching_layers(converted, original) == ["residual"]


def test_matches_every_residual_add_of_efficientnet(b0_small):
    converted, _ = keffconvert.convert(b0_small, channels_per_group=16)
    names = matching_layers(converted, b0_small)
    adds = [layer.name for layer in b0_small.layers if isinstance(layer, keras.layers.Add)]
    assert names == adds and len(names) == 9


def test_taps_reach_into_nested_models_and_share_the_weights():
    base = randomize(small_cnn())
    model = keras.Sequential([keras.Input((16, 16, 3)), base, keras.layers.Dense(2, name="outer")])
    taps = tapped(model, ["residual"])
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    output, residual = taps(x)
    np.testing.assert_allclose(output, model(x), rtol=1e-5, atol=1e-6)
    inner = keras.Model(base.inputs, base.get_layer("residual").output)
    np.testing.assert_allclose(residual, inner(x), rtol=1e-5, atol=1e-6)
    head = base.get_layer("head")
    head.set_weights([w * 2 for w in head.get_weights()])
    np.testing.assert_allclose(taps(x)[0], model(x), rtol=1e-5, atol=1e-6)


def test_feature_loss_is_the_mean_relative_error_of_the_points():
    rng = np.random.default_rng(0)
    t = [rng.normal(2.0, 3.0, (4, 5, 5, 6)).astype("float32"), rng.normal(size=(4, 7)).astype("float32")]
    assert float(feature_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    s = [t[0] + 1.0, t[1]]  # an error of 1 everywhere on the first point, none on the second
    spread = np.mean((t[0] - t[0].mean(axis=(0, 1, 2))) ** 2)  # about each channel's own mean
    assert float(feature_loss(s, t)) == pytest.approx((1.0 / spread + 0.0) / 2, rel=1e-4)


def test_distiller_adds_the_feature_term_with_its_own_weight():
    teacher = randomize(small_cnn(), seed=1)
    student, _ = keffconvert.convert(teacher, channels_per_group=16)
    x = np.random.default_rng(2).normal(size=(8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 4
    losses = {}
    for feature_weight in (0.0, 2.0):
        trainer = Distiller(student, teacher, temperature=4.0, weight=0.5, feature_weight=feature_weight)
        trainer.compile(loss=keras.losses.SparseCategoricalCrossentropy())
        y_pred = trainer(x, training=True)
        losses[feature_weight] = float(trainer.compute_loss(x=x, y=y, y_pred=y_pred, training=True))
    assert trainer.feature_points == ["residual"]
    taps_s = tapped(student, ["residual"])(x, training=True)
    taps_t = tapped(teacher, ["residual"])(x, training=False)
    features = float(feature_loss(taps_s[1:], taps_t[1:]))
    cross_entropy = float(keras.losses.SparseCategoricalCrossentropy()(y, taps_s[0]))
    soft = float(trainer.distillation_loss(taps_s[0], taps_t[0]))
    assert features > 0.01 and soft > 0.01
    assert losses[0.0] == pytest.approx(0.5 * cross_entropy + 0.5 * soft, rel=1e-4)
    assert losses[2.0] == pytest.approx(0.5 * cross_entropy + 0.5 * soft + 2.0 * features, rel=1e-4)


def test_a_distiller_matching_block_outputs_is_backed_up_and_restored(tmp_path):
    from keffconvert.train.backup import AtomicBackupAndRestore

    teacher = randomize(small_cnn(), seed=1)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 32)

    students = [keffconvert.convert(teacher, channels_per_group=16)[0] for _ in range(2)]  # before the
    # Distiller freezes the teacher (a conversion copies the trainable flags)

    def distiller(student):
        trainer = Distiller(student, teacher, weight=0.5, feature_weight=0.5)
        trainer.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy())
        trainer(x[:1])
        return trainer

    trained = distiller(students[0])
    start = trained.student.get_weights()
    trained.fit(x, y, batch_size=8, epochs=1, verbose=0,
                callbacks=[AtomicBackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)])
    assert any(not np.allclose(a, b) for a, b in zip(start, trained.student.get_weights()))
    resumed = distiller(students[1])
    resumed.optimizer.build(resumed.trainable_variables)
    assert AtomicBackupAndRestore(str(tmp_path / "backup")).restore(resumed) == 1
    for a, b in zip(resumed.student.get_weights(), trained.student.get_weights()):
        np.testing.assert_array_equal(a, b)


def residual_cnn():
    """A small residual CNN for digits at 16x16: one block whose output an `Add` gives."""
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    skip = keras.layers.Activation("relu", name="stem_act")(x)
    x = keras.layers.Conv2D(64, 1, name="expand")(skip)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.Add(name="block_add")([x, skip])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="head")(x))


def test_finetune_matches_the_block_outputs_when_asked(tmp_path):
    from keffconvert.data.sources import load_dataset
    from keffconvert.train.recipe import recipe_from_options
    from keffconvert.train import train

    keras.utils.set_random_seed(0)
    original = residual_cnn()
    data = load_dataset("digits", (16, 16), 3, seed=0)
    original.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    original.fit(data.x_train.astype("float32"), data.y_train, epochs=2, batch_size=64, verbose=0)
    original.save(tmp_path / "original.keras")
    runs = {}
    for weight in (0.5, None):
        recipe = recipe_from_options("finetune", epochs=1, feature_distill_weight=weight)
        report = train(str(tmp_path / "original.keras"), "digits", mode="finetune", recipe=recipe,
                       calibration="none", out=tmp_path / f"run{weight}", heatmap_images=0)
        runs[weight] = report
    matched, logits_only = runs[0.5]["models"][1], runs[None]["models"][1]  # the default: off
    assert matched["matched_block_outputs"] == ["block_add"]
    assert "block outputs matched with weight 0.5" in runs[0.5]["recipe"]["description"]
    assert "block outputs" not in runs[None]["recipe"]["description"]
    assert runs[0.5]["mode_description"].endswith("distillation from the original and of the outputs of its "
                                                   "1 residual block")
    assert logits_only["matched_block_outputs"] == [] and logits_only["distilled"]
    assert matched["history"][0]["loss"] != pytest.approx(logits_only["history"][0]["loss"], rel=1e-3)
