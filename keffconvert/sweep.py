"""A sweep over channels per group: the accuracy the conversion costs at each setting, in one report.

    from keffconvert.sweep import sweep

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

import datetime
import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path

from keffconvert.errors import OutputError, UnsupportedModelError, UsageConflict
from keffconvert.outputs import write_json, write_text

__all__ = ["parse_channels_per_group", "pareto_front", "render_sweep_markdown", "sweep", "write_sweep_report"]

SWEEP_FORMAT = "keffconvert-sweep-report/1"
MANIFEST = "sweep_run.json"
REPORT_JSON, REPORT_MD, PLOT = "sweep_report.json", "sweep_report.md", "sweep.png"
DEFAULT_SETTINGS = (4, 8, 16, 32, 64)
COSTS = ("trainable_params", "macs")
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


def pareto_front(points):
    """For each (cost, accuracy) point, whether it is on the Pareto front: no other point costs no
    more and is at least as accurate while being better in one of the two. Points with a None
    are not compared and never on the front."""
    known = [(i, c, a) for i, (c, a) in enumerate(points) if c is not None and a is not None]
    front = [False] * len(points)
    for i, cost, accuracy in known:
        front[i] = not any(c <= cost and a >= accuracy and (c < cost or a > accuracy) for j, c, a in known if j != i)
    return front


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
    from keffconvert.train import MODES, _source_name, recipe_from_options, train

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
    name = _source_name(model)
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
    from keffconvert.train import clear_run, make_output_dir

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
    from keffconvert.report import load_report

    if not (folder / "report.json").exists():
        return None
    report = load_report(folder / "report.json")
    if report.get("channels_per_group") != cpg:
        raise OutputError(f"{folder} holds a run at {report.get('channels_per_group')} channels per group, "
                          f"not {cpg}; pass --force to start over")
    return report


# ---------------------------------------------------------------------------------------------
# The report


def _folder_name(run):
    """The run's folder inside the sweep folder (cpg-N), whatever path the sweep folder had then."""
    return Path(run["run_dir"]).name if run.get("run_dir") else None


def _row(run):
    converted = run["models"][-1]
    plan = run["plan"]
    return {
        "channels_per_group": run["channels_per_group"], "name": converted["name"],
        "run_dir": _folder_name(run),
        # the architecture's counts (the plan's): fine-tuning with frozen batch norms updates fewer
        "trainable_params": plan["trainable_params_after"], "total_params": plan["total_params_after"],
        "updated_params": converted["trainable_params"],
        "macs": converted["macs"], "reduction_pct": converted["reduction_pct"],
        "macs_reduction_pct": plan.get("macs_reduction_pct"),
        "converted_layers": plan.get("converted_layers"), "skipped_layers": plan.get("skipped_layers"),
        "test_accuracy": converted["test_accuracy"], "test_loss": converted["test_loss"],
        "best_epoch": converted.get("best_epoch"), "epochs": converted.get("epochs"),
        "train_time_s": converted.get("train_time_s"),
        "initial_test_accuracy": (converted.get("initial") or {}).get("test_accuracy"),
        "top1_agreement_before_training": (plan.get("fidelity") or {}).get("top1_agreement"),
        "fit_time_s": (plan.get("calibration") or {}).get("time_s"),
    }


def _reference(runs):
    """The original, from the first run that trained it (or, fine-tuning, measured it as it is)."""
    for run in runs:
        original = run["models"][0]
        if original["test_accuracy"] is not None:
            return {"name": original["name"], "run_dir": _folder_name(run),
                    "trainable_params": run["plan"]["trainable_params_before"],
                    "total_params": run["plan"]["total_params_before"],
                    "macs": original["macs"], "test_accuracy": original["test_accuracy"],
                    "test_loss": original["test_loss"], "trained": original["trained"],
                    "epochs": original.get("epochs"), "train_time_s": original.get("train_time_s")}
    original = runs[0]["models"][0]
    return {"name": original["name"], "run_dir": None, "trainable_params": runs[0]["plan"]["trainable_params_before"],
            "total_params": runs[0]["plan"]["total_params_before"], "macs": original["macs"], "test_accuracy": None,
            "test_loss": None, "trained": False, "epochs": None, "train_time_s": None}


