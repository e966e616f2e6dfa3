"""A parameter budget as the input: the chosen plan fits it, the least sensitive convs go first,
an impossible budget is one line and exit 2, and the CLI takes it."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import count, small_cnn

from keffconvert.cli import cli
from keffconvert.converter import convert
from keffconvert import Target
from keffconvert.errors import BudgetConfigError
from keffconvert.target.choose import Candidate, Option, select_greedy, select_lagrangian


def trainable(model):
    return count(model.trainable_weights)


def twin_convs(seed=0):
    """Two 32->32 linear pointwise convs of the same shape: `blocky`'s kernel is already
    block-diagonal in 8 groups (nothing to lose at any cpg of 4, 8, 16), `dense`'s is not."""
    inp = keras.Input((8, 8, 32))
    x = keras.layers.Conv2D(32, 1, name="dense")(inp)
    x = keras.layers.Conv2D(32, 1, name="blocky")(x)
    out = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for name, blocks in (("dense", 1), ("blocky", 8)):
        kernel = rng.normal(0, 0.3, (32, 32))
        size = 32 // blocks
        mask = np.kron(np.eye(blocks), np.ones((size, size)))
        model.get_layer(name).set_weights([(kernel * mask)[None, None].astype("float32"),
                                           rng.normal(0, 0.1, 32).astype("float32")])
    return model


def test_mobilenetv2_plan_meets_the_budget_and_the_built_model_has_it():
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    budget = int(trainable(base) * 0.6)
    small, plan = convert(base, target=Target(params=budget))
    assert plan.trainable_params_after <= budget
    assert trainable(small) == plan.trainable_params_after
    assert plan.target["budget_trainable_params"] == budget
    picked = {e.channels_per_group for e in plan.converted}
    assert plan.converted and all(e.choice for e in plan.layers if e.options)
    assert picked <= {4, 8, 16, 32, 64}


@pytest.mark.parametrize("with_data", [False, True])
def test_the_conv_that_loses_nothing_is_compressed_first(with_data):
    model = twin_convs()
    images = np.random.default_rng(1).normal(size=(16, 8, 8, 32)).astype("float32") if with_data else None
    before = trainable(model)
    # Room for one conv at its fewest parameters (cpg 4: 8 groups), not for both.
    _, plan = convert(model, target=Target(params=before - 700, choices=(4, 8, 16)), calibration=images,
                      dry_run=True)
    layers = {e.name: e for e in plan.layers}
    blocky, dense = layers["blocky"], layers["dense"]
    assert blocky.converted and blocky.groups == 8
    assert max(o["error"] for o in blocky.options) < 1e-3
    assert min(o["error"] for o in dense.options if o["cpg"]) > 0.01
    assert plan.trainable_params_after <= before - 700
    assert ("data-aware" in plan.target["sensitivity"]["kind"]) == with_data


def test_lagrangian_weighs_parameters_where_the_greedy_threshold_does_not():
    # A big conv whose compression costs a little more error than a small conv's: AIMET's common
    # threshold must reach the big conv's error anyway, then also takes the small conv.
    big = Candidate("big", None, [Option(None, 1, 0), Option(8, 8, -1000, 0.30)])
    small = Candidate("small", None, [Option(None, 1, 0), Option(8, 8, -100, 0.29)])
    lagrangian = select_lagrangian([big, small], -1000, 10_000)
    greedy = select_greedy([big, small], -1000, 10_000)
    assert lagrangian.params_after <= 9000 and greedy.params_after <= 9000
    assert lagrangian.picks == [1, 0] and greedy.picks == [1, 1]
    assert lagrangian.cost < greedy.cost


def test_infeasible_budget_is_a_usage_error():
    with pytest.raises(BudgetConfigError, match="cannot be met"):
        convert(small_cnn(), target=Target(params=10), dry_run=True)


def test_cli_target_writes_a_model_within_budget_and_refuses_the_impossible(tmp_path):
    source = tmp_path / "model.keras"
    small_cnn().save(source)
    out, report = tmp_path / "small.keras", tmp_path / "plan.json"
    result = CliRunner().invoke(cli, [str(source), "--target-reduction", "40", "--target-method", "greedy",
                                      "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "target: 40% fewer trainable parameters" in result.output and "uniform cpg" in result.output
    data = json.loads(report.read_text())["plan"]
    assert data["target"]["budget_trainable_params"] == int(np.floor(data["trainable_params_before"] * 0.6))
    assert trainable(keras.models.load_model(out)) == data["trainable_params_after"]
    assert data["trainable_params_after"] <= data["target"]["budget_trainable_params"]
    assert data["target"]["method"] == "greedy" and "lagrangian" in data["target"]["compared"]
    assert all(e["choice"] for e in data["layers"] if e["options"])

    refused = CliRunner().invoke(cli, [str(source), "--target-params", "10", "--dry-run"])
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert lines[-1].startswith("keffconvert: error: ") and "cannot be met" in lines[-1]
    assert "Traceback" not in refused.output
    conflict = CliRunner().invoke(cli, [str(source), "--target-params", "1k", "-c", "8", "--dry-run"])
    assert conflict.exit_code == 2 and "--target-choices" in conflict.output


def test_per_layer_gives_convs_their_own_cpg_or_leaves_them():
    _, plan = convert(small_cnn(), 16, per_layer={"expand": 4, "red*": None}, dry_run=True)
    layers = {e.name: e for e in plan.layers}
    assert (layers["expand"].channels_per_group, layers["expand"].groups) == (4, 8)
    assert not layers["reduce"].converted and "per-layer" in layers["reduce"].reason
    assert (layers["project"].channels_per_group, layers["project"].groups) == (16, 2)
    assert plan.per_layer == {"expand": 4, "red*": None}
