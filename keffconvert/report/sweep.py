"""The sweep report: one row per channels-per-group setting, read from the run folders' own
reports, with the Pareto front marked (`keffconvert.train.sweep` runs the settings)."""

from __future__ import annotations

import datetime
from pathlib import Path

from keffconvert.outputs import write_json, write_text
from keffconvert.report.markdown import human, markdown_table

__all__ = ["build_sweep_report", "pareto_front", "render_sweep_markdown", "write_sweep_report"]

SWEEP_FORMAT = "keffconvert-sweep-report/1"

REPORT_JSON, REPORT_MD, PLOT = "sweep_report.json", "sweep_report.md", "sweep.png"
COSTS = ("trainable_params", "macs")


def pareto_front(points):
    """For each (cost, accuracy) point, whether it is on the Pareto front: no other point costs no
    more and is at least as accurate while being better in one of the two. Points with a None
    are not compared and never on the front."""
    known = [(i, c, a) for i, (c, a) in enumerate(points) if c is not None and a is not None]
    front = [False] * len(points)
    for i, cost, accuracy in known:
        front[i] = not any(c <= cost and a >= accuracy and (c < cost or a > accuracy) for j, c, a in known if j != i)
    return front


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

    data, recipe = report["data"], report["recipe"]
    size = "x".join(str(d) for d in data.get("image_size", []))
    lines = [f"# kEffNet sweep: {report['source']}, {report['mode']}", "",
             markdown_table(sweep_columns(report), sweep_rows(report),
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
    from keffconvert.report.plots import plot_sweep

    out = Path(out)
    return [write_text(out / REPORT_MD, render_sweep_markdown(report), force=True),
            plot_sweep(report, out / PLOT),
            write_json(out / REPORT_JSON, report, force=True)]
