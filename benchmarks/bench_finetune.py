"""How much of what a trained model learned survives conversion, and how fast fine-tuning recovers it.

For one trained original on scikit-learn's digits (trained here with the paper's recipe, or
given with --original), three ways to reach a converted model, each measured on the test split
after every epoch (test accuracy is only measured here, never used to pick a checkpoint):

* ``scratch``: the converted architecture trained from fresh weights with the paper's recipe;
* ``finetune-slices``: fine-tuned (the fine-tuning defaults, distillation included) from the
  plain conversion (block-diagonal slices of the original's kernels);
* ``finetune-fitted``: the same from the data-aware conversion (512 calibration images).

One run of a recipe moves test accuracy by 1-3 points from another with a different seed (about
1,150 training images, 18 steps an epoch), as much as the fine-tuning targets' margins, so the
arms in --seeded-arms (default: finetune-fitted) run once per --seeds value; the others, which sit
at chance for these few epochs, run with the first seed only. Every run shares one data split
(split seed 0, the original's), so all are tested on the same images and none on the original's
training images. The record gives every run's curve and, per arm, the mean, lowest and highest
test accuracy per epoch and in how many runs each target was met.

It also times the data-aware conversion of EfficientNet-B0 at 224x224 with 512 images against one
forward pass of the same images (--time-224). Writes a JSON record and a plot of test accuracy
against epochs (the mean over seeds, with the range).

    python benchmarks/bench_finetune.py --seeds 0,1,2,3,4,5 --out benchmarks/finetune.json --plot benchmarks/finetune.png
    python benchmarks/bench_finetune.py --model mobilenetv2 --out benchmarks/finetune_mobilenetv2.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("scratch", "finetune-slices", "finetune-fitted")
SPLIT_SEED = 0  # the digits split `train_original` (and `keffconvert train` by default) trains the original on


def build(name, size=32, classes=10):
    import keras

    shape = (size, size, 3)
    if name == "efficientnetb0":
        return keras.applications.EfficientNetB0(weights=None, classes=classes, input_shape=shape)
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(weights=None, classes=classes, input_shape=shape)
    if name == "transfer":  # the usual fine-tuning setup: a base inside a Sequential with a new head
        base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=shape)
        return keras.Sequential([keras.Input(shape), base, keras.layers.GlobalAveragePooling2D(),
                                 keras.layers.Dropout(0.2), keras.layers.Dense(classes, activation="softmax")],
                                name="transfer_b0")
    raise SystemExit(f"unknown --model {name}")


def train_original(name, epochs, seed, path, bn_momentum=None):
    """The original, trained from scratch on digits with the paper's recipe (best by validation).

    `bn_momentum` replaces the batch norms' momentum before training: MobileNetV2's 0.999 leaves
    the moving statistics far behind the weights after the ~20 steps an epoch that digits gives,
    so its validation accuracy stays at chance for the whole run."""
    import keras

    from keffconvert.data.sources import load_dataset
    from keffconvert.data.images_tf import augmenter, make_dataset
    from keffconvert.graph.model_info import leaf_layers
    from keffconvert.data.pixels import guess_input_scale
    from keffconvert.train.recipe import Recipe

    recipe = Recipe(epochs=epochs, seed=seed)
    data = load_dataset("digits", (32, 32), 3, seed=0)
    keras.utils.set_random_seed(seed)
    model = build(name)
    if bn_momentum is not None:
        for layer in leaf_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    scale = guess_input_scale(model)
    train = make_dataset(data.x_train, data.y_train, 64, scale=scale, training=True,
                         augment=augmenter(0.1, 0.1, False, seed), seed=seed)
    val = make_dataset(data.x_val, data.y_val, 64, scale=scale)
    model.compile(keras.optimizers.RMSprop(recipe.lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=[
        keras.callbacks.LearningRateScheduler(recipe.learning_rate),
        keras.callbacks.ModelCheckpoint(str(path), monitor="val_accuracy", save_best_only=True)])
    return path


def nest_as_transfer(b0_path, path):
    """The transfer layout (`build("transfer")`) holding a trained EfficientNet-B0's weights: the
    base gets every layer of B0 below its head, the Dense gets B0's `predictions`. B0's own head is
    the same pooling, dropout and Dense, so the nested model computes exactly what B0 does."""
    import keras

    trained = keras.models.load_model(b0_path, compile=False)
    size = trained.input_shape[1]
    model = build("transfer", size=size, classes=trained.outputs[0].shape[-1])
    base = model.layers[0]
    for layer in base.layers:
        layer.set_weights(trained.get_layer(layer.name).get_weights())
    model.layers[-1].set_weights(trained.get_layer("predictions").get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype("float32")
    difference = np.max(np.abs(model.predict(x, verbose=0) - trained.predict(x, verbose=0)))
    assert difference < 1e-5, f"the nested copy disagrees with {b0_path} by {difference}"
    model.save(path)
    return path


def run_arm(arm, original, epochs, workdir, seed=0, finetune_options=None):
    from keffconvert.train.recipe import recipe_from_options
    from keffconvert.train import train

    common = dict(epochs=epochs, track_test=True, seed=seed, split_seed=SPLIT_SEED)
    folder = workdir / f"{arm}-seed{seed}"
    if arm == "scratch":
        recipe = recipe_from_options("scratch", **common)
        report = train(str(original), "digits", mode="scratch", recipe=recipe, out=folder, force=True)
    else:
        recipe = recipe_from_options("finetune", **common, **(finetune_options or {}))
        calibration = "none" if arm == "finetune-slices" else "train"
        report = train(str(original), "digits", mode="finetune", recipe=recipe, calibration=calibration,
                       out=folder, force=True)
    converted = report["models"][1]
    initial = converted.get("initial") or {}
    fidelity = report["plan"].get("fidelity") or {}
    return {
        "arm": arm,
        "seed": seed,
        "recipe": report["recipe"]["description"],
        "agreement_before_training": fidelity.get("top1_agreement"),
        "test_accuracy_before_training": initial.get("test_accuracy"),
        "test_accuracy_per_epoch": [e["test_accuracy"] for e in converted["history"]],
        "val_accuracy_per_epoch": [e["val_accuracy"] for e in converted["history"]],
        "final_test_accuracy": converted["test_accuracy"],
        "best_epoch": converted["best_epoch"],
        "train_time_s": converted["train_time_s"],
        "fit_time_s": (report["plan"].get("calibration") or {}).get("time_s"),
        "original_test_accuracy": report["models"][0]["test_accuracy"],
    }


def targets(run):
    """The issue's two fine-tuning targets for one run: the first epoch whose test accuracy is
    within 1 point of the original's (None: none), and whether any epoch fell below the start."""
    original, start = run["original_test_accuracy"], run["test_accuracy_before_training"]
    close = [e for e, a in enumerate(run["test_accuracy_per_epoch"], 1) if original is not None and a >= original - 0.01]
    return {"within_1_point_at_epoch": close[0] if close else None,
            "below_start": None if start is None else any(a < start for a in run["test_accuracy_per_epoch"])}


