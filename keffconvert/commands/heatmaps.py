"""`keffconvert heatmaps RUN_FOLDER`: Grad-CAM of the original and the converted model, side by side."""

import click


@click.command("heatmaps", context_settings={"show_default": True})
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--images", type=int, default=8, help="How many test images (rows), at most the 32 the run keeps.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The PNG to write. Default: RUN_FOLDER/heatmaps.png.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def heatmaps_command(run_folder, images, out, force):
    """Draw Grad-CAM heatmaps (paper section 4.2) of a finished `keffconvert train` run: where the
    original and the converted model look on the same test images, each panel with the predicted
    class and confidence, and the true class.

    \b
    The run folder holds the models and a sample of test images (test_sample.npz); the heatmap
    is taken on each model's last convolutional feature map, for the class it predicts.
    """
    from keffconvert.report.heatmaps import HEATMAP_FILE, run_heatmaps

    record = run_heatmaps(run_folder, images=images, out=out, force=force)
    for model in record["models"]:
        right = sum(int(p == y) for p, y in zip(model["predicted"], record["labels"]))
        click.echo(f"{model['model']}: layer {model['layer']} ({model['feature_map'][0]}x{model['feature_map'][1]}), "
                   f"{right} of {record['images']} right")
    click.echo(f"wrote {out or f'{run_folder}/{HEATMAP_FILE}'}")
