"""A parameter budget against one cpg for the whole model: agreement with the original before training.

    python benchmarks/bench_target.py --original B0.keras --reduction 70 --out benchmarks/target.json

Converts a trained model (an image classifier with a fixed input size) to the same budget in
several ways and measures, on held-out test images of --data that no fit has seen, top-1
agreement with the original and its test accuracy:

* target, Lagrangian, data-free sensitivity (plain block-diagonal slices);
* target, Lagrangian and AIMET-style greedy, sensitivity from the data-aware fit, then fitted;
* the uniform cpg that the budget allows (the least compression that fits), fitted.

One process, the model loaded once; each arm's plan totals and times go into --out.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="the trained model (.keras)")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--reduction", type=float, default=70.0, help="target: percent of trainable parameters removed")
    parser.add_argument("--samples", type=int, default=512, help="calibration images from the training split")
    parser.add_argument("--arms", default="free,lagrangian,greedy,uniform")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import keras

    import keffconvert  # noqa: F401 - registers the layers
    from keffconvert.converter import convert
    from keffconvert.options import Target
    from keffconvert.report.fidelity import agreement
    from keffconvert.data.model_inputs import calibration_images
    from keffconvert.data.sources import load_dataset

    original = keras.models.load_model(args.original)
    images = calibration_images(args.data, original, samples=args.samples)
    height, width, channels = original.inputs[0].shape[1:]
    labels = load_dataset(args.data, (height, width), channels, seed=0).y_test[:len(images.held_out)]
    accuracy = lambda model: float(np.mean(model.predict(images.held_out, verbose=0).argmax(1) == labels))  # noqa: E731
    results = {"original": args.original, "data": args.data, "reduction_target": args.reduction,
               "calibration": images.description, "original_test_accuracy": accuracy(original), "arms": []}
    print(f"original: test accuracy {results['original_test_accuracy']:.4f}")

    uniform_cpg = None
    for arm in args.arms.split(","):
        started = time.time()
        if arm == "free":
            model, plan = convert(original, target=Target(reduction=args.reduction))
        elif arm in ("lagrangian", "greedy"):
            model, plan = convert(original, target=Target(reduction=args.reduction, method=arm),
                                  calibration=images.calibration)
            uniform_cpg = plan.target["uniform"]["cpg"] if plan.target["uniform"] else uniform_cpg
        elif arm == "uniform":
            if uniform_cpg is None:
                _, dry = convert(original, target=Target(reduction=args.reduction), dry_run=True)
                uniform_cpg = dry.target["uniform"]["cpg"]
            model, plan = convert(original, uniform_cpg, calibration=images.calibration)
        else:
            raise SystemExit(f"unknown arm {arm!r}")
        seconds = time.time() - started
        fidelity = agreement(original, model, images.held_out)
        row = {"arm": arm, "cpg": uniform_cpg if arm == "uniform" else "per layer",
               "trainable_params_after": plan.trainable_params_after, "reduction_pct": round(plan.reduction_pct, 2),
               "converted_layers": len(plan.converted), "top1_agreement": fidelity.get("top1_agreement"),
               "test_accuracy": accuracy(model), "time_s": round(seconds, 1),
               "target": plan.target, "cpg_counts": _cpg_counts(plan)}
        results["arms"].append(row)
        print(f"{arm}: {row['trainable_params_after']:,} trainable ({row['reduction_pct']}% fewer), "
              f"agreement {row['top1_agreement']:.4f}, test accuracy {row['test_accuracy']:.4f}, {seconds:.0f} s"
              + (f", sensitivity {plan.target['cost']:.3f}" if plan.target else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


def _cpg_counts(plan):
    counts = {}
    for entry in plan.layers:
        key = str(entry.channels_per_group) if entry.converted else "kept"
        counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    main()