def summarise(arm, runs):
    """Per arm: mean, lowest and highest test accuracy before training and after each epoch over
    the runs (seeds), and how many runs met each target."""
    curves = np.array([([r["test_accuracy_before_training"]] if r["test_accuracy_before_training"] is not None else [])
                       + r["test_accuracy_per_epoch"] for r in runs])
    met = [targets(r) for r in runs]
    return {
        "arm": arm, "seeds": [r["seed"] for r in runs],
        "epoch0_included": runs[0]["test_accuracy_before_training"] is not None,
        "mean_test_accuracy": curves.mean(0).round(4).tolist(),
        "min_test_accuracy": curves.min(0).round(4).tolist(),
        "max_test_accuracy": curves.max(0).round(4).tolist(),
        "mean_agreement_before_training": (None if runs[0]["agreement_before_training"] is None else
                                           round(float(np.mean([r["agreement_before_training"] for r in runs])), 4)),
        "mean_final_test_accuracy": round(float(np.mean([r["final_test_accuracy"] for r in runs])), 4),
        "runs_within_1_point_by_last_epoch": sum(m["within_1_point_at_epoch"] is not None for m in met),
        "runs_below_start": sum(bool(m["below_start"]) for m in met),
        "runs": len(runs),
        "original_test_accuracy": runs[0]["original_test_accuracy"],
    }


