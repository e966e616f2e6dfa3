"""`keffconvert export MODEL`: write an inference model (TFLite, SavedModel or .keras) and check it.

The CLI shell over `keffconvert.export` (folding, writing), `keffconvert.export_tflite` and
`keffconvert.export_check` (`verify_export`, importable from here too).
"""

from pathlib import Path

import click

from keffconvert.errors import EXPORT_MISMATCH
from keffconvert.export.check import DEFAULT_TOLERANCE, describe_check, verify_export

FORMAT_HELP = f"""\b
Formats:
  tflite       TensorFlow Lite flatbuffer, batch size 1 (float32; --int8 for
               int8 post-training quantisation with float32 input and output)
  saved_model  TensorFlow SavedModel directory (signature 'serve')
  keras        .keras file of the folded inference model (keffconvert's layers)

\b
Before writing, BatchNormalization is folded into the conv before it, interleaves
into weights where exact, and linear residual blocks into one 1x1 conv (--no-fold
keeps the model as it is). The export is then run on check images (the
calibration data, else random images) and compared with MODEL; one that
disagrees beyond --tolerance (or --min-agreement) is not written, exit {EXPORT_MISMATCH}."""


@click.command("export", epilog=FORMAT_HELP)
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["tflite", "saved_model", "keras"]), default="tflite",
              show_default=True, help="What to write.")
@click.option("--int8", is_flag=True, help="Quantise to int8 (tflite only; needs --calibration).")
@click.option("--per-tensor", is_flag=True,
              help="With --int8: one scale per weight tensor instead of per output channel. About half the file "
                   "for a kEffNet (its grouped filters have few weights each), usually a little less accurate.")
@click.option("--calibration", metavar="DATA", default=None,
              help="Representative images for --int8 and for the check: an .npz with x (or x_test), 'digits', or an "
                   "image folder or TFRecord shards (its test images, read through train's stream).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="How many calibration images to use.")
@click.option("--image-key", default="image/encoded", show_default=True,
              help="TFRecord calibration data: the feature holding the encoded image.")
@click.option("--label-key", default="image/class/label", show_default=True,
              help="TFRecord calibration data: the feature holding the class.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output path. Default: beside MODEL, MODEL.tflite / MODEL_int8.tflite / MODEL_saved_model / "
                   "MODEL_inference.keras.")
@click.option("--no-fold", is_flag=True, help="Export the model as it is (no BN, interleave or residual folding).")
@click.option("--max-dense-weights", type=click.IntRange(min=0), default=None, metavar="N",
              help="Largest dense kernel a grouped conv may become to absorb an interleave or a residual block "
                   "(default 16384; 0: never).")
@click.option("--classes", type=click.IntRange(min=1), default=None, help="Classes, for a built-in model name.")
@click.option("--input-size", type=click.IntRange(min=8), default=None, help="Square input side, for a built-in model name.")
@click.option("--unsafe", is_flag=True, help="Allow Lambda layers (runs code stored in the file: only for files you trust).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE, show_default=True,
              metavar="TOL",
              help="Largest max |difference| allowed between MODEL's and the export's outputs on the check images, "
                   "as a share of MODEL's largest |output| (at least 1). Not applied to --int8 exports.")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=None, metavar="PCT",
              help="Least top-1 agreement with MODEL on the check images, in percent (the check that suits "
                   "--int8). Default: not checked.")
def export_command(model, fmt, int8, per_tensor, calibration, calibration_samples, image_key, label_key, output,
                   no_fold, max_dense_weights, classes, input_size, unsafe, force, tolerance, min_agreement):
    """Export MODEL for inference as TFLite, SavedModel or .keras, and check its predictions."""
    from keffconvert.export.fold import DEFAULT_MAX_DENSE_WEIGHTS, FoldReport, inference_model
    from keffconvert.export.formats import output_ending, save_keras, save_saved_model
    from keffconvert.loading import load_model
    from keffconvert.outputs import check_writable, check_writable_dir, default_output

    if int8 and fmt != "tflite":
        raise click.UsageError("--int8 applies to --format tflite only")
    if per_tensor and not int8:
        raise click.UsageError("--per-tensor applies to --int8 only")
    if int8 and not calibration:
        raise click.UsageError("--int8 needs --calibration DATA (representative images: an .npz with x, 'digits' or an image folder)")
    output = Path(output) if output else default_output(model, output_ending(fmt, int8))
    if fmt == "saved_model":
        check_writable_dir(output, force)
    else:
        check_writable(output, force)  # fail before the slow part
    limit = DEFAULT_MAX_DENSE_WEIGHTS if max_dense_weights is None else max_dense_weights
    kind = f"{fmt}{' int8' if int8 else ''}{' per-tensor' if per_tensor else ''}"

    source = load_model(model, unsafe=unsafe, classes=classes, input_size=input_size)
    images = _calibration_images(calibration, source, calibration_samples, image_key=image_key,
                                 label_key=label_key) if calibration else None
    report = FoldReport()

    def check(exported):
        """Print the comparison; refuse (nothing written) an export that disagrees."""
        from keffconvert.errors import ExportMismatchError

        result = verify_export(source, exported, images, int8=int8, tolerance=tolerance,
                               min_agreement=None if min_agreement is None else min_agreement / 100)
        click.echo(describe_check(result, int8))
        if result is not None and not result["passed"]:
            raise ExportMismatchError(f"the {kind} export disagrees with {model}: {'; '.join(result['problems'])}; "
                                      f"{output} not written")

    if fmt == "tflite":
        from keffconvert.export.tflite import to_tflite, write_tflite

        content = to_tflite(source, int8=int8, calibration=images, per_channel=not per_tensor, fold=not no_fold,
                            max_dense_weights=limit, report=report)
        _fold_summary(report, no_fold)
        check(content)
        write_tflite(content, output, force)
    else:
        exported = source if no_fold else inference_model(source, target="keras", max_dense_weights=limit,
                                                          report=report)
        _fold_summary(report, no_fold)
        if fmt == "keras":
            check(exported)
            save_keras(exported, output, force)
        else:
            save_saved_model(exported, output, force, check=check)
    click.echo(f"wrote {output} ({kind}, {_size(output):,} bytes)")


def _fold_summary(report, no_fold):
    if not no_fold:
        click.echo(report.summary())


def _calibration_images(source, model, limit, **keys):
    """TFLite's int8 calibration images, in one array (the converter takes them so)."""
    from keffconvert.data.model_inputs import probe_source

    return probe_source(source, model, limit=limit, **keys).array()


def _size(path):
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
