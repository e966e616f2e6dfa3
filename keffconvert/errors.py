"""Errors a user can cause, each with the CLI exit code that reports it.

The CLI turns a `KeffError` into one line on stderr and its `exit_code`; anything else is a bug
and keeps its traceback.
"""


class KeffError(Exception):
    """A problem with what the user asked for, reported as one line."""

    exit_code = 1


class InputError(KeffError):
    """The model file or name cannot be read: missing, corrupt, not a Keras model."""

    exit_code = 3


class UnsupportedModelError(KeffError):
    """A readable model keffconvert cannot rewrite (subclassed, channels_first, ...)."""

    exit_code = 4


class OutputError(KeffError):
    """The output cannot be written: it exists (without --force) or its folder is not writable."""

    exit_code = 5


class DataError(KeffError):
    """Training or evaluation data is unusable: empty, one class, mismatched shapes, bad labels."""

    exit_code = 6
