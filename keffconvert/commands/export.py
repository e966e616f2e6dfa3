"""`keffconvert export MODEL`: write an inference model (TFLite, SavedModel or .keras) and check it."""

from pathlib import Path

import click

FORMAT_HELP = """\b
Formats:
  tflite       TensorFlow Lite flatbuffer, batch size 1 (float32; --int8 for
               int8 post-training quantisation with float32 input and output)
  saved_model  TensorFlow SavedModel directory (signature 'serve')
  keras        .keras file of the folded inference model (keffconvert's layers)

\b
Before writing, BatchNormalization is folded into the conv before it, interleaves
into weights where exact, and linear residual blocks into one 1x1 conv (--no-fold
keeps the model as it is). The export is then run on check images (the
calibration data, else random images) and compared with MODEL."""


@click.command("export", epilog=FORMAT_HELP)
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["tflite", "saved_model", "keras"]), default="tflite",
              show_default=True, help="What to write.")
@click.option("--int8", is_flag=True, help="Quantise to int8 (tflite only; needs --calibration).")
@click.option("--per-tensor", is_flag=True,
              help="With --int8: one scale per weight tensor instead of per output channel. About half the file "
                   "for a kEffNet (its grouped filters have few weights each), usually a little less accurate.")
@click.option("--calibration", metavar="DATA", default=None,
              help="Representative images for --int8 and for the check: an .npz with x (or x_test), or 'digits'.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="How many calibration images to use.")
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
def export_command(model, fmt, int8, per_tensor, calibration, calibration_samples, output, no_fold, max_dense_weights, classes,
                   input_size, unsafe, force):
    """Export MODEL for inference as TFLite, SavedModel or .keras, and check its predictions."""
    from keffconvert.export import DEFAULT_MAX_DENSE_WEIGHTS, FoldReport, default_output, inference_model
    from keffconvert.loading import load_model
    from keffconvert.outputs import check_writable, check_writable_dir

    if int8 and fmt != "tflite":
        raise click.UsageError("--int8 applies to --format tflite only")
    if per_tensor and not int8:
        raise click.UsageError("--per-tensor applies to --int8 only")
    if int8 and not calibration:
        raise click.UsageError("--int8 needs --calibration DATA (representative images: an .npz with x, or 'digits')")
    output = Path(output) if output else default_output(model, fmt, int8)
    if fmt == "saved_model":
        check_writable_dir(output, force)
    else:
        check_writable(output, force)  # fail before the slow part
    limit = DEFAULT_MAX_DENSE_WEIGHTS if max_dense_weights is None else max_dense_weights

    source = load_model(model, unsafe=unsafe, classes=classes, input_size=input_size)
    images = _calibration_images(calibration, source, calibration_samples) if calibration else None
    report = FoldReport()
    if fmt == "tflite":
        from keffconvert.export_tflite import predict, to_tflite, write_tflite

        content = to_tflite(source, int8=int8, calibration=images, per_channel=not per_tensor, fold=not no_fold,
                            max_dense_weights=limit, report=report)
        write_tflite(content, output, force)
        run = lambda x: predict(content, x)  # noqa: E731
    else:
        exported = source if no_fold else inference_model(source, target="keras", max_dense_weights=limit,
                                                          report=report)
        if fmt == "keras":
            from keffconvert.export import save_keras

            save_keras(exported, output, force)
            run = lambda x: exported.predict(x, verbose=0)  # noqa: E731
        else:
            from keffconvert.export import save_saved_model
            from keffconvert.export_tflite import predict_saved_model

            save_saved_model(exported, output, force)
            run = lambda x: predict_saved_model(output, x)  # noqa: E731
    if not no_fold:
        click.echo(report.summary())
    kind = f"{fmt}{' int8' if int8 else ''}{' per-tensor' if per_tensor else ''}"
    click.echo(f"wrote {output} ({kind}, {_size(output):,} bytes)")
    _check(source, run, images, int8)


def _calibration_images(source, model, limit):
    from keffconvert.errors import DataError
    from keffconvert.fidelity import probe_images

    images = probe_images(source, model, limit=limit)
    if len(images) == 0:
        raise DataError(f"{source}: no calibration images")
    return images


def _check(source, run, images, int8, samples=32):
    """Compare the export with the source model on check images and print the result."""
    import numpy as np

    from keffconvert.fidelity import compare_predictions

    shape = tuple(source.inputs[0].shape[1:]) if len(source.inputs) == 1 else None
    if images is None:
        if shape is None or None in shape:
            click.echo("check skipped: the model input has no fixed shape; pass --calibration DATA to check")
            return
        images = np.random.default_rng(0).uniform(0, 255, (8,) + shape).astype("float32")
        what = "random images"
    else:
        images = images[:samples]
        what = "calibration images"
    result = compare_predictions(source.predict(images, verbose=0), run(images))
    top1 = f", top-1 agreement {result['top1_agreement']:.1%}" if "top1_agreement" in result else ""
    click.echo(f"check on {result['samples']} {what}: max |difference| {result['max_abs_diff']:.2e}{top1}"
               f"{' (int8: differences are expected)' if int8 else ''}")


def _size(path):
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
