"""The `keffconvert` command: a thin click shell over the Python API.

`keffconvert MODEL ...` converts (the default command); `train`, `report`, `check` and `export`
are subcommands. User mistakes end as one line on stderr and the exit code documented below.
"""

import sys

import click

from keffconvert.errors import KeffError

EXIT_CODES = """\b
Exit codes:
  0  success (also: nothing to convert, or within budget)
  1  over budget (check), or an unexpected internal error
  2  usage error (unknown option, value out of range)
  3  input model cannot be read (missing, corrupt, not a Keras model, unknown name)
  4  model cannot be rewritten (subclassed, channels_first, Lambda without --unsafe)
  5  output cannot be written (exists without --force, folder missing or not writable)
  6  data unusable (empty, one class, mismatched shapes, bad labels, undecodable images)
  130 interrupted (Ctrl-C); finished work is kept"""


class KeffGroup(click.Group):
    """Runs `convert` when the first argument is not a subcommand, and reports KeffErrors."""

    default_command = "convert"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeffError as error:
            click.echo(f"keffconvert: error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("keffconvert: interrupted; finished work is kept", err=True)
            ctx.exit(130)


@click.group(cls=KeffGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keffconvert")
def cli():
    """Convert a Keras CNN's pointwise convolutions to kEffNet grouped convolutions.

    \b
    keffconvert MODEL [OPTIONS]      convert (MODEL: .keras, .h5 or a built-in name)
    keffconvert train ...            retrain or fine-tune, then report accuracy
    keffconvert report REPORT.json   rebuild report.md and plots
    keffconvert check MODEL ...      fail when a model is over its parameter budget
    keffconvert export MODEL ...     fold for inference; write tflite, saved_model or keras
    """


def _register():
    from keffconvert.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register()


def main():
    cli(prog_name="keffconvert")


if __name__ == "__main__":
    sys.exit(main())
