"""The graph rewrite: the paper's numbers, METHOD.md's structure, nesting, options, weights."""

import math

import keras
import numpy as np
import pytest
from conftest import count, randomize, small_cnn

import keffconvert
from keffconvert.errors import UnsupportedModelError
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels


def independent_trainable_after(model, cpg):
    """Recount the converted size from the original's layers with METHOD.md's rules, by hand."""
    total = count(model.trainable_weights)
    for layer in _all_layers(model):
        if not (type(layer) is keras.layers.Conv2D and layer.kernel_size == (1, 1) and layer.strides == (1, 1)):
            continue
        c, f = layer.kernel.shape[2], layer.filters
        g = max([d for d in range(1, math.gcd(c, f) + 1) if math.gcd(c, f) % d == 0 and d <= c // cpg] or [1])
        if g <= 1:
            continue
        bias = f if layer.use_bias else 0
        has_bn = _followed_by_bn(model, layer)
        before = c * f + bias
        after = c * f // g + bias + (2 * f if has_bn else 0)
        if c >= f:
            after += f * f // g + bias + (2 * f if has_bn else 0)
        total += after - before - (2 * f if has_bn else 0)
    return total


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def _followed_by_bn(model, conv):
    bn_name = conv.name.replace("_conv", "_bn") if conv.name != "top_conv" else "top_bn"
    return any(layer.name == bn_name and isinstance(layer, keras.layers.BatchNormalization)
               for layer in _all_layers(model))


def test_efficientnet_b0_converts_to_the_papers_639702_parameters():
    model = keras.applications.EfficientNetB0(weights=None, classes=10)
    assert count(model.trainable_weights) == 4_020_358
    new, plan = keffconvert.convert(model, channels_per_group=16)
    assert count(new.trainable_weights) == 639_702
    assert plan.trainable_params_after == 639_702
    assert plan.total_params_after == new.count_params()
    assert round(plan.reduction_pct, 2) == 84.09


@pytest.mark.parametrize("variant,cpg", [("EfficientNetB1", 16), ("EfficientNetB0", 8), ("EfficientNetB0", 32),
                                         ("EfficientNetB2", 16)])
def test_other_variants_match_an_independent_count(variant, cpg, request):
    if variant == "EfficientNetB0":  # the session's B0 (10 classes, 32x32): not built again
        model = request.getfixturevalue("b0_small")
    else:
        model = getattr(keras.applications, variant)(weights=None, classes=10, input_shape=(32, 32, 3))
    new, plan = keffconvert.convert(model, channels_per_group=cpg)
    expected = independent_trainable_after(model, cpg)
    assert count(new.trainable_weights) == expected
    assert plan.trainable_params_after == expected
    assert plan.total_params_after == new.count_params()


def _source_layer(tensor_owner_layer):
    node = tensor_owner_layer._inbound_nodes[0]
    return [t._keras_history[0].name for t in node.input_tensors]


def _replacement_output(entry):
    if entry.second_conv:
        return f"{entry.name}_sum"
    if entry.interleave_step:
        return f"{entry.name}_interleave"
    return entry.activation_layer or entry.batch_norm or f"{entry.name}_k"


def test_converted_b0_has_methods_structure_layer_for_layer(b0_small):
    new, plan = keffconvert.convert(b0_small, channels_per_group=16)
    assert plan.converted, "B0 must have convertible layers"
    # whatever consumed a chain's last layer now consumes the replacement's output
    renamed = {(e.activation_layer or e.batch_norm or e.name): _replacement_output(e) for e in plan.converted}
    names = [layer.name for layer in new.layers]
    for entry in plan.converted:
        m = b0_small.get_layer(entry.name)
        c, f, g = entry.in_channels, entry.filters, entry.groups
        assert g == max(d for d in range(1, c // 16 + 1) if c % d == 0 and f % d == 0)
        k = new.get_layer(f"{entry.name}_k")
        assert isinstance(k, GroupedPointwiseConv2D) and k.groups == g and k.filters == f
        assert _source_layer(k) == [renamed.get(n, n) for n in _source_layer(m)], "K reads M's input"
        k_out = k
        if entry.batch_norm:
            bn = new.get_layer(entry.batch_norm)
            assert _source_layer(bn) == [k.name] and bn.center and bn.scale
            k_out = bn
        if entry.activation_layer:
            act = new.get_layer(entry.activation_layer)
            assert _source_layer(act) == [k_out.name]
            k_out = act
        elif entry.activation:
            assert k.activation is m.activation or k.activation.__name__ == m.activation.__name__
        if f // g > 1:
            mix = new.get_layer(f"{entry.name}_interleave")
            assert isinstance(mix, InterleaveChannels) and mix.step_size == f // g
            assert _source_layer(mix) == [k_out.name]
            mixed = mix
        else:
            assert f"{entry.name}_interleave" not in names
            mixed = k_out
        if c >= f:
            l_conv = new.get_layer(f"{entry.name}_l")
            assert isinstance(l_conv, GroupedPointwiseConv2D) and l_conv.groups == g
            assert _source_layer(l_conv) == [mixed.name]
            l_out = l_conv
            for suffix_of in (entry.batch_norm, entry.activation_layer):
                if suffix_of:
                    nxt = new.get_layer(f"{suffix_of}_l")
                    assert _source_layer(nxt) == [l_out.name]
                    l_out = nxt
            total = new.get_layer(f"{entry.name}_sum")
            assert isinstance(total, keras.layers.Add)
            assert _source_layer(total) == [l_out.name, k_out.name], "the sum adds L's output and K's, before interleaving"
        else:
            assert f"{entry.name}_l" not in names and f"{entry.name}_sum" not in names
        assert entry.name not in names, "M itself is gone"
    for layer in b0_small.layers:  # every other layer is kept under its name, fed as before
        if layer.name in renamed or not layer._inbound_nodes or isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.name in [e.name for e in plan.converted] or layer.name in [e.batch_norm for e in plan.converted]:
            continue
        assert _source_layer(new.get_layer(layer.name)) == [renamed.get(n, n) for n in _source_layer(layer)]
    remaining = {layer.name for layer in new.layers if type(layer) is keras.layers.Conv2D and layer.kernel_size == (1, 1)}
    assert remaining == {e.name for e in plan.skipped if b0_small.get_layer(e.name).kernel_size == (1, 1)}


def test_nested_transfer_model_converts_its_base_and_stays_sequential():
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dropout(0.2), keras.layers.Dense(5, activation="softmax")])
    new, plan = keffconvert.convert(model)
    assert isinstance(new, keras.Sequential)
    inner = new.layers[0]
    assert isinstance(inner, keras.Model) and inner.name == base.name
    assert any(isinstance(layer, GroupedPointwiseConv2D) for layer in inner.layers)
    assert all(e.name.startswith(f"{base.name}/") for e in plan.converted)
    assert count(new.trainable_weights) == plan.trainable_params_after < count(model.trainable_weights)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert new.predict(x, verbose=0).shape == (2, 5)


def test_sequential_with_direct_chains_becomes_functional():
    model = keras.Sequential([keras.Input((8, 8, 32)), keras.layers.Conv2D(32, 1, name="pw"),
                              keras.layers.BatchNormalization(name="pw_bn"), keras.layers.ReLU(name="pw_relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    new, plan = keffconvert.convert(model)
    assert [e.name for e in plan.converted] == ["pw"]
    assert "pw_sum" in [layer.name for layer in new.layers]
    assert new.name == model.name


def test_dry_run_builds_nothing_and_predicts_the_built_model(b0_small):
    none, dry = keffconvert.convert(b0_small, dry_run=True)
    new, plan = keffconvert.convert(b0_small)
    assert none is None
    assert dry.to_dict() == plan.to_dict()
    assert dry.trainable_params_after == count(new.trainable_weights)
    assert dry.total_params_after == new.count_params()


def kernel_macs(model):
    """MACs counted another way: every kernel value is used once per output pixel."""
    total = 0
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            total += int(np.prod(kernel.shape)) * int(np.prod(layer.output.shape[1:-1]))
    return total


def test_macs_of_the_plan_match_the_converted_model(b0_small):
    new, plan = keffconvert.convert(b0_small)
    assert plan.macs_before == kernel_macs(b0_small)
    assert plan.macs_after == kernel_macs(new)
    assert plan.macs_after < plan.macs_before


def test_exclude_and_include_patterns(b0_small):
    _, all_plan = keffconvert.convert(b0_small, dry_run=True)
    _, plan = keffconvert.convert(b0_small, exclude=["*se_*"], dry_run=True)
    assert all("se_" not in e.name for e in plan.converted)
    assert any("se_" in e.name for e in all_plan.converted)
    assert all(e.reason.startswith("excluded") for e in plan.skipped if "se_" in e.name and e.groups is None)
    _, only = keffconvert.convert(b0_small, include=["top_conv"], dry_run=True)
    assert [e.name for e in only.converted] == ["top_conv"]


def test_input_model_is_not_modified():
    model = randomize(small_cnn())
    before = [w.copy() for w in model.get_weights()]
    names = [layer.name for layer in model.layers]
    keffconvert.convert(model, channels_per_group=8)
    assert [layer.name for layer in model.layers] == names
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_untouched_layers_keep_their_weights_and_k_takes_the_block_diagonal():
    model = randomize(small_cnn())
    new, plan = keffconvert.convert(model, channels_per_group=8)
    for name in ("stem", "head"):
        for a, b in zip(model.get_layer(name).get_weights(), new.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    entry = next(e for e in plan.converted if e.name == "reduce")
    m_kernel = model.get_layer("reduce").get_weights()[0]
    k_kernel = new.get_layer("reduce_k").get_weights()[0]
    g, c, f = entry.groups, entry.in_channels, entry.filters
    for j in range(g):
        np.testing.assert_array_equal(
            k_kernel[0, 0, :, j * f // g:(j + 1) * f // g],
            m_kernel[0, 0, j * c // g:(j + 1) * c // g, j * f // g:(j + 1) * f // g])
    np.testing.assert_array_equal(new.get_layer("reduce_l").get_weights()[0], 0)


def test_block_diagonal_original_is_reproduced_exactly():
    """When M has no cross-group weights, K holds all of M and a quiet L changes nothing.

    (swish: its quiet point is exactly 0; a relu's L starts at 1e-3 to keep its gradient.)
    """
    model = randomize(small_cnn(activation="swish"))
    _, plan = keffconvert.convert(model, channels_per_group=8, dry_run=True)
    for entry in plan.converted:
        conv = model.get_layer(entry.name)
        weights = conv.get_weights()
        g, c, f = entry.groups, entry.in_channels, entry.filters
        mask = np.zeros((c, f), bool)
        for j in range(g):
            # outputs of group j: a block of F/g where L sums, every g-th where the interleave is the output
            outputs = np.arange(j * f // g, (j + 1) * f // g) if entry.second_conv else np.arange(j, f, g)
            mask[j * c // g:(j + 1) * c // g][:, outputs] = True
        weights[0] = weights[0] * mask
        conv.set_weights(weights)
    new, _ = keffconvert.convert(model, channels_per_group=8)
    x = np.random.default_rng(5).normal(size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_an_expansion_keeps_the_original_channel_order():
    """C < F: the interleaved K is the output; channels must come out where M had them."""
    inp = keras.Input((4, 4, 16))
    model = randomize(keras.Model(inp, keras.layers.Conv2D(64, 1, name="expand")(inp)))
    new, plan = keffconvert.convert(model, channels_per_group=4)
    entry = plan.converted[0]
    assert (entry.groups, entry.interleave_step, entry.second_conv) == (4, 16, False)
    x = np.random.default_rng(9).normal(size=(2, 4, 4, 16)).astype("float32")
    full, grouped = model.predict(x, verbose=0), new.predict(x, verbose=0)
    g = entry.groups
    for o in range(64):  # channel o keeps exactly the contribution of input group o % g
        j = o % g
        part = x[..., j * 4:(j + 1) * 4] @ model.get_layer("expand").get_weights()[0][0, 0, j * 4:(j + 1) * 4, o]
        np.testing.assert_allclose(grouped[..., o], part + model.get_layer("expand").get_weights()[1][o], atol=1e-5)
    assert np.corrcoef(full.ravel(), grouped.ravel())[0, 1] > 0.3


def test_fresh_weights_when_transfer_is_off():
    model = randomize(small_cnn())
    new, _ = keffconvert.convert(model, channels_per_group=8, transfer_weights=False)
    assert not np.array_equal(model.get_layer("head").get_weights()[0], new.get_layer("head").get_weights()[0])


def test_converted_model_trains_and_grows_l():
    model = small_cnn()
    new, _ = keffconvert.convert(model, channels_per_group=8)
    new.compile("rmsprop", "sparse_categorical_crossentropy")
    x = np.random.default_rng(6).normal(size=(16, 16, 16, 3)).astype("float32")
    y = np.random.default_rng(7).integers(0, 4, 16)
    new.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.abs(new.get_layer("reduce_l").get_weights()[0]).sum() > 0


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_converted_model_round_trips(tmp_path, suffix):
    model = randomize(small_cnn())
    new, _ = keffconvert.convert(model, channels_per_group=8)
    path = tmp_path / f"converted{suffix}"
    new.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(8).normal(size=(3, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), new.predict(x, verbose=0), atol=1e-6)


def test_conv_feeding_two_layers_converts_and_keeps_both_consumers():
    inp = keras.Input((8, 8, 32))
    m = keras.layers.Conv2D(32, 1, name="m")(inp)
    a = keras.layers.BatchNormalization(name="bn")(m)
    b = keras.layers.ReLU(name="side")(m)
    model = randomize(keras.Model(inp, keras.layers.Add()([a, b])))
    new, plan = keffconvert.convert(model, channels_per_group=8)
    assert plan.converted[0].batch_norm is None, "B is not part of the chain: M feeds two layers"
    assert isinstance(new.get_layer("bn"), keras.layers.BatchNormalization)
    np.testing.assert_array_equal(new.get_layer("bn").get_weights()[0], model.get_layer("bn").get_weights()[0])


def test_shared_conv_is_skipped_with_a_reason():
    conv = keras.layers.Conv2D(32, 1, name="shared")
    a, b = keras.Input((4, 4, 32)), keras.Input((4, 4, 32))
    model = keras.Model([a, b], keras.layers.Add()([conv(a), conv(b)]))
    _, plan = keffconvert.convert(model, channels_per_group=8, dry_run=True)
    assert not plan.converted and "shared" in plan.layers[0].reason


def test_nothing_to_convert_gives_an_empty_plan():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp))
    new, plan = keffconvert.convert(model)
    assert plan.converted == [] and plan.trainable_params_after == plan.trainable_params_before


def test_subclassed_and_channels_first_models_are_refused():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="subclassed"):
        keffconvert.convert(Sub())
    inp = keras.Input((16, 4, 4))
    cf = keras.Model(inp, keras.layers.Conv2D(16, 1, data_format="channels_first")(inp))
    with pytest.raises(UnsupportedModelError, match="channels_first"):
        keffconvert.convert(cf)
    with pytest.raises(ValueError, match="channels_per_group"):
        keffconvert.convert(small_cnn(), channels_per_group=0)


@pytest.mark.parametrize("name,expected", [("relu", 1e-3), ("swish", 0.0), ("linear", 0.0), ("sigmoid", -4.0)])
def test_quiet_point_is_near_zero_and_keeps_a_gradient(name, expected):
    from keffconvert.rewrite.weights import quiet_point

    assert quiet_point(keras.activations.get(name)) == pytest.approx(expected)


# --- Trainability: the plan counts what the rewrite builds ----------------------------------


def _freeze_batch_norms(model):
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _freeze_pointwise_convs(model):
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1):
            layer.trainable = False


def _freeze_every_other_layer(model):
    for i, layer in enumerate(_all_layers(model)):
        layer.trainable = bool(i % 2)


def assert_plan_counts_the_built_model(model, new, plan):
    assert plan.trainable_params_before == count(model.trainable_weights)
    assert plan.trainable_params_after == count(new.trainable_weights)
    assert plan.total_params_after == count(new.weights)


def test_frozen_batch_norms_as_in_the_keras_fine_tuning_recipe():
    """keras.io's EfficientNet fine-tuning freezes every BatchNormalization (the issue's case)."""
    model = keras.applications.EfficientNetB0(weights=None, classes=10, input_shape=(32, 32, 3))
    _freeze_batch_norms(model)
    new, plan = keffconvert.convert(model)
    assert_plan_counts_the_built_model(model, new, plan)
    for layer in _all_layers(new):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, f"{layer.name} came from a frozen batch norm"


@pytest.mark.parametrize("freeze", [_freeze_batch_norms, _freeze_pointwise_convs, _freeze_every_other_layer])
def test_copied_layers_keep_the_trainability_of_their_source(freeze):
    model = small_cnn()
    freeze(model)
    new, plan = keffconvert.convert(model, channels_per_group=8)
    assert_plan_counts_the_built_model(model, new, plan)
    for layer in new.layers:
        source = layer.name.removesuffix("_l")
        for suffix in ("_k", "_interleave", "_sum"):
            source = source.removesuffix(suffix)
        if source in {l.name for l in model.layers} \
                and not isinstance(layer, (InterleaveChannels, keras.layers.Add, keras.layers.InputLayer)):
            assert layer.trainable == model.get_layer(source).trainable, layer.name


def test_frozen_nested_base_stays_frozen():
    base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(32, 32, 3))
    base.trainable = False
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5)], name="transfer")
    new, plan = keffconvert.convert(model)
    assert_plan_counts_the_built_model(model, new, plan)
    assert plan.trainable_params_after == plan.trainable_params_before == 1280 * 5 + 5
    assert not new.get_layer("efficientnetb0").trainable


# --- Nested subclassed models -----------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keffconvert_tests")
class ScaleBlock(keras.Model):
    """A subclassed model with a weight, used nested inside a Functional model."""

    def __init__(self, channels=32, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.scale = self.add_weight(shape=(channels,), initializer="ones", name="scale")

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def _with_nested(block):
    inp = keras.Input((8, 8, 32))
    x = keras.layers.Conv2D(32, 1, name="before")(inp)
    x = block(x)
    x = keras.layers.Conv2D(32, 1, name="after")(x)
    return keras.Model(inp, x, name="outer")


def test_nested_subclassed_model_is_kept_as_it_is_with_the_reason():
    block = ScaleBlock(name="scaler")
    model = _with_nested(block)
    block.scale.assign(np.linspace(0.5, 2.0, 32).astype("float32"))
    new, plan = keffconvert.convert(model, channels_per_group=8)
    assert [entry.name for entry in plan.converted] == ["before", "after"]
    assert plan.kept_models == [{"name": "scaler", "type": "ScaleBlock", "reason": plan.kept_models[0]["reason"]}]
    assert "subclassed" in plan.kept_models[0]["reason"]
    kept = new.get_layer("scaler")
    assert kept is not block and isinstance(kept, ScaleBlock)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kept.scale), np.linspace(0.5, 2.0, 32).astype("float32"))
    assert_plan_counts_the_built_model(model, new, plan)


def test_nested_subclassed_model_that_cannot_be_copied_is_refused():
    class Opaque(keras.Model):
        def __init__(self, factor, **kwargs):  # a required argument get_config does not record
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {"name": self.name}

    model = _with_nested(Opaque(2.0, name="opaque"))
    with pytest.raises(UnsupportedModelError, match="nested subclassed model 'opaque'"):
        keffconvert.convert(model, channels_per_group=8)


def test_cli_refuses_an_uncopyable_nested_subclassed_model_with_exit_4(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from keffconvert.cli import cli

    path = tmp_path / "outer.keras"
    _with_nested(ScaleBlock(name="scaler")).save(path)
    monkeypatch.setattr(ScaleBlock, "from_config", classmethod(lambda cls, config: (_ for _ in ()).throw(
        TypeError("cannot rebuild"))))
    result = CliRunner().invoke(cli, [str(path), "-c", "8", "-o", str(tmp_path / "o.keras")])
    assert result.exit_code in (3, 4), result.output  # loading rebuilds it too: then it is unreadable
    assert "Traceback" not in result.output and "keffconvert: error:" in result.output


# --- Activations and layer kinds --------------------------------------------------------------


def _l_kernel_gradient(model, cpg=8):
    import tensorflow as tf

    new, plan = keffconvert.convert(model, channels_per_group=cpg)
    l_layer = next(layer for layer in new.layers if layer.name.endswith("_l") and isinstance(layer, GroupedPointwiseConv2D))
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 4, 4, 16)).astype("float32"))
    projection = tf.constant(np.random.default_rng(1).normal(size=new.outputs[0].shape[1:]).astype("float32"))
    with tf.GradientTape() as tape:
        y = new(x, training=True)
        loss = tf.reduce_sum(y * projection)
    return float(tf.norm(tape.gradient(loss, l_layer.kernel)))


def _chain(activation, bias, bn, own_activation):
    inp = keras.Input((4, 4, 16))
    x = keras.layers.Conv2D(16, 1, use_bias=bias, activation=activation if own_activation else None, name="m")(inp)
    if bn:
        x = keras.layers.BatchNormalization(name="m_bn")(x)
    if not own_activation:
        x = activation(x) if isinstance(activation, keras.layers.Layer) else keras.layers.Activation(activation)(x)
    return randomize(keras.Model(inp, x))


ACCEPTED = sorted(__import__("keffconvert.graph.layer_kinds", fromlist=["x"]).ELEMENTWISE_ACTIVATIONS - {"linear"})


@pytest.mark.parametrize("activation", ACCEPTED)
@pytest.mark.parametrize("bias,bn", [(False, False), (True, False), (False, True)])
def test_l_passes_gradient_at_initialisation(activation, bias, bn):
    """relu'(0) = 0: an L whose pre-activation starts at exactly 0 would never learn."""
    model = _chain(activation, bias, bn, own_activation=not bn)
    assert _l_kernel_gradient(model) > 1e-6


@pytest.mark.parametrize("layer", [keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU])
def test_l_passes_gradient_through_activation_layers(layer):
    assert _l_kernel_gradient(_chain(layer(name="act"), bias=False, bn=True, own_activation=False)) > 1e-6


def test_softmax_after_the_batch_norm_is_not_absorbed():
    inp = keras.Input((4, 4, 32))
    x = keras.layers.Conv2D(32, 1, name="m")(inp)
    x = keras.layers.BatchNormalization(name="m_bn")(x)
    out = keras.layers.Activation("softmax", name="probabilities")(x)
    model = randomize(keras.Model(inp, out))
    new, plan = keffconvert.convert(model, channels_per_group=8)
    entry = plan.converted[0]
    assert entry.batch_norm == "m_bn" and entry.activation_layer is None
    assert new.get_layer("probabilities").input.name == new.get_layer("m_sum").output.name
    y = new.predict(np.random.default_rng(2).normal(size=(2, 4, 4, 32)).astype("float32"), verbose=0)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)  # one softmax over the summed channels


