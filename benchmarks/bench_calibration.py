"""Peak memory and time of the data-aware conversion against the number of calibration images.

    nice -n 5 python benchmarks/bench_calibration.py                        # B0 at 224: 256 and 2048 images
    nice -n 5 python benchmarks/bench_calibration.py --model efficientnetb4 --image-size 380 --images 512

Each count runs in a fresh child process, so its peak resident memory (`ru_maxrss`) is its own.
The images come from a batch source that draws them batch by batch (uniform pixels, seeded), so
the images themselves are never all in memory: what grows with their number is the conversion's.
In the same child, after the conversion, `Model.predict` runs the original over the same images;
convert time / predict time says how many forward passes of the calibration set the conversion
costs (the walk runs the original and the converted network once each, plus the fits). The
weights are random (`weights=None`): memory and time do not depend on them. Results go to --out
(default benchmarks/calibration.json), written atomically.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


class DrawnImages:
    """`count` images (size, size, 3) in [0, 255], drawn batch by batch: a keffconvert batch source."""

    def __init__(self, count, size, seed=0):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self):
        return self.count

    def batches(self, batch_size):
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.count, batch_size):
            n = min(batch_size, self.count - start)
            yield rng.uniform(0, 255, (n, self.size, self.size, 3)).astype("float32")


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args):
    import keras

    import keffconvert

    model = getattr(keras.applications, {"efficientnetb0": "EfficientNetB0", "efficientnetb4": "EfficientNetB4"}
                    .get(args.model, args.model))(weights=None, input_shape=(args.image_size, args.image_size, 3))
    images = DrawnImages(args.images, args.image_size)
    model.predict(next(images.batches(args.batch_size)), verbose=0)  # compile predict once, outside the timing
    built_mb = peak_mb()
    start = time.perf_counter()
    _, plan = keffconvert.convert(model, channels_per_group=16,
                                  calibration=keffconvert.Calibration(images, batch_size=args.batch_size))
    convert_s = time.perf_counter() - start
    converted_mb = peak_mb()
    start = time.perf_counter()
    for batch in images.batches(args.batch_size):
        model.predict_on_batch(batch)
    predict_s = time.perf_counter() - start
    print(json.dumps({"images": args.images, "convert_s": round(convert_s, 1), "predict_s": round(predict_s, 1),
                      "forward_passes": round(convert_s / predict_s, 2), "peak_mb_built": round(built_mb),
                      "peak_mb_converted": round(converted_mb),
                      "spilled_bytes": (plan.calibration or {}).get("spilled_bytes")}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnetb0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", default="256,2048", help="comma-separated counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).with_name("calibration.json")))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.images = int(args.images)
        return child(args)
    runs = []
    for count in [int(c) for c in args.images.split(",")]:
        print(f"... {args.model} at {args.image_size}, {count} images", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--images", str(count),
                               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)],
                              stdout=subprocess.PIPE, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    result = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "runs": runs}
    if len(runs) > 1:
        result["peak_mb_growth"] = runs[-1]["peak_mb_converted"] - runs[0]["peak_mb_converted"]
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
