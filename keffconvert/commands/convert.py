"""`keffconvert MODEL`: print the plan, write the converted model and optionally a JSON report."""

from pathlib import Path

import click

from keffconvert.outputs import check_writable, save_model, write_json


def default_output(source):
    """`dir/model.h5` -> `dir/model_keff.keras`; a built-in name -> `./name_keff.keras`."""
    path = Path(source)
    if path.suffix:
        return path.with_name(f"{path.stem}_keff.keras")
    return Path(f"{source.replace('/', '_')}_keff.keras")


@click.command("convert")
@click.argument("model")
@click.option("-c", "--channels-per-group", type=click.IntRange(min=1), default=16, show_default=True,
              help="Channels per group (the paper's cpg); larger keeps more parameters.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the converted model (.keras or .h5). Default: MODEL_keff.keras beside MODEL.")
@click.option("--variant", type=click.Choice(["2021", "2022"]), default="2021", show_default=True,
              help="2021: the paper's rules (docs/METHOD.md); 2022: the follow-up without divisibility constraints "
                   "(cpg input channels per group whatever C and F are; channels padded by copying, leftover "
                   "filters in one-filter groups).")
@click.option("--dry-run", is_flag=True, help="Print the plan only; write no model.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Convert only convs whose name matches (glob; repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave convs whose name matches alone, e.g. '*se_*' (repeatable).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Also write the plan as JSON here.")
@click.option("--fidelity-data", default=None, metavar="DATA",
              help="Measure agreement with the original before training on DATA's images (up to 256: its test "
                   "images, if it has a test split): a folder of images (flat or one subfolder per class), an .npz "
                   "with x (or x_test), TFRecord shards or 'digits'; with labels, each model's accuracy too.")
@click.option("--calibration", metavar="DATA", default=None,
              help="Fit every replacement to the original on DATA's images so the converted model keeps what "
                   "the original learned: a folder of images (flat, or one subfolder per class), an .npz with x "
                   "(or x_train/x_test), TFRecord shards or 'digits'; no labels needed. Agreement is measured on "
                   "images of DATA the fit has not seen (its test split, if it has one).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=512, show_default=True,
              help="How many images the fit uses (read batch by batch: memory does not grow with them).")
@click.option("--no-weights", is_flag=True, help="Do not transfer the original's weights (fresh initialisation).")
@click.option("--classes", type=click.IntRange(min=1), default=None, help="Classes, for a built-in model name.")
@click.option("--input-size", type=click.IntRange(min=8), default=None, help="Square input side, for a built-in model name.")
@click.option("--unsafe", is_flag=True, help="Allow Lambda layers (runs code stored in the file: only for files you trust).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--quiet", "-q", is_flag=True, help="Print the totals only, not the per-layer table.")
@click.option("--target-params", default=None, metavar="N",
              help="A budget instead of one cpg: at most N trainable parameters (700000, 700k, 1.2M); chooses "
                   "which convs convert and at which cpg, least sensitive first (from --calibration when given).")
@click.option("--target-reduction", type=click.FloatRange(min=0, max=100, max_open=True), default=None,
              metavar="P", help="A budget as P percent of the trainable parameters removed (see --target-params).")
@click.option("--target-method", type=click.Choice(["lagrangian", "greedy"]), default="lagrangian",
              show_default=True, help="How a target chooses: error + lambda * parameters per conv with lambda "
                                      "bisected, or AIMET's greedy common error threshold.")
@click.option("--target-choices", default="4,8,16,32,64", show_default=True, metavar="CPG,...",
              help="The channels-per-group values a target may give each conv (or leave it unconverted).")
def convert_command(model, channels_per_group, output, dry_run, include, exclude, report_path, fidelity_data,
                    calibration, calibration_samples, no_weights, classes, input_size, unsafe, force, quiet,
                    variant, target_params, target_reduction, target_method, target_choices):
    """Convert MODEL's eligible 1x1 convolutions to the kEffNet sub-architecture."""
    from keffconvert.converter import convert
    from keffconvert.report.plan_view import print_plan
    from keffconvert.loading import load_model

    output = Path(output) if output else default_output(model)
    if not dry_run:
        check_writable(output, force)  # fail before the slow part
    if report_path:
        check_writable(report_path, force)
    if calibration and no_weights:
        raise click.UsageError("--calibration fits the original's weights; it cannot go with --no-weights")
    target = _target_options(target_params, target_reduction, target_method, target_choices)
    source = load_model(model, unsafe=unsafe, classes=classes, input_size=input_size)
    images = None
    if calibration and (not dry_run or target):  # a target ranks convs on the data even in a dry run
        from keffconvert.data.model_inputs import calibration_sets

        images = calibration_sets(calibration, source, samples=calibration_samples)
        click.echo(f"calibration: {images.description}")
    probe = None
    if fidelity_data and fidelity_data != calibration and not dry_run:
        from keffconvert.data.model_inputs import probe_source

        probe = probe_source(fidelity_data, source)  # read (and checked) before the slow part
    new_model, plan = convert(source, channels_per_group, include=list(include), exclude=list(exclude),
                              dry_run=dry_run, transfer_weights=not no_weights,
                              calibration=images.calibration if images is not None else None, variant=variant,
                              target=target)
    # the calibration data's own held-out images when the probe is the same data (any other
    # images of it may be among those the fit was made on)
    held_out = probe is None and images is not None and images.held_out is not None
    if held_out:
        probe = images.held_out
    if new_model is not None and probe is not None:
        from keffconvert.report.fidelity import agreement

        plan.fidelity = dict(agreement(source, new_model, probe), held_out=held_out)
    print_plan(plan, skipped=not quiet)
    wrote = None
    if not plan.converted and plan.target:
        click.echo("nothing to convert: the model already meets the target; no model written")
    elif not plan.converted:
        click.echo("nothing to convert: no Conv2D is an eligible 1x1 convolution; no model written")
    elif not dry_run:
        wrote = save_model(new_model, output, force)
        click.echo(f"wrote {wrote}")
    if report_path:
        data = {"source": model, "output": str(wrote) if wrote else None, "plan": plan.to_dict()}
        click.echo(f"wrote {write_json(report_path, data, force)}")


def _target_options(target_params, target_reduction, method, choices):
    """convert()'s `Target` from the CLI's options (None without one); a usage error (exit 2) for bad or
    conflicting values."""
    if target_params is None and target_reduction is None:
        return None
    if target_params is not None and target_reduction is not None:
        raise click.UsageError("give --target-params or --target-reduction, not both")
    ctx = click.get_current_context()
    if ctx.get_parameter_source("channels_per_group") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("a target chooses each conv's cpg; give --target-choices instead of --channels-per-group")
    from keffconvert.check.budget import parse_count

    try:
        values = tuple(int(part) for part in choices.split(","))
    except ValueError:
        raise click.UsageError(f"--target-choices: expected numbers such as 4,8,16, got {choices!r}") from None
    if not values or min(values) < 1:
        raise click.UsageError(f"--target-choices: every value must be >= 1, got {choices!r}")
    params = None if target_params is None else parse_count(target_params, "--target-params")
    if params is not None and params < 1:
        raise click.UsageError("--target-params must be at least 1")
    from keffconvert.options import Target

    return Target(params=params, reduction=target_reduction, method=method, choices=values)
