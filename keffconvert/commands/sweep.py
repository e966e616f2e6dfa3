"""`keffconvert sweep MODEL`: convert and train at several channels-per-group settings, one report."""

import inspect
import shlex
import sys
import time

import click

from keffconvert.commands.training_options import data_options, training_options


@click.command("sweep", context_settings={"show_default": True})
@click.argument("model")
@data_options
@click.option("-c", "--channels-per-group", default="4,8,16,32,64", metavar="N,N,...",
              help="The settings to compare, separated by commas.")
@click.option("--variant", type=click.Choice(["2021", "2022"]), default=None,
              help="The conversion method, as in train (2021: docs/METHOD.md; 2022: without divisibility "
                   "constraints). Default: train's.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Sweep folder: one run folder cpg-N per setting, sweep_report.json/.md and sweep.png. "
                   "Default: runs/<model>-sweep.")
@click.option("--force", is_flag=True, help="Start every setting over in an --out that holds a finished or "
                                            "different sweep.")
@click.option("--heatmaps", "heatmap_images", type=click.IntRange(0, 32), default=4,
              help="Grad-CAM heatmaps of this many test images in each run's report (0: none).")
@training_options
def sweep_command(model, data, mode, channels_per_group, variant, out, force, include, exclude, image_size,
                  input_scale, calibration, calibration_samples, unsafe, quiet, **options):
    """Convert MODEL at each channels-per-group setting, train (or fine-tune) each with the same
    recipe, and report test accuracy against trainable parameters and MACs, the original as the
    reference point and the Pareto front marked.

    \b
    From scratch the original is trained once, beside the first setting; fine-tuning measures it
    as it is. Killed or interrupted, the same command skips finished settings and resumes the
    unfinished one.
    \b
    Example:
      keffconvert sweep efficientnetb0 --data digits --image-size 32 --epochs 30 -c 4,8,16,32,64
    """
    from rich.console import Console

    from keffconvert.report.sweep import PLOT, REPORT_JSON, REPORT_MD
    from keffconvert.train.sweep import SET_BY_SWEEP, sweep
    from keffconvert.train.recipe import recipe_from_options
    from keffconvert.train.run import train

    recipe = recipe_from_options(mode, **options)
    # options train() takes itself (data loading, say) go to every run, where they differ from its defaults
    parameters = inspect.signature(train).parameters
    passed = {k: v for k, v in options.items()
              if k in parameters and k not in SET_BY_SWEEP and v != parameters[k].default}
    progress = None if quiet else Console(stderr=True)
    command = "keffconvert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.time()
    report = sweep(model, data, channels_per_group=channels_per_group, mode=mode, out=out, recipe=recipe,
                   include=list(include), exclude=list(exclude), image_size=image_size, input_scale=input_scale,
                   calibration=calibration, calibration_samples=calibration_samples, variant=variant, force=force,
                   unsafe=unsafe, console=progress, command=command, **passed)
    print_sweep(report, Console())
    folder = report["out"]
    click.echo(f"wrote {folder}/{REPORT_MD}, {folder}/{REPORT_JSON} and {folder}/{PLOT} "
               f"({time.time() - start:.0f} s)")


def print_sweep(report, console):
    from rich.table import Table

    from keffconvert.report.sweep import sweep_columns, sweep_rows

    table = Table(title=f"{report['source']} sweep ({report['mode']}, {report['epochs']} epochs)")
    for column in sweep_columns(report)[1:]:  # the setting names the row; the model name is long
        table.add_column("cpg" if column == "channels per group" else column,
                         justify="left" if column == "run folder" else "right")
    for index, row in enumerate(sweep_rows(report)):
        table.add_row(*(["original"] if index == 0 else [row[1]]), *row[2:])
    console.print(table)
