"""The options `train` and `sweep` share (data, mode, conversion filters, the recipe), defined once.

Each command applies them with `@data_options` and `@training_options`; the values reach the
command function as keyword arguments of the same names, and `recipe_from_options` takes the
recipe's share of them.
"""

import click

DATA_OPTIONS = [
    click.option("--data", default="digits", metavar="DATA",
                 help="'digits' (built in), an .npz with x_train/y_train/x_test/y_test, or a folder with one "
                      "subfolder per class (or train/ and test/ folders of those), or TFRecord shards: a folder of "
                      "NAME-train.tfrecord-* (and -test, -validation) files or a quoted glob for the training shards. "
                      "Folders and shards are streamed from disk."),
    click.option("--cache", default=None, metavar="WHERE",
                 help="Folders and TFRecords: keep the decoded images after the first epoch, 'memory' or a file "
                      "prefix on disk. Default: decode every epoch (memory stays flat)."),
    click.option("--image-key", default="image/encoded", help="TFRecords: the feature holding the encoded image."),
    click.option("--label-key", default="image/class/label", help="TFRecords: the feature holding the class."),
    click.option("--mode", type=click.Choice(["scratch", "finetune"]), default="scratch",
                 help="scratch: re-initialise every weight (the paper's protocol); finetune: start from the "
                      "converter's transferred weights."),
]

TRAINING_OPTIONS = [
    click.option("--include", multiple=True, metavar="PATTERN", help="Convert only convs matching (glob; repeatable)."),
    click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave convs matching alone (repeatable)."),
    click.option("--image-size", type=click.IntRange(min=8), default=None,
                 help="Square input side for a built-in model name (default 224) or a model without a fixed size."),
    click.option("--epochs", type=click.IntRange(min=1), default=None,
                 help="Epochs per model. Default: 50 (the paper's CIFAR-10 figure); finetune: 3."),
    click.option("--batch-size", type=click.IntRange(min=1), default=64),
    click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Batches per epoch, over an endless shuffled stream (as Model.fit): short epochs over big data. "
                      "Default: one pass over the training split."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Learning rate of epoch 0. Default: 0.003 (the paper's); finetune: 1e-4."),
    click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="Learning rate of epoch e is lr * lr-decay**e. Default: 0.99; finetune: 1."),
    click.option("--warmup-epochs", type=click.FloatRange(min=0), default=None, metavar="E",
                 help="Ramp the learning rate up linearly over the first E epochs' steps. Default: 0."),
    click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=None, metavar="MOMENTUM",
                 help="Keep a moving average of the weights (updated every step with this momentum, e.g. 0.9) "
                      "and evaluate, checkpoint and keep it instead of the last weights. Default: 0 (off)."),
    click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "adamw", "sgd"]), default=None,
                 help="Default: rmsprop (the paper's); finetune: adam."),
    click.option("--seed", type=int, default=0,
                 help="Seeds initialisation, shuffling, augmentation, the calibration draw and the splits."),
    click.option("--split-seed", type=int, default=None,
                 help="Seeds the validation and test hold-outs instead of --seed, so runs with different seeds "
                      "are tested on the same images (fine-tuning: the split the original was trained with)."),
    click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                 help="Share of the training images held out for validation (stratified)."),
    click.option("--test-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
                 help="Share held out for testing when the data has no test split (digits, a plain folder)."),
    click.option("--augment/--no-augment", default=True, help="Random shifts and zooms while training."),
    click.option("--shift", type=click.FloatRange(0, 0.5), default=0.1,
                 help="Largest random shift, share of the side."),
    click.option("--zoom", type=click.FloatRange(0, 0.5), default=0.1, help="Largest random zoom in or out."),
    click.option("--flip", is_flag=True, help="Also flip horizontally at random (wrong for digits and text)."),
    click.option("--distill-weight", type=click.FloatRange(0, 1), default=None,
                 help="finetune only: weight of distillation from the original (0 turns it off). Default: 0.5."),
    click.option("--distill-temperature", type=click.FloatRange(min=0, min_open=True), default=4.0),
    click.option("--feature-distill-weight", type=click.FloatRange(min=0), default=None, metavar="W",
                 help="finetune only: weight of matching the original's residual block outputs (relative squared "
                      "error, e.g. 0.5). Default: 0 (off)."),
    click.option("--bn-mode", type=click.Choice(["train", "frozen", "recalibrate"]), default=None,
                 help="Batch norms: train (the plain recipe), frozen (inference mode, statistics kept, as keras.io's "
                      "fine-tuning recipe), recalibrate (re-estimate statistics on training images before each "
                      "evaluation). Default: train; finetune: frozen."),
    click.option("--dropout/--no-dropout", default=None,
                 help="Keep the model's dropout layers (EfficientNet's drop-connect included) active while it trains. "
                      "Default: on; finetune: off (the saved model keeps its rates)."),
    click.option("--calibration", default="train", metavar="DATA",
                 help="finetune only: images the data-aware conversion fits on before training: 'train' (the "
                      "training images), 'digits', an .npz, an image folder, or 'none' (plain block-diagonal slices)."),
    click.option("--calibration-samples", type=click.IntRange(min=1), default=512, help="How many calibration images."),
    click.option("--track-test", is_flag=True,
                 help="Also evaluate the test split after every epoch, for curves (never used to pick the "
                      "checkpoint)."),
    click.option("--mixed-precision", type=click.Choice(["auto", "on", "off"]), default="auto",
                 help="Half-precision compute, float32 weights and output layer: mixed_float16 with loss scaling on "
                      "a GPU, mixed_bfloat16 on a CPU; auto turns it on when a GPU is visible."),
    click.option("--strategy", type=click.Choice(["default", "mirrored", "multiworker"]), default="default",
                 help="mirrored: tf.distribute.MirroredStrategy over every visible GPU; multiworker: "
                      "MultiWorkerMirroredStrategy over the machines the TF_CONFIG environment variable names (run "
                      "the same command on each; --batch-size is the global batch; only the chief writes --out)."),
    click.option("--input-scale", type=click.Choice(["auto", "raw", "unit", "symmetric"]), default="auto",
                 help="Pixels fed to the model: raw 0..255, unit 0..1, symmetric -1..1; auto: raw when the model "
                      "rescales its own input (Keras EfficientNet), else unit."),
    click.option("--unsafe", is_flag=True, help="Allow Lambda layers in the model file (only for files you trust)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress; print the summary only."),
]


def _apply(options, command):
    for option in reversed(options):  # decorators apply bottom-up; keep the listed order in --help
        command = option(command)
    return command


def data_options(command):
    """--data (with --cache, --image-key, --label-key, which reach the recipe) and --mode."""
    return _apply(DATA_OPTIONS, command)


def training_options(command):
    """--include/--exclude, --image-size, every recipe option, calibration, --input-scale, --unsafe, --quiet."""
    return _apply(TRAINING_OPTIONS, command)