def build_sweep_report(runs, *, out, settings, command=None):
    """The sweep report dict from the run folders' reports (one per setting, in order)."""
    out = Path(out)
    rows = [_row(run) for run in runs]
    reference = _reference(runs)
    points = [reference, *rows]
    for cost in COSTS:
        front = pareto_front([(p[cost], p["test_accuracy"]) for p in points])
        for point, on_front in zip(points, front):
            point[f"pareto_{cost}"] = on_front
    for row in rows:
        row["accuracy_delta_points"] = (None if None in (row["test_accuracy"], reference["test_accuracy"])
                                        else round(100 * (row["test_accuracy"] - reference["test_accuracy"]), 4))
    first = runs[0]
    return {
        "format": SWEEP_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "source": first["source"], "mode": first["mode"],
        "mode_description": first["mode_description"], "epochs": first["epochs"],
        "variant": settings.get("variant"), "recipe": first["recipe"], "data": first["data"],
        "environment": first["environment"], "settings": settings,
        "reference": reference, "rows": rows,
        "pareto": {cost: [p["channels_per_group"] if p is not reference else "original"
                          for p in points if p[f"pareto_{cost}"]] for cost in COSTS},
        "wall_time_s": round(sum(run["wall_time_s"] for run in runs), 3),
        "fit_time_s": round(sum(row["fit_time_s"] or 0 for row in rows), 3),
        "out": str(out),
    }


def _percent(value):
    return "not trained" if value is None else f"{100 * value:.2f}%"


SWEEP_COLUMNS = ["model", "channels per group", "trainable params", "reduction", "MACs", "test acc",
                 "vs original", "Pareto (params)", "Pareto (MACs)", "run folder"]
BEFORE_TRAINING = "test acc before training"  # a column only when the runs measured it (fine-tuning)


def _has_initial(report):
    return any(row.get("initial_test_accuracy") is not None for row in report["rows"])


def sweep_columns(report):
    """The table's column names: SWEEP_COLUMNS, and the accuracy before training when known."""
    columns = list(SWEEP_COLUMNS)
    if _has_initial(report):
        columns.insert(columns.index("test acc"), BEFORE_TRAINING)
    return columns


def sweep_rows(report):
    """Table rows (strings), the original first; shared by the Markdown report and the CLI."""
    from keffconvert.report import human

    ref = report["reference"]
    yes = {True: "yes", False: ""}
    initial = _has_initial(report)
    rows = [[ref["name"], "-", f"{ref['trainable_params']:,}", "-", human(ref["macs"]),
             *(["-"] if initial else []), _percent(ref["test_accuracy"]), "-", yes[ref["pareto_trainable_params"]],
             yes[ref["pareto_macs"]], ref["run_dir"] or "-"]]
    for row in report["rows"]:
        delta = row["accuracy_delta_points"]
        before = [] if not initial else ["-" if row.get("initial_test_accuracy") is None
                                         else _percent(row["initial_test_accuracy"])]
        rows.append([row["name"], str(row["channels_per_group"]), f"{row['trainable_params']:,}",
                     f"{-row['reduction_pct']:+.2f}%", human(row["macs"]), *before, _percent(row["test_accuracy"]),
                     "-" if delta is None else f"{delta:+.2f} points", yes[row["pareto_trainable_params"]],
                     yes[row["pareto_macs"]], row["run_dir"] or "-"])
    return rows


def render_sweep_markdown(report):
    """`sweep_report.md`: the table, the setup, the plot."""
    from keffconvert.report import _table

    data, recipe = report["data"], report["recipe"]
    size = "x".join(str(d) for d in data.get("image_size", []))
    lines = [f"# kEffNet sweep: {report['source']}, {report['mode']}", "",
             _table(sweep_columns(report), sweep_rows(report),
                    right=("channels per group", "trainable params", "reduction", "MACs", BEFORE_TRAINING,
                           "test acc", "vs original")),
             "", "Pareto front (yes): no other point has fewer trainable parameters (or MACs) and at least the "
             "same test accuracy. MACs: multiply-accumulates per image"
             + (f" at {size}." if size else "."), "", "## Setup", "",
             f"- Training: {report['mode_description']}; each setting is one run folder with its own report.",
             f"- Recipe (every setting): {recipe['description']}; {recipe['selection']}.",
             f"- Data: {data.get('kind', data.get('source'))}; {data.get('train', '?'):,} train / "
             f"{data.get('val', '?'):,} validation / {data.get('test', '?'):,} test images.",
             f"- Original: " + ("trained in " + report["reference"]["run_dir"] if report["reference"]["trained"]
                                else "used as it is" if report["reference"]["test_accuracy"] is not None
                                else "not evaluated") + ".",
             f"- Wall time, all runs: training and testing {report['wall_time_s']:.0f} s"
             + (f", data-aware conversion fits {report['fit_time_s']:.0f} s." if report.get("fit_time_s") else ".")]
    if report.get("variant"):
        lines.append(f"- Conversion variant: {report['variant']}.")
    if report.get("command"):
        lines.append(f"- Command: `{report['command']}`")
    lines += ["", "## Plot", "", f"![test accuracy against trainable parameters and MACs]({PLOT})", ""]
    return "\n".join(lines)


def write_sweep_report(report, out):
    """sweep_report.md and sweep.png, then sweep_report.json (the finished marker), each atomically."""
    from keffconvert.plots import plot_sweep

    out = Path(out)
    return [write_text(out / REPORT_MD, render_sweep_markdown(report), force=True),
            plot_sweep(report, out / PLOT),
            write_json(out / REPORT_JSON, report, force=True)]
