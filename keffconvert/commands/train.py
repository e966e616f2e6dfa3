"""`keffconvert train MODEL`: convert, train (optionally the original too) and report accuracy."""

import shlex
import sys
import time

import click

from keffconvert.commands.training_options import data_options, training_options


@click.command("train", context_settings={"show_default": True})
@click.argument("model")
@data_options
@click.option("--with-original", is_flag=True, help="Also train the unconverted model, to compare accuracy.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (checkpoints, report.json, report.md, plots). Default: runs/<model>-<mode>.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a finished or different run.")
@click.option("-c", "--channels-per-group", type=click.IntRange(min=1), default=16, help="The paper's cpg.")
@click.option("--variant", type=click.Choice(["2021", "2022"]), default="2021",
              help="2021: the paper's rules (docs/METHOD.md); 2022: the follow-up without divisibility "
                   "constraints (cpg channels per group whatever C and F are; scratch, or finetune with "
                   "--calibration none).")
@click.option("--heatmaps", "heatmap_images", type=click.IntRange(0, 32), default=4,
              help="Grad-CAM heatmaps of this many test images in the report (0: none).")
@training_options
def train_command(model, data, mode, with_original, out, force, channels_per_group, include, exclude, image_size,
                  input_scale, calibration, calibration_samples, unsafe, quiet, heatmap_images, variant,
                  **recipe_options):
    """Convert MODEL, train the converted model (and the original with --with-original) and report
    parameters saved against test accuracy, like the paper's Table 1.

    \b
    The defaults are the paper's recipe. Killed or interrupted (Ctrl-C), the same command resumes
    from the last finished epoch and skips finished models.
    \b
    Example (9 to 11 minutes on 2 CPU cores; EfficientNet-B0 against kEffNet-B0 from scratch):
      keffconvert train efficientnetb0 --data digits --image-size 32 --epochs 30 --with-original
    """
    from rich.console import Console

    from keffconvert.train.recipe import recipe_from_options
    from keffconvert.train.run import train

    recipe = recipe_from_options(mode, **recipe_options)
    progress = None if quiet else Console(stderr=True)
    command = "keffconvert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.time()
    report = train(model, data, mode=mode, with_original=with_original, out=out, recipe=recipe,
                   channels_per_group=channels_per_group, include=list(include), exclude=list(exclude),
                   image_size=image_size, input_scale=input_scale, calibration=calibration,
                   calibration_samples=calibration_samples, force=force, unsafe=unsafe,
                   console=progress, command=command, heatmap_images=heatmap_images, variant=variant)
    print_summary(report, Console())
    run_dir = report["run_dir"]
    if report["environment"].get("chief") is False:  # a multi-worker run's other workers write nothing
        click.echo(f"worker {report['environment']['worker']} done; the chief writes the report "
                   f"({time.time() - start:.0f} s)")
        return
    click.echo(f"wrote {run_dir}/report.md, {run_dir}/report.json and plots ({time.time() - start:.0f} s)")


def print_summary(report, console):
    from rich.table import Table

    from keffconvert.report.training import SUMMARY_COLUMNS, summary_rows

    table = Table(title=f"{report['source']} ({report['mode']}, {report['epochs']} epochs)")
    for column in SUMMARY_COLUMNS:
        if column == "model":
            table.add_column(column, overflow="fold", ratio=1)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    if report.get("accuracy_delta_points") is not None:
        console.print(f"test accuracy, converted minus original: {report['accuracy_delta_points']:+.2f} points",
                      highlight=False)
