"""The training report: `report.json` (everything), `report.md` (a Table-1-style summary) and plots.

`report.json` holds all the numbers; `report.md` and the PNGs are derived from it alone, so
`keffconvert report REPORT.json` (or `regenerate`) rebuilds them anywhere.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from keffconvert.errors import InputError
from keffconvert.outputs import write_json, write_text

REPORT_FORMAT = "keffconvert-train-report/1"
PLOT_FILES = {"accuracy": "accuracy_vs_params.png", "curves": "training_curves.png"}
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
                             + (" with distillation from the original" if converted.get("distilled") else "")),
        "channels_per_group": plan.channels_per_group,
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
    }


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


def human(n):
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


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


def _table(columns, rows, right=()):
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report):
    """`report.md`: the summary table first, then data, recipe, plots and the per-layer plan."""
    from keffconvert.display import plan_markdown, totals_lines
    from keffconvert.plan import Plan

    plan = Plan.from_dict(report["plan"])
    data, recipe, env = report["data"], report["recipe"], report["environment"]
    size = "x".join(str(d) for d in data.get("image_size", []))
    lines = [f"# kEffNet report: {report['source']}, {report['mode']}", ""]
    lines.append(_table(SUMMARY_COLUMNS, summary_rows(report),
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
              f"![validation accuracy per epoch]({PLOT_FILES['curves']})", "",
              "## Per-layer plan", ""]
    lines += [f"- {line}" for line in totals_lines(plan)]
    lines += ["", plan_markdown(plan), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files


def write_report(report, out_dir, *, with_json=True):
    """Write report.md and the plots (then report.json, the run's finished marker) into `out_dir`."""
    from keffconvert.plots import plot_accuracy_vs_params, plot_training_curves

    out_dir = Path(out_dir)
    written = [write_text(out_dir / "report.md", render_markdown(report), force=True),
               plot_accuracy_vs_params(report, out_dir / PLOT_FILES["accuracy"]),
               plot_training_curves(report, out_dir / PLOT_FILES["curves"])]
    if with_json:
        written.append(write_json(out_dir / "report.json", report, force=True))
    return written


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
    return write_report(report, out_dir, with_json=False)
