"""A sweep over channels per group: the accuracy the conversion costs at each setting, in one report.

    from keffconvert.train.sweep import sweep

    report = sweep("efficientnetb0", "digits", channels_per_group=[4, 8, 16], image_size=32, out="runs/sweep")
    [(row["channels_per_group"], row["trainable_params"], row["test_accuracy"]) for row in report["rows"]]

One user question, "how far can I compress before accuracy suffers?", needs the curve, not a
point. Each setting is an ordinary `train` run in its own folder (`DIR/cpg-N`), all with the
same recipe, so each folder holds its own report and resumes like any run. The original is the
reference point: from scratch it is trained once, beside the first setting (`with_original`);
fine-tuning does not retrain it, so its accuracy as it is comes with every run. The sweep then
reads the run folders' reports and writes `sweep_report.json` (written last: the sweep's
finished marker), `sweep_report.md` and `sweep.png` into DIR, with the Pareto front (no other
point has fewer parameters, or MACs, and at least the same accuracy) marked.

A killed sweep rerun with the same settings skips the finished settings and resumes the
unfinished one (`sweep_run.json` records the settings); other settings, or a finished sweep,
need `force`, which starts every setting over.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path

from keffconvert.errors import OutputError, UnsupportedModelError, UsageConflict
from keffconvert.outputs import write_json
from keffconvert.report.sweep import PLOT, REPORT_JSON, REPORT_MD, SWEEP_FORMAT, build_sweep_report, write_sweep_report

__all__ = ["parse_channels_per_group", "sweep"]

MANIFEST = "sweep_run.json"


DEFAULT_SETTINGS = (4, 8, 16, 32, 64)


SET_BY_SWEEP = {"model", "data", "mode", "with_original", "out", "channels_per_group", "force", "console"}


def parse_channels_per_group(value):
    """A sorted list of distinct positive ints from '4,8,16' or a sequence; UsageConflict otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    settings = []
    for item in items:
        text = str(item).strip()
        try:
            number = int(text)
        except ValueError:
            number = None
        if number is None or number < 1:
            raise UsageConflict(f"--channels-per-group takes positive whole numbers separated by commas "
                                f"(got {text!r} in {value!r})")
        settings.append(number)
    if not settings:
        raise UsageConflict("--channels-per-group needs at least one setting, such as 4,8,16,32,64")
    return sorted(set(settings))


