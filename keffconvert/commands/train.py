"""`keffconvert train MODEL`: convert, train (optionally the original too) and report accuracy."""

import shlex
import sys
import time

import click


@click.command("train", context_settings={"show_default": True})
@click.argument("model")
@click.option("--data", default="digits", metavar="DATA",
              help="'digits' (built in), an .npz with x_train/y_train/x_test/y_test, or a folder with one "
                   "subfolder per class (or train/ and test/ folders of those).")
@click.option("--mode", type=click.Choice(["scratch", "finetune"]), default="scratch",
              help="scratch: re-initialise every weight (the paper's protocol); finetune: start from the "
                   "converter's transferred weights.")
@click.option("--with-original", is_flag=True, help="Also train the unconverted model, to compare accuracy.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (checkpoints, report.json, report.md, plots). Default: runs/<model>-<mode>.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a finished or different run.")
@click.option("-c", "--channels-per-group", type=click.IntRange(min=1), default=16, help="The paper's cpg.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Convert only convs matching (glob; repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave convs matching alone (repeatable).")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Square input side for a built-in model name (default 224) or a model without a fixed size.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per model. Default: 50 (the paper's CIFAR-10 figure); finetune: 3.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of epoch 0. Default: 0.003 (the paper's); finetune: 1e-4.")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Learning rate of epoch e is lr * lr-decay**e. Default: 0.99; finetune: 1.")
@click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "adamw", "sgd"]), default=None,
              help="Default: rmsprop (the paper's); finetune: adam.")
@click.option("--seed", type=int, default=0, help="Seeds initialisation, shuffling, augmentation and the splits.")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              help="Share of the training images held out for validation (stratified).")
@click.option("--test-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              help="Share held out for testing when the data has no test split (digits, a plain folder).")
@click.option("--augment/--no-augment", default=True, help="Random shifts and zooms while training.")
@click.option("--shift", type=click.FloatRange(0, 0.5), default=0.1, help="Largest random shift, share of the side.")
@click.option("--zoom", type=click.FloatRange(0, 0.5), default=0.1, help="Largest random zoom in or out.")
@click.option("--flip", is_flag=True, help="Also flip horizontally at random (wrong for digits and text).")
@click.option("--distill-weight", type=click.FloatRange(0, 1), default=None,
              help="finetune only: weight of distillation from the original (0 turns it off). Default: 0.5.")
@click.option("--distill-temperature", type=click.FloatRange(min=0, min_open=True), default=4.0)
@click.option("--bn-mode", type=click.Choice(["train", "frozen", "recalibrate"]), default=None,
              help="Batch norms: train (the plain recipe), frozen (inference mode, statistics kept, as keras.io's "
                   "fine-tuning recipe), recalibrate (re-estimate statistics on training images before each "
                   "evaluation). Default: train; finetune: frozen.")
@click.option("--calibration", default="train", metavar="DATA",
              help="finetune only: images the data-aware conversion fits on before training: 'train' (the "
                   "training images), 'digits', an .npz, an image folder, or 'none' (plain block-diagonal slices).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=512, help="How many calibration images.")
@click.option("--track-test", is_flag=True,
              help="Also evaluate the test split after every epoch, for curves (never used to pick the checkpoint).")
@click.option("--mixed-precision", type=click.Choice(["auto", "on", "off"]), default="auto",
              help="mixed_float16; auto turns it on when a GPU is visible.")
@click.option("--strategy", type=click.Choice(["default", "mirrored"]), default="default",
              help="mirrored: tf.distribute.MirroredStrategy over every visible GPU.")
@click.option("--input-scale", type=click.Choice(["auto", "raw", "unit", "symmetric"]), default="auto",
              help="Pixels fed to the model: raw 0..255, unit 0..1, symmetric -1..1; auto: raw when the model "
                   "rescales its own input (Keras EfficientNet), else unit.")
@click.option("--unsafe", is_flag=True, help="Allow Lambda layers in the model file (only for files you trust).")
@click.option("--quiet", "-q", is_flag=True, help="No progress; print the summary only.")
def train_command(model, data, mode, with_original, out, force, channels_per_group, include, exclude, image_size,
                  input_scale, calibration, calibration_samples, unsafe, quiet, **recipe_options):
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

    from keffconvert.train import recipe_from_options, train

    recipe = recipe_from_options(mode, **recipe_options)
    progress = None if quiet else Console(stderr=True)
    command = "keffconvert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.time()
    report = train(model, data, mode=mode, with_original=with_original, out=out, recipe=recipe,
                   channels_per_group=channels_per_group, include=list(include), exclude=list(exclude),
                   image_size=image_size, input_scale=input_scale, calibration=calibration,
                   calibration_samples=calibration_samples, force=force, unsafe=unsafe,
                   console=progress, command=command)
    print_summary(report, Console())
    run_dir = report["run_dir"]
    click.echo(f"wrote {run_dir}/report.md, {run_dir}/report.json and plots ({time.time() - start:.0f} s)")


def print_summary(report, console):
    from rich.table import Table

    from keffconvert.report import SUMMARY_COLUMNS, summary_rows

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