def test_conv_with_a_channel_mixing_activation_is_not_converted():
    inp = keras.Input((4, 4, 32))
    model = keras.Model(inp, keras.layers.Conv2D(32, 1, activation="softmax", name="m")(inp))
    _, plan = keffconvert.convert(model, channels_per_group=8, dry_run=True)
    assert not plan.converted and "'softmax' is not element-wise" in plan.layers[0].reason


def test_subclasses_of_conv2d_and_batch_norm_are_left_alone():
    class ScaledConv(keras.layers.Conv2D):
        def call(self, x):
            return 2.0 * super().call(x)

    class OtherNorm(keras.layers.BatchNormalization):
        pass

    inp = keras.Input((4, 4, 32))
    a = ScaledConv(32, 1, name="scaled")(inp)
    b = OtherNorm(name="other_norm")(keras.layers.Conv2D(32, 1, name="plain")(inp))
    model = keras.Model(inp, keras.layers.Add()([a, b]))
    _, plan = keffconvert.convert(model, channels_per_group=8, dry_run=True)
    by_name = {entry.name: entry for entry in plan.layers}
    assert not by_name["scaled"].converted and "subclass of Conv2D" in by_name["scaled"].reason
    assert by_name["plain"].converted and by_name["plain"].batch_norm is None


