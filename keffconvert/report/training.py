"""The training report: `report.json` (everything), `report.md` (a Table-1-style summary) and plots.

`report.json` holds all the numbers; `report.md` and the PNGs are derived from it alone, so
`keffconvert report REPORT.json` (or `regenerate`) rebuilds them anywhere. Per-class results
(`keffconvert.per_class`) and their confusion matrices appear when the report holds them (older
reports do not); the Grad-CAM heatmaps are drawn from the run's models (`keffconvert.heatmaps`),
so regenerating copies that PNG rather than redrawing it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from keffconvert.errors import InputError
from keffconvert.report.markdown import human, markdown_table
from keffconvert.report.run_files import CONFUSION_FILES, PLOT_FILES
from keffconvert.outputs import atomic_path, write_json, write_text

REPORT_FORMAT = "keffconvert-train-report/1"
SUMMARY_COLUMNS = ["model", "trainable params", "reduction", "MACs", "test acc", "test loss"]


def build_report(*, source, mode, plan, results, data, recipe, settings, environment, input_scale,
                 command=None, out=None):
    """The report dict: one entry per model (the original first), the plan, data and recipe."""
    from dataclasses import asdict

    plan_dict = plan.to_dict()
    original = results.get("original")
    models = [_model_entry(original, role="original", name=source, trainable=plan.trainable_params_before,
                           total=plan.total_params_before, macs=plan.macs_before, reduction=0.0)]
    converted = results["converted"]
    models.append(_model_entry(converted, role="converted", name=converted["name"],
                               trainable=plan.trainable_params_after, total=plan.total_params_after,
                               macs=plan.macs_after, reduction=plan_dict["reduction_pct"]))
    trained = [m for m in models if m["trained"]]
    delta = None
    if original is not None:
        delta = round(100 * (converted["test_accuracy"] - original["test_accuracy"]), 4)
    return {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source": source,
        "mode": mode,
        "mode_description": ("from scratch: every weight re-initialised, nothing transferred (the paper's protocol)"
                             if mode == "scratch" else
                             "fine-tuned from the weights the converter transferred"
                             + (" with distillation from the original" if converted.get("distilled") else "")
                             + (_matched(len(converted["matched_block_outputs"]))
                                if converted.get("matched_block_outputs") else "")),
        "channels_per_group": plan.channels_per_group,
        "variant": plan.variant,  # "2021" (METHOD.md) or "2022" (keffconvert/variant2022.py)
        "models": models,
        "accuracy_delta_points": delta,
        "epochs": recipe.epochs,
        "wall_time_s": round(sum(m["train_time_s"] + m["test_time_s"] for m in trained), 3),
        "recipe": {**asdict(recipe), "description": recipe.describe(), "input_scale": input_scale,
                   "selection": "best epoch by validation accuracy (ties: lower validation loss), "
                                "restored before the single test evaluation"},
        "data": data,
        "environment": environment,
        "settings": settings,
        "plan": plan_dict,
        "run_dir": None if out is None else str(out),
        "class_f1_drops": _class_f1_drops(models),
    }


def _class_f1_drops(models):
    """The classes whose F1 fell most from the original to the converted model (None without both
    models' per-class results)."""
    from keffconvert.report.per_class import f1_drops

    if len(models) < 2 or not all(m.get("per_class") for m in models):
        return None
    return f1_drops(models[0]["per_class"], models[1]["per_class"])


def _model_entry(result, *, role, name, trainable, total, macs, reduction):
    entry = {"role": role, "name": name, "trained": result is not None and not result.get("reference"),
             "trainable_params": trainable,
             "total_params": total, "macs": macs, "reduction_pct": reduction,
             "test_accuracy": None, "test_loss": None}
    if result is not None:
        entry.update({k: v for k, v in result.items() if k not in ("key", "name")})
        if (result["trainable_params"], result["total_params"]) != (trainable, total):
            entry["warning"] = (f"the trained model has {result['trainable_params']:,} trainable and "
                                f"{result['total_params']:,} parameters in all; the plan says {trainable:,} "
                                f"and {total:,}")
    return entry


# ---------------------------------------------------------------------------------------------
# Markdown


def summary_rows(report):
    rows = []
    for m in report["models"]:
        rows.append([
            m["name"],
            f"{m['trainable_params']:,}",
            "-" if m["role"] == "original" else f"{-m['reduction_pct']:+.2f}%",
            human(m["macs"]),
            "not trained" if m["test_accuracy"] is None else f"{100 * m['test_accuracy']:.2f}%",
            "-" if m["test_loss"] is None else f"{m['test_loss']:.4f}",
        ])
    return rows


def render_markdown(report):
    """`report.md`: the summary table first, then data, recipe, plots and the per-layer plan."""
    from keffconvert.report.plan_view import plan_markdown, totals_lines
    from keffconvert.plan.model_plan import Plan

    plan = Plan.from_dict(report["plan"])
    data, recipe, env = report["data"], report["recipe"], report["environment"]
    size = "x".join(str(d) for d in data.get("image_size", []))
    lines = [f"# kEffNet report: {report['source']}, {report['mode']}", ""]
    lines.append(markdown_table(SUMMARY_COLUMNS, summary_rows(report),
                        right=("trainable params", "reduction", "MACs", "test acc", "test loss")))
    lines.append("")
    if report.get("accuracy_delta_points") is not None:
        lines.append(f"Test accuracy, converted minus original: **{report['accuracy_delta_points']:+.2f} points**; "
                     f"trainable parameters {-report['models'][1]['reduction_pct']:+.2f}%.")
    else:
        lines.append("The original was not trained in this run (pass --with-original to compare accuracy).")
    lines += [f"\n**Warning** ({m['name']}): {m['warning']}." for m in report["models"] if m.get("warning")]
    lines += ["", f"MACs: multiply-accumulates per image at {size or 'the model input'}.", ""]
    lines.append("## Setup")
    lines.append("")
    lines.append(f"- Training: {report['mode_description']}.")
    if plan.variant != "2021":
        lines.append(f"- Conversion: variant {plan.variant} (the Entropy 2022 rules without divisibility "
                     "constraints, keffconvert/variant2022.py).")
    lines.append(f"- Recipe: {recipe['description']}; {recipe['selection']}.")
    lines.append(f"- Data: {data.get('kind', data.get('source'))}; {data.get('train', '?'):,} train / "
                 f"{data.get('val', '?'):,} validation / {data.get('test', '?'):,} test images at {size}, "
                 f"{data.get('classes', '?')} classes, pixels '{recipe.get('input_scale')}'.")
    lines.append(f"- Validation split: {data.get('val_source', '?')}.")
    lines.append(f"- Test split: {data.get('test_source', '?')}.")
    for m in report["models"]:
        if m.get("reference"):
            lines.append(f"- {m['name']}: used as it is (fine-tuning does not retrain it).")
        if m["trained"]:
            lines.append(f"- {m['name']}: best epoch {m['best_epoch']} of {m['epochs']} "
                         f"(validation accuracy {100 * m['best_val_accuracy']:.2f}%), "
                         f"training {m['train_time_s']:.0f} s.")
        if m.get("initial"):
            lines.append(f"- {m['name']} before training (epoch 0): validation accuracy "
                         f"{100 * m['initial']['val_accuracy']:.2f}%, test accuracy "
                         f"{100 * m['initial']['test_accuracy']:.2f}%.")
        lines += [f"- **Warning** ({m['name']}): {w}." for w in m.get("warnings") or []]
    lines.append(f"- Environment: TensorFlow {env.get('tensorflow')}, Keras {env.get('keras')}, "
                 f"{env.get('device')}, {env.get('precision')}, strategy {env.get('strategy')} "
                 f"({env.get('replicas')} replica(s)); wall time {report['wall_time_s']:.0f} s.")
    if report.get("command"):
        lines.append(f"- Command: `{report['command']}`")
    lines += ["", "## Plots", "",
              f"![test accuracy against trainable parameters]({PLOT_FILES['accuracy']})", "",
              f"![validation accuracy per epoch]({PLOT_FILES['curves']})", ""]
    lines += per_class_markdown(report)
    lines += heatmaps_markdown(report)
    lines += ["## Per-layer plan", ""]
    lines += [f"- {line}" for line in totals_lines(plan)]
    lines += ["", plan_markdown(plan), ""]
    return "\n".join(lines)


def per_class_markdown(report):
    """The per-class section: precision, recall, F1 and support of each model side by side, the
    classes that lost most, and the confusion matrices (nothing for a report without them)."""
    models = [m for m in report["models"] if m.get("per_class")]
    if not models:
        return []
    lines = ["## Per-class results (test split)", ""]
    names = models[0]["per_class"]["class_names"]
    columns = ["class", "support"]
    for m in models:
        columns += [f"{m['role']} precision", f"{m['role']} recall", f"{m['role']} F1"]
    if len(models) == 2:
        columns.append("F1 change")
    rows = []
    for i, name in enumerate(names):
        row = [name, models[0]["per_class"]["classes"][i]["support"]]
        for m in models:
            c = m["per_class"]["classes"][i]
            row += [f"{100 * c['precision']:.1f}%", f"{100 * c['recall']:.1f}%", f"{100 * c['f1']:.1f}%"]
        if len(models) == 2:
            change = 100 * (models[1]["per_class"]["classes"][i]["f1"] - models[0]["per_class"]["classes"][i]["f1"])
            row.append(f"{change:+.1f}")
        rows.append(row)
    macro = ["macro average", models[0]["per_class"]["samples"]]
    for m in models:
        pc = m["per_class"]
        macro += [f"{100 * pc['macro_precision']:.1f}%", f"{100 * pc['macro_recall']:.1f}%",
                  f"{100 * pc['macro_f1']:.1f}%"]
    if len(models) == 2:
        macro.append(f"{100 * (models[1]['per_class']['macro_f1'] - models[0]['per_class']['macro_f1']):+.1f}")
    rows.append(macro)
    lines += [markdown_table(columns, rows, right=tuple(columns[1:])), ""]
    drops = report.get("class_f1_drops")
    if drops:
        lines.append("Classes that lost most (F1, original to converted): " + "; ".join(
            f"**{d['name']}** {100 * d['original_f1']:.1f}% -> {100 * d['converted_f1']:.1f}% "
            f"({-d['drop']:+.1f} points)" for d in drops) + ".")
    elif drops is not None:
        lines.append("No class lost F1 from the original to the converted model.")
    lines.append("")
    for m in models:
        lines += [f"![confusion matrix of {m['name']}]({CONFUSION_FILES[m['role']]})", ""]
    return lines


def heatmaps_markdown(report):
    """The heatmaps section, when the run drew them (`keffconvert heatmaps RUN` redraws more)."""
    heatmaps = report.get("heatmaps")
    if not heatmaps:
        return []
    if heatmaps.get("skipped"):
        return ["## Heatmaps", "", f"Not drawn: {heatmaps['skipped']}.", ""]
    layers = "; ".join(f"{m['model']}: `{m['layer']}` ({m['feature_map'][0]}x{m['feature_map'][1]})"
                       for m in heatmaps["models"])
    return ["## Heatmaps", "",
            f"Grad-CAM of the predicted class on {heatmaps['images']} test images, on the last convolutional "
            f"feature map ({layers}); `keffconvert heatmaps {report.get('run_dir') or 'RUN_FOLDER'} --images N` "
            "draws more.", "", f"![Grad-CAM heatmaps]({heatmaps['file']})", ""]


# ---------------------------------------------------------------------------------------------
# Files


def write_report(report, out_dir, *, with_json=True):
    """Write report.md and the plots (then report.json, the run's finished marker) into `out_dir`."""
    from keffconvert.report.plots import plot_accuracy_vs_params, plot_training_curves

    out_dir = Path(out_dir)
    written = [write_text(out_dir / "report.md", render_markdown(report), force=True),
               plot_accuracy_vs_params(report, out_dir / PLOT_FILES["accuracy"]),
               plot_training_curves(report, out_dir / PLOT_FILES["curves"])]
    written += write_confusion_plots(report, out_dir)
    if with_json:
        written.append(write_json(out_dir / "report.json", report, force=True))
    return written


def write_confusion_plots(report, out_dir):
    """One confusion-matrix PNG per model with per-class results (none for older reports)."""
    from keffconvert.report.plots import plot_confusion_matrix

    return [plot_confusion_matrix(m["per_class"], Path(out_dir) / CONFUSION_FILES[m["role"]],
                                  f"{m['name']} ({m['role']})")
            for m in report["models"] if m.get("per_class")]


def load_report(path):
    """The report dict in `path`; InputError when it is missing or not a keffconvert report."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not a readable JSON report ({error})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise InputError(f"{path}: not a keffconvert train report (format {REPORT_FORMAT})")
    missing = [k for k in ("models", "plan", "data", "recipe", "environment") if k not in report]
    if missing:
        raise InputError(f"{path}: report lacks {', '.join(missing)}")
    return report


def regenerate(path, out_dir=None):
    """Rebuild report.md and the plots from `path` alone, into `out_dir` (default: beside it)."""
    from keffconvert.errors import OutputError

    report = load_report(path)
    out_dir = Path(out_dir) if out_dir is not None else Path(path).parent
    if not out_dir.is_dir():
        raise OutputError(f"output folder {out_dir} does not exist")
    written = write_report(report, out_dir, with_json=False)
    name = (report.get("heatmaps") or {}).get("file")
    heatmaps = Path(path).parent / (name or "")
    if name and heatmaps.is_file() and \
            heatmaps.resolve() != (out_dir / heatmaps.name).resolve():
        import shutil

        with atomic_path(out_dir / heatmaps.name, force=True) as tmp:  # drawn from the models, not the JSON
            shutil.copyfile(heatmaps, tmp)
        written.append(out_dir / heatmaps.name)
    return written


def _matched(count):
    """The mode description's words for the block outputs fine-tuning matched."""
    return f" and of the outputs of its {count} residual block{'s' if count != 1 else ''}"
