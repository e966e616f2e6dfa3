"""`keffconvert report REPORT.json`: rebuild report.md and the plots from the JSON alone."""

import click


@click.command("report")
@click.argument("report_json", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for report.md and the PNGs (default: beside REPORT.json). Files there are rewritten.")
def report_command(report_json, out):
    """Rebuild report.md, accuracy_vs_params.png and training_curves.png from REPORT.json."""
    from keffconvert.report.training import regenerate

    for path in regenerate(report_json, out):
        click.echo(f"wrote {path}")