def test_regularizers_and_constraints_are_carried_and_the_rest_is_named():
    inp = keras.Input((4, 4, 32))
    x = keras.layers.Conv2D(32, 1, name="m", kernel_regularizer=keras.regularizers.L2(1e-3),
                            bias_regularizer=keras.regularizers.L1(1e-4),
                            kernel_constraint=keras.constraints.MaxNorm(2.0),
                            bias_constraint=keras.constraints.NonNeg(),
                            activity_regularizer=keras.regularizers.L1(1e-5))(inp)
    x = keras.layers.BatchNormalization(name="m_bn", gamma_constraint=keras.constraints.NonNeg())(x)
    new, plan = keffconvert.convert(keras.Model(inp, x), channels_per_group=8)
    for name in ("m_k", "m_l"):
        layer = new.get_layer(name)
        assert isinstance(layer.kernel_regularizer, keras.regularizers.L2)
        assert isinstance(layer.bias_regularizer, keras.regularizers.L1)
        assert isinstance(layer.kernel.constraint, keras.constraints.MaxNorm)
        assert isinstance(layer.bias.constraint, keras.constraints.NonNeg)
    for name in ("m_bn", "m_bn_l"):
        assert isinstance(new.get_layer(name).gamma.constraint, keras.constraints.NonNeg)
    assert plan.converted[0].dropped_settings == ["activity_regularizer"]


def test_printed_plan_names_kept_models_and_dropped_settings():
    from keffconvert.report.plan_view import plan_rows, totals_lines

    inp = keras.Input((8, 8, 32))
    x = keras.layers.Conv2D(32, 1, name="m", activity_regularizer=keras.regularizers.L1(1e-5))(inp)
    model = _with_nested(ScaleBlock(name="scaler"))
    _, plan = keffconvert.convert(keras.Model(inp, model(x)), channels_per_group=8, dry_run=True)
    assert any("scaler (ScaleBlock): subclassed model" in line for line in totals_lines(plan))
    assert ["m", "converted; not carried: activity_regularizer"] == [plan_rows(plan)[0][0], plan_rows(plan)[0][-1]]
