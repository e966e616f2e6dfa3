"""Reproduce the paper's Table 2 without a notebook: parameters of EfficientNet-B0..B7 and of
kEffNet-B0..B7 (the same models converted with 16 channels per group), 10 classes.

    python examples/table2.py             # B0..B7 (about 20-30 s on 2 CPU cores)
    python examples/table2.py --upto 2    # B0..B2 only

Each model is built with `keras.applications.EfficientNetB{i}(weights=None, classes=10)` at its
default resolution and measured with `keffconvert.convert(..., dry_run=True)`: the plan counts the
converted model's parameters without building it. kEffNet-B0 must come out at 639,702 trainable
parameters (paper, Tables 1 and 2). MACs per image are at each model's default input size.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keffconvert  # noqa: E402

HEADER = ("model", "EfficientNet params", "kEffNet params", "reduction", "input", "EfficientNet MACs", "kEffNet MACs")


def row(i, classes, cpg):
    model = getattr(keras.applications, f"EfficientNetB{i}")(weights=None, classes=classes)
    _, plan = keffconvert.convert(model, channels_per_group=cpg, dry_run=True)
    keras.backend.clear_session()  # keep memory flat from B0 to B7
    side = plan.input_shape[0]
    return (f"B{i}", f"{plan.trainable_params_before:,}", f"{plan.trainable_params_after:,}",
            f"{-plan.reduction_pct:.2f}%", f"{side}x{side}",
            f"{plan.macs_before / 1e6:,.1f}M", f"{plan.macs_after / 1e6:,.1f}M")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upto", type=int, default=7, choices=range(8), metavar="{0..7}",
                        help="last EfficientNet variant to include (default 7)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--channels-per-group", type=int, default=16)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = [HEADER]
    for i in range(args.upto + 1):
        rows.append(row(i, args.classes, args.channels_per_group))
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    print(f"Table 2: trainable parameters, {args.classes} classes, {args.channels_per_group} channels per group")
    for n, r in enumerate(rows):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
