"""Streaming input: peak memory of `train` against the number of images, and pipeline throughput.

    python benchmarks/bench_input.py --out benchmarks/input.json              # both parts
    python benchmarks/bench_input.py --skip-memory --images 2000 --repeats 3  # throughput only
    python benchmarks/bench_input.py --skip-throughput --train-options '--batch-size 16 --val-split 0.01'

(a) Peak resident memory of `keffconvert train efficientnetb0 --data FOLDER --image-size 128
    --epochs 1 --steps-per-epoch 20` on a folder of `--small` and of `--large` JPEG images (each
    run in its own process; its peak RSS read from `getrusage` of a wrapper that only waits for it).
    The target is that the large folder costs at most 300 MB more than the small one.
(b) Throughput of the input pipeline alone at 224x224 (decode + resize + augment, images/s):
    keffconvert's training stream against `keras.utils.image_dataset_from_directory` on the same
    folder followed by the same augmentation, side by side, `--repeats` passes each, median.

The images are generated once into `--folder` (default a folder under the system's temp folder):
scikit-learn's digits upscaled to 96x96 with a random colour tint, background, gradient and noise,
saved as JPEG (quality 90), one subfolder per digit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def make_folder(root, count, size=96, seed=0):
    """`count` real-looking JPEGs in root/<digit>/, written once (a finished folder is reused)."""
    from PIL import Image

    from keffconvert.data.digits import load_digits_arrays

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    digits, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    noise = rng.normal(0, 0.05, (16, size, size, 3)).astype(np.float32)  # a bank, rolled: cheap to draw
    for i in range(count):
        k = i % len(digits)
        base = np.kron(digits[k] / 255.0, np.ones((size // 8, size // 8), np.float32))  # 8x8 -> size
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        background = rng.uniform(0, 0.4, 3).astype(np.float32)
        gradient = ramp[None, :, None] * rng.uniform(-0.2, 0.2, 3).astype(np.float32)
        image = base[..., None] * tint + (1 - base[..., None]) * background + gradient
        image += np.roll(noise[i % 16], int(rng.integers(size)), axis=int(rng.integers(2)))
        folder = root / str(int(labels[k]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    done.write_text(str(count))
    return root


def peak_memory(folder, out, extra=()):
    """(peak RSS in MB, seconds) of one `keffconvert train` run on `folder` (`extra`: more options)."""
    command = [str(Path(sys.executable).with_name("keffconvert")), "train", "efficientnetb0", "--data", str(folder),
               "--image-size", "128", "--epochs", "1", "--steps-per-epoch", "20", *extra, "--out", str(out),
               "--force", "-q"]
    start = time.time()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train failed on {folder}:\n{done.stderr[-2000:]}")
    kilobytes = int(done.stdout.strip().splitlines()[-1])
    return kilobytes / 1024, time.time() - start


def throughput(folder, repeats, batch=64, size=224):
    """{pipeline: images/s per pass} for keffconvert's stream and image_dataset_from_directory."""
    import keras
    import tensorflow as tf

    from keffconvert.data.sources import open_data
    from keffconvert.data.images_tf import augmenter, scale_pixels

    augment = augmenter(0.1, 0.1, False, seed=0)
    stream = open_data(folder, (size, size), 3, seed=0)
    count = stream.sizes["train"]

    def ours():
        return stream.pipeline("train", batch, scale="raw", training=True, augment=augment, seed=0)

    # Keras' own loader over the same training files (its file list is the whole folder, so give
    # it a folder of links to the same training split: the same images, the same count)
    same = Path(tempfile.mkdtemp(prefix="bench-input-links-"))
    for path, label in zip(stream.splits["train"].paths, stream.labels("train")):
        target = same / str(label) / Path(path).name
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(Path(path).resolve())

    def keras_loader():
        ds = keras.utils.image_dataset_from_directory(same, image_size=(size, size), batch_size=batch, shuffle=True,
                                                      seed=0, verbose=False)
        ds = ds.map(lambda x, y: (scale_pixels(augment(x, training=True), "raw"), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    results = {"keffconvert stream": [], "image_dataset_from_directory": []}
    for _ in range(repeats):
        for name, build in (("keffconvert stream", ours), ("image_dataset_from_directory", keras_loader)):
            ds = build()
            start, seen = time.time(), 0
            for x, _ in ds:
                seen += int(x.shape[0])
            results[name].append(seen / (time.time() - start))
            assert seen == count, (name, seen, count)
    import shutil

    shutil.rmtree(same, ignore_errors=True)
    return {name: {"images_per_s": [round(v, 1) for v in values], "median": round(statistics.median(values), 1)}
            for name, values in results.items()}, count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "keffconvert-bench-input"))
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--images", type=int, default=2000, help="folder size for the throughput part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default="benchmarks/input.json")
    parser.add_argument("--train-options", default="",
                        help="more options for the memory runs, e.g. '--batch-size 16 --val-split 0.01 "
                             "--test-split 0.01 --heatmaps 0' for a shorter run on a busy machine")
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = {"command": "python benchmarks/bench_input.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count()}
    base = Path(args.folder)
    if not args.skip_memory:
        memory = {}
        for count in (args.small, args.large):
            folder = make_folder(base / f"jpeg-{count}", count)
            mb, seconds = peak_memory(folder, base / f"run-{count}", args.train_options.split())
            memory[str(count)] = {"peak_rss_mb": round(mb, 1), "seconds": round(seconds, 1)}
            print(f"train on {count} images: peak RSS {mb:.0f} MB ({seconds:.0f} s)", flush=True)
        growth = memory[str(args.large)]["peak_rss_mb"] - memory[str(args.small)]["peak_rss_mb"]
        result["memory"] = {"runs": memory, "growth_mb": round(growth, 1), "target_mb": 300,
                            "command": "keffconvert train efficientnetb0 --data FOLDER --image-size 128 --epochs 1 "
                                       "--steps-per-epoch 20 " + args.train_options}
        print(f"growth from {args.small} to {args.large} images: {growth:+.0f} MB (target: at most 300)")
    if not args.skip_throughput:
        folder = make_folder(base / f"jpeg-{args.images}", args.images)
        speeds, count = throughput(folder, args.repeats)
        result["throughput"] = {"images": count, "size": 224, "batch": 64, "repeats": args.repeats, **speeds}
        for name, values in speeds.items():
            print(f"{name}: median {values['median']:.0f} images/s over {count} images ({values['images_per_s']})")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
