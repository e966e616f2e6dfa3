"""Human-readable views of a plan: a rich table for the terminal, Markdown for reports."""

from rich.console import Console
from rich.table import Table

from keffconvert.report.markdown import markdown_table

PLAN_COLUMNS = ["layer", "C", "F", "groups", "interleave", "L", "params before", "params after", "note"]


FIT_COLUMN = "fit error (slices -> fitted)"
VARIANT_NOTE = "no divisibility constraints, Entropy 2022"


TARGET_COLUMNS = ["choice (target budget)", "sensitivity by cpg"]


def plan_columns(plan):
    return PLAN_COLUMNS + ([FIT_COLUMN] if plan.calibration else []) + (TARGET_COLUMNS if plan.target else [])


def _target_cells(plan, entry):
    """The target budget's choice for one conv and the error of each option it had."""
    if not plan.target:
        return []
    return [entry.choice or "-", sensitivity_cell(entry)]


def _fit_cell(entry):
    if entry.reconstruction_error is None:
        return "-"
    return f"{entry.slices_error:.3f} -> {entry.reconstruction_error:.3f}"


def plan_rows(plan, skipped=True):
    """One row of strings per Conv2D of the plan (converted first if `skipped` is False)."""
    rows = []
    for e in plan.layers:
        if not e.converted and not skipped:
            continue
        fit = [_fit_cell(e)] if plan.calibration else []
        rows.append([
            e.name, str(e.in_channels), str(e.filters),
            str(e.groups) if e.converted else "-",
            str(e.interleave_step) if e.interleave_step else "-",
            "yes" if e.second_conv else "-",
            f"{e.trainable_before:,}", f"{e.trainable_after:,}",
            _note(e),
        ] + fit + _target_cells(plan, e))
    return rows


def _note(entry):
    if not entry.converted:
        return entry.reason
    done = f"converted ({entry.detail})" if entry.detail else "converted"  # detail: the 2022 variant's padding, L
    if entry.dropped_settings:
        return f"{done}; not carried: {', '.join(entry.dropped_settings)}"
    return done


def totals_lines(plan):
    lines = [
        f"converted {len(plan.converted)} of {len(plan.layers)} Conv2D layers "
        f"(channels per group: {'per layer' if plan.per_layer else plan.channels_per_group}"
        + (f"; variant {plan.variant}: {VARIANT_NOTE}" if plan.variant != "2021" else "") + ")",
        f"trainable parameters: {plan.trainable_params_before:,} -> {plan.trainable_params_after:,} "
        f"({-plan.reduction_pct:+.2f}%)",
        f"all parameters:       {plan.total_params_before:,} -> {plan.total_params_after:,}",
    ]
    if plan.calibration:
        fitted = [e for e in plan.converted if e.reconstruction_error is not None]
        mean = sum(e.reconstruction_error for e in fitted) / max(len(fitted), 1)
        slices = sum(e.slices_error for e in fitted) / max(len(fitted), 1)
        lines.append(f"data-aware fit on {plan.calibration['samples']} images in {plan.calibration['time_s']:.0f} s: "
                     f"mean relative error per layer {slices:.3f} (block-diagonal slices) -> {mean:.3f} (fitted)")
    if plan.target:
        lines += target_lines(plan.target)
    lines += [f"kept as it is: {kept['name']} ({kept['type']}): {kept['reason']}" for kept in plan.kept_models]
    if plan.macs_before is not None:
        lines.append(f"multiply-accumulates: {plan.macs_before:,} -> {plan.macs_after:,} "
                     f"({-plan.macs_reduction_pct:+.2f}%) per image at input {plan.input_shape}")
    else:
        lines.append("multiply-accumulates: unknown (the model's input size is not fixed)")
    if plan.fidelity:
        f = plan.fidelity
        agree = f.get("top1_agreement")
        where = "held-out images the fit did not see" if f.get("held_out") else "images"
        lines.append(f"before training, on {f['samples']} {where}: "
                     + (f"top-1 agreement with the original {100 * agree:.1f}%, " if agree is not None else "")
                     + ("output correlation " + (f"{f['correlation']:.3f}" if f.get("correlation") is not None
                                                 else "undefined (constant outputs)")))
        if f.get("original_top1") is not None:
            lines.append(f"  top-1 accuracy on their labels: original {100 * f['original_top1']:.1f}%, "
                         f"converted {100 * f['converted_top1']:.1f}%")
    return lines


def make_console():
    """A terminal console; piped output is not cut to 80 columns, so layer names stay whole."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=200)


def print_plan(plan, console=None, skipped=True):
    console = console or make_console()
    table = Table(title=f"kEffNet plan for {plan.model_name}", show_lines=False)
    for column in plan_columns(plan):
        numeric = column in ("C", "F", "groups", "interleave", "params before", "params after", FIT_COLUMN)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in plan_rows(plan, skipped):
        table.add_row(*row)
    console.print(table)
    for line in totals_lines(plan):
        console.print(line, highlight=False)


def plan_markdown(plan, skipped=True):
    """The per-layer table as GitHub Markdown."""
    columns = plan_columns(plan)
    return markdown_table(columns, plan_rows(plan, skipped))


def sensitivity_cell(entry):
    """'4:0.62 8:0.48 ...': the error of each option the conv had (for the plan's table)."""
    if not entry.options:
        return "-"
    return " ".join(f"{o['cpg']}:{o['error']:.2f}" for o in entry.options if o["cpg"] is not None)


def target_lines(target):
    """The budget, how the plan was chosen and what the alternatives would have cost (for the CLI)."""
    stated = (f"{target['target_reduction']:g}% fewer" if target.get("target_reduction") is not None
              else f"{target['target_params']:,}")
    lines = [f"target: {stated} trainable parameters -> at most {target['budget_trainable_params']:,}; "
             f"chosen by {target['method']} on {target['sensitivity']['kind']}: "
             f"{target['trainable_params_after']:,} parameters, sensitivity (sum of layer errors) {target['cost']:.3f}"]
    for name, other in target["compared"].items():
        label = "AIMET-style greedy threshold" if name == "greedy" else name
        lines.append(f"  {label} would give {other['trainable_params_after']:,} parameters at sensitivity "
                     f"{other['cost']:.3f}")
    uniform = target.get("uniform")
    lines.append(f"  uniform cpg {uniform['cpg']} (the least compression that fits) would give "
                 f"{uniform['trainable_params_after']:,} parameters at sensitivity {uniform['cost']:.3f}"
                 if uniform else "  no single cpg of the choices meets this budget")
    return lines
