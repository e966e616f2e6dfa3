"""The `keffconvert` command: a thin click shell over the Python API.

`keffconvert MODEL ...` converts (the default command); `train`, `report`, `check` and `export`
are subcommands. User mistakes end as one line on stderr and the exit code documented below
(`keffconvert.errors.EXIT_CODES`); a bug ends as one line naming the exception and exit code INTERNAL_ERROR (70),
its traceback in a log file, or on stderr with `keffconvert --debug ...` or KEFFCONVERT_DEBUG=1.
"""

import os
import sys
import tempfile
import traceback

import click

from keffconvert.quiet_start import start_backend
from keffconvert.errors import INTERNAL_ERROR, INTERRUPTED, KeffError, exit_codes_help

EXIT_CODES = exit_codes_help()
DEBUG_ENV = "KEFFCONVERT_DEBUG"
GROUP_FLAGS = ("--debug",)  # options of `keffconvert` itself that may come before MODEL
_PASS_THROUGH = (click.exceptions.Exit, click.ClickException, click.Abort)  # click reports these itself


def debug_wanted(ctx=None):
    """--debug on the command line, or KEFFCONVERT_DEBUG set to anything but 0/false/no/off."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _one_line(error, limit=300):
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _write_crash_log(error):
    """The traceback (and how keffconvert was run) in a new file in the temp folder; None if that fails."""
    try:
        fd, path = tempfile.mkstemp(prefix="keffconvert-crash-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(f"command: {' '.join(sys.argv)}\npython: {sys.version.split()[0]}\n\n")
            log.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        return path
    except OSError:
        return None


def report_internal_error(error, debug):
    """One line on stderr naming the exception; the traceback on stderr (debug) or in a log file."""
    where = ""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    else:
        log = _write_crash_log(error)
        where = (f"; traceback in {log}" if log else "") + f" (or rerun with --debug or {DEBUG_ENV}=1)"
    message = _one_line(error)
    click.echo(f"keffconvert: internal error (a bug): {type(error).__name__}{': ' + message if message else ''}"
               f"{where}", err=True)


class KeffGroup(click.Group):
    """Runs `convert` when the first argument is not a subcommand, and turns every failure into one
    line on stderr and a documented exit code (keffconvert.errors.EXIT_CODES)."""

    default_command = "convert"

    def parse_args(self, ctx, args):
        first = 0
        while first < len(args) and args[first] in GROUP_FLAGS:
            first += 1
        if first < len(args) and args[first] not in self.commands and args[first] not in ("--help", "-h", "--version"):
            args = [*args[:first], self.default_command, *args[first:]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except KeffError as error:
            if debug_wanted(ctx):
                traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            click.echo(f"keffconvert: error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("keffconvert: interrupted; finished work is kept", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as error:  # a bug: never exit 1, which `check` means as "over budget"
            report_internal_error(error, debug_wanted(ctx))
            ctx.exit(INTERNAL_ERROR)

    def main(self, *args, **kwargs):
        """Also report a failure before any command runs (in keffconvert's own options) as a bug."""
        try:
            return super().main(*args, **kwargs)
        except Exception as error:
            if not kwargs.get("standalone_mode", True):
                raise
            argv = kwargs.get("args", args[0] if args else None)
            argv = sys.argv[1:] if argv is None else list(argv)
            report_internal_error(error, debug_wanted() or "--debug" in argv)
            sys.exit(INTERNAL_ERROR)


@click.group(cls=KeffGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True,
              help=f"Print the full traceback of an error (also: {DEBUG_ENV}=1). Goes before MODEL or the "
                   "subcommand.")
@click.version_option(package_name="keffconvert")
def cli(debug):
    """Convert a Keras CNN's pointwise convolutions to kEffNet grouped convolutions.

    \b
    keffconvert MODEL [OPTIONS]      convert (MODEL: .keras, .h5 or a built-in name)
    keffconvert train ...            retrain or fine-tune, then report accuracy
    keffconvert sweep ...            train at several channels per group, report the trade-off
    keffconvert report REPORT.json   rebuild report.md and plots
    keffconvert heatmaps RUN         Grad-CAM of original and converted, side by side
    keffconvert check MODEL ...      fail when a model is over its parameter budget
    keffconvert export MODEL ...     fold for inference; write tflite, saved_model or keras
    """


def _register():
    from keffconvert.commands.check import check_command
    from keffconvert.commands.convert import convert_command
    from keffconvert.commands.export import export_command
    from keffconvert.commands.heatmaps import heatmaps_command
    from keffconvert.commands.report import report_command
    from keffconvert.commands.sweep import sweep_command
    from keffconvert.commands.train import train_command

    for command in (convert_command, check_command, train_command, sweep_command, report_command, export_command,
                    heatmaps_command):
        cli.add_command(command)


_register()


def main():
    """The `keffconvert` command. Starts Keras first, without TensorFlow's start-up lines on stderr
    (keffconvert.quiet_start); only the command does that, never `import keffconvert`."""
    start_backend()
    cli(prog_name="keffconvert")


if __name__ == "__main__":
    sys.exit(main())