def time_224(original, samples=512):
    """Data-aware conversion of B0 at 224x224 (the original's weights) against one forward pass."""
    import resource

    import keras

    import keffconvert
    from keffconvert.data.digits import digits_images

    small = keras.models.load_model(original, compile=False)
    model = keras.applications.EfficientNetB0(weights=None, classes=small.outputs[0].shape[-1],
                                              input_shape=(224, 224, 3))
    model.set_weights(small.get_weights())  # convolution weights do not depend on the input size
    x = digits_images(224, 224, limit=samples)
    forward = []
    for _ in range(2):
        start = time.time()
        model.predict(x, batch_size=64, verbose=0)
        forward.append(time.time() - start)
    start = time.time()
    _, plan = keffconvert.convert(model, calibration=x)
    fit = time.time() - start
    return {"images": samples, "forward_pass_s": round(min(forward), 1), "conversion_s": round(fit, 1),
            "ratio": round(fit / min(forward), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def plot(record, path):
    """Test accuracy against epochs, every arm (left) and near the original (right), where the
    fine-tuning targets are decided: the mean over seeds, shaded from the lowest to the highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    original = next(s["original_test_accuracy"] for s in record["summaries"] if s["original_test_accuracy"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax in axes:
        for summary in record["summaries"]:
            first = 0 if summary["epoch0_included"] else 1
            epochs = range(first, first + len(summary["mean_test_accuracy"]))
            label = summary["arm"] + (f" (mean of {summary['runs']} seeds, range)" if summary["runs"] > 1 else "")
            line, = ax.plot(epochs, [100 * a for a in summary["mean_test_accuracy"]], marker="o", markersize=3,
                            label=label)
            if summary["runs"] > 1:
                ax.fill_between(epochs, [100 * a for a in summary["min_test_accuracy"]],
                                [100 * a for a in summary["max_test_accuracy"]], color=line.get_color(), alpha=0.2)
        ax.axhline(100 * original, color="black", linestyle="--", linewidth=1, label="original")
        ax.axhline(100 * original - 1, color="gray", linestyle=":", linewidth=1, label="original - 1 point")
        ax.set_xlabel("epoch (0: before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_ylim(100 * original - 6, min(100, 100 * original + 1.5))
    axes[1].set_title("near the original", fontsize=9)
    figure.suptitle(f"{record['model']} on digits 32x32, converted at cpg 16", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def recipe_fields(assignments):
    """{field: value} from FIELD=VALUE strings, each value converted to the Recipe field's declared
    type (`int | None` fields such as steps_per_epoch to int)."""
    from dataclasses import fields

    from keffconvert.train.recipe import Recipe

    declared = {"int": int, "float": float, "bool": bool, "str": str}
    types = {f.name: declared[str(f.type).split("|")[0].strip()] for f in fields(Recipe)}
    options = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in types:
            raise SystemExit(f"--set {assignment}: {name!r} is not a recipe field ({', '.join(types)})")
        if name in ("epochs", "seed", "split_seed", "track_test"):
            raise SystemExit(f"--set {assignment}: the bench sets {name} itself")
        kind = types[name]
        if kind is bool:
            options[name] = value.lower() in ("1", "true", "yes", "on")
        elif kind in (int, float):
            options[name] = kind(float(value))
        else:
            options[name] = value
    return options


def describe_original(args):
    if args.original:
        return str(args.original)
    if args.transfer_from:
        return f"{args.transfer_from}, nested as Sequential([base, pooling, dropout, Dense])"
    momentum = f", batch-norm momentum {args.bn_momentum}" if args.bn_momentum is not None else ""
    return f"trained here: {args.original_epochs} epochs, seed {args.seed}{momentum}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnetb0", choices=["efficientnetb0", "mobilenetv2", "transfer"])
    parser.add_argument("--original", default=None, help="a trained .keras original; default: train one here")
    parser.add_argument("--original-epochs", type=int, default=40)
    parser.add_argument("--transfer-from", default=None,
                        help="--model transfer: nest this trained EfficientNet-B0 (.keras) as the original")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bn-momentum", type=float, default=None,
                        help="batch-norm momentum of the original while it is trained here (MobileNetV2: 0.9)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds for --seeded-arms")
    parser.add_argument("--seeded-arms", default="finetune-fitted",
                        help="arms run once per seed; the other arms run with the first seed only")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a fine-tuning recipe field instead of its default, e.g. --set lr=3e-4 --set ema=0.9")
    parser.add_argument("--time-224", action="store_true", help="also time the conversion of B0 at 224x224")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    parser.add_argument("--plot", default=None, help="write the accuracy-per-epoch plot here")
    args = parser.parse_args()

    from keffconvert.outputs import write_json

    workdir = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    original = args.original
    start = time.time()
    if original is None and args.transfer_from:
        original = nest_as_transfer(args.transfer_from, workdir / "original.keras")
    elif original is None:
        original = train_original(args.model, args.original_epochs, args.seed, workdir / "original.keras",
                                  args.bn_momentum)
    record = {"model": args.model, "original": describe_original(args),
              "original_train_s": round(time.time() - start, 1), "epochs": args.epochs, "arms": []}
    seeds = [int(s) for s in args.seeds.split(",")]
    finetune_options = recipe_fields(args.set)
    record["finetune_options"] = finetune_options
    record["summaries"] = []
    for arm in [a for a in args.arms.split(",") if a]:  # --arms "": only --time-224
        runs = []
        for seed in (seeds if arm in args.seeded_arms.split(",") else seeds[:1]):
            runs.append(run_arm(arm, original, args.epochs, workdir, seed, finetune_options))
            print(json.dumps(runs[-1]), flush=True)
        record["arms"] += runs
        record["summaries"].append(summarise(arm, runs))
        print(json.dumps(record["summaries"][-1]), flush=True)
    if args.time_224:
        record["conversion_224"] = time_224(original)
        print(json.dumps(record["conversion_224"]), flush=True)
    if args.out:
        write_json(args.out, record, force=True)
    if args.plot and record["summaries"]:
        plot(record, args.plot)


if __name__ == "__main__":
    main()