def sweep(model, data="digits", *, channels_per_group=DEFAULT_SETTINGS, mode="scratch", out=None, recipe=None,
          include=None, exclude=None, image_size=None, input_scale="auto", calibration="train",
          calibration_samples=512, variant=None, force=False, unsafe=False, console=None, command=None,
          **train_options):
    """Convert and train `model` at each channels-per-group setting; return the sweep report.

    Arguments are `keffconvert.train.train`'s, except `channels_per_group` (a list, or '4,8,16'),
    `out` (the sweep folder, one run folder `cpg-N` per setting inside; default
    `runs/<model>-sweep`) and `variant` (passed to the conversion where `train` takes it).
    Other keyword arguments of `train` (`train_options`) go to every run unchanged.
    The report is also written to `out` (JSON, Markdown, PNG).
    """
    from keffconvert.train.recipe import MODES, recipe_from_options
    from keffconvert.train.run import train
    from keffconvert.train.run_dir import source_name

    settings_list = parse_channels_per_group(channels_per_group)
    if mode not in MODES:
        raise UsageConflict(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    recipe = recipe or recipe_from_options(mode)
    recipe.validate(mode)  # refuse a bad recipe before the sweep folder is written
    accepted = set(inspect.signature(train).parameters) - SET_BY_SWEEP
    unknown = sorted(set(train_options) - accepted)
    if unknown:
        raise TypeError(f"sweep() got options that train() does not take: {', '.join(unknown)}")
    extra = dict(train_options)
    if variant is not None:
        if "variant" not in accepted:
            raise UsageConflict("--variant is not available in this version of keffconvert train")
        extra["variant"] = variant
    name = source_name(model)
    out = Path(out) if out else Path("runs") / f"{name.replace('/', '_')}-sweep"
    settings = json.loads(json.dumps({
        "model": name if not isinstance(model, (str, os.PathLike)) else os.fspath(model),
        "data": os.fspath(data), "mode": mode, "channels_per_group": settings_list,
        "include": list(include or []), "exclude": list(exclude or []), "image_size": image_size,
        "input_scale": input_scale, "recipe": asdict(recipe), "variant": variant,
        "calibration": os.fspath(calibration) if mode == "finetune" else None,
        "calibration_samples": int(calibration_samples),
        **({"train_options": train_options} if train_options else {}),
    }, default=str))
    _start_sweep_dir(out, settings, force)
    say = (lambda text: None) if console is None else (lambda text: console.print(text, highlight=False,
                                                                                 soft_wrap=True))
    reports = []
    for index, cpg in enumerate(settings_list):
        folder = out / f"cpg-{cpg}"
        with_original = mode == "scratch" and index == 0
        say(f"sweep {index + 1} of {len(settings_list)}: channels per group {cpg} in {folder}"
            + (" (with the original, the reference point)" if with_original else ""))
        finished = _finished_run(folder, cpg)
        if finished is not None:
            say(f"cpg {cpg}: finished in an earlier run; not retraining")
            reports.append(finished)
            continue
        try:
            reports.append(train(
                model, data, mode=mode, with_original=with_original, out=folder, recipe=recipe,
                channels_per_group=cpg, include=include, exclude=exclude, image_size=image_size,
                input_scale=input_scale, calibration=calibration, calibration_samples=calibration_samples,
                force=False, unsafe=unsafe, console=console, command=command, **extra))
        except UnsupportedModelError as error:  # e.g. a setting so large that no layer converts
            raise UnsupportedModelError(f"at {cpg} channels per group: {error}") from error
    report = build_sweep_report(reports, out=out, settings=settings, command=command)
    write_sweep_report(report, out)
    return report


def _start_sweep_dir(out, settings, force):
    """Refuse a finished sweep or one with other settings (without `force`); with `force`, clear
    what earlier sweeps wrote here; then record the settings."""
    from keffconvert.train.run_dir import clear_run, make_output_dir

    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    manifest = out / MANIFEST
    if not force:
        if (out / REPORT_JSON).exists():
            raise OutputError(f"{out} holds a finished sweep ({out / REPORT_JSON}); pass --force to start over, "
                              "or choose another --out")
        if manifest.exists():
            try:
                previous = json.loads(manifest.read_text())["settings"]
            except (ValueError, KeyError, OSError) as error:
                raise OutputError(f"{manifest} is unreadable ({error}); pass --force to start over") from error
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise OutputError(f"{out} holds an unfinished sweep with other settings ({', '.join(changed)}); "
                                  "run the same command to resume it, pass --force to start over, "
                                  "or choose another --out")
    else:
        for name in (REPORT_JSON, REPORT_MD, PLOT, MANIFEST):
            if (out / name).is_file():
                (out / name).unlink()
        for folder in sorted(out.glob("cpg-*")) if out.is_dir() else []:
            if folder.is_dir():
                clear_run(folder)
    make_output_dir(out)
    write_json(manifest, {"format": SWEEP_FORMAT, "settings": settings}, force=True)


def _finished_run(folder, cpg):
    """The report of a finished run of setting `cpg` in `folder`, or None when it is not finished."""
    from keffconvert.report.training import load_report

    if not (folder / "report.json").exists():
        return None
    report = load_report(folder / "report.json")
    if report.get("channels_per_group") != cpg:
        raise OutputError(f"{folder} holds a run at {report.get('channels_per_group')} channels per group, "
                          f"not {cpg}; pass --force to start over")
    return report
