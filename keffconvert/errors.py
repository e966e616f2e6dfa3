"""Errors a user can cause, each with the CLI exit code that reports it, and the table of codes.

The CLI turns a `KeffError` into one line on stderr and its `exit_code`. Anything else is a bug:
one line naming the exception, exit code `INTERNAL_ERROR`, and the traceback in a log file (or
on stderr with `keffconvert --debug` / `KEFFCONVERT_DEBUG=1`). `EXIT_CODES` is the one table of
codes; the CLI's help and the README are written from it.
"""

# Exit codes. 1 means "over budget" and nothing else, so that a CI job can tell a model that grew
# from a crash (Python itself exits 1 on an uncaught exception; the CLI catches them all). 2 is
# click's usage error. 70 is EX_SOFTWARE from sysexits.h, "internal software error", the usual
# code for a bug and far from the 3..7 that keffconvert may still add to. 130 is 128 + SIGINT.
SUCCESS = 0
OVER_BUDGET = 1
USAGE = 2
INPUT = 3
UNSUPPORTED_MODEL = 4
OUTPUT = 5
DATA = 6
EXPORT_MISMATCH = 7
INTERNAL_ERROR = 70
INTERRUPTED = 130

EXIT_CODES = (
    (SUCCESS, "success (also: nothing to convert, or within budget)"),
    (OVER_BUDGET, "over budget (check); nothing else exits 1"),
    (USAGE, "usage error (unknown option, bad value, conflicting options, bad budget file)"),
    (INPUT, "input model cannot be read (missing, corrupt, not a Keras model, unknown name)"),
    (UNSUPPORTED_MODEL, "model cannot be rewritten (subclassed, channels_first, Lambda without --unsafe)"),
    (OUTPUT, "output cannot be written (exists without --force, folder missing or not writable)"),
    (DATA, "data unusable (empty, one class, mismatched shapes, bad labels, undecodable images)"),
    (EXPORT_MISMATCH, "export disagrees with MODEL beyond --tolerance (export); nothing written"),
    (INTERNAL_ERROR, "internal error, a bug: one line, traceback in a log file or with --debug"),
    (INTERRUPTED, "interrupted (Ctrl-C); finished work is kept"),
)


def exit_codes_help(title="Exit codes:"):
    """The table as click help text (`\\b` keeps click from rewrapping it)."""
    width = max(len(str(code)) for code, _ in EXIT_CODES)
    rows = [f"  {code:<{width}}  {meaning}" for code, meaning in EXIT_CODES]
    return "\n".join(["\b", title, *rows])


def exit_codes_markdown():
    """The table as the README writes it."""
    rows = [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


class KeffError(Exception):
    """A problem reported as one line. Raise a subclass: the base class has no user-facing cause of
    its own, so it reports `INTERNAL_ERROR`, never 1 (which is only "over budget")."""

    exit_code = INTERNAL_ERROR


class UsageConflict(KeffError):
    """Options that contradict each other or the model (a usage error)."""

    exit_code = USAGE


class BudgetConfigError(KeffError):
    """The budget itself is unusable (no limits, unreadable budget file, bad value): a usage error."""

    exit_code = USAGE


class InputError(KeffError):
    """The model file or name cannot be read: missing, corrupt, not a Keras model."""

    exit_code = INPUT


class UnsupportedModelError(KeffError):
    """A readable model keffconvert cannot rewrite (subclassed, channels_first, ...)."""

    exit_code = UNSUPPORTED_MODEL


class OutputError(KeffError):
    """The output cannot be written: it exists (without --force) or its folder is not writable."""

    exit_code = OUTPUT


class DataError(KeffError):
    """Training or evaluation data is unusable: empty, one class, mismatched shapes, bad labels."""

    exit_code = DATA


class ExportMismatchError(KeffError):
    """The exported model's predictions differ from the source model's beyond the tolerance."""

    exit_code = EXPORT_MISMATCH
