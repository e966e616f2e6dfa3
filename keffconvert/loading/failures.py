"""What a failed load says: one line naming the file, and which of Keras' exceptions mean "bad file"."""

import zipfile

from keffconvert.errors import InputError, UnsupportedModelError

MAX_DETAIL = 200  # characters of an underlying error kept in our one-line message


UNSAFE_HINT = "pass --unsafe only for files you trust"


# What Keras 3.15 raises for a file it cannot turn into a model (each seen on a damaged file or
# config: tests/test_loading.py has the cases): an unknown class or bad constructor argument
# (TypeError, ValueError), a config of the wrong structure (KeyError, IndexError, AttributeError,
# TypeError), a graph naming a layer that is not there (RuntimeError, ValueError), unreadable
# weights (h5py's OSError, KeyError, RuntimeError; zipfile.BadZipFile), a Lambda whose marshalled
# code is damaged (EOFError, ValueError). Anything else is a bug and is reported as one.
KERAS_LOAD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OSError,
                      EOFError, zipfile.BadZipFile)


def load_failure(path, exc, what):
    """The one-line error for an exception Keras raised while loading `path`."""
    if "safe_mode" in str(exc) or "unsafe_deserialization" in str(exc):
        return UnsupportedModelError(
            f"{path}: the model contains code Keras will not load in safe mode; {UNSAFE_HINT}"
        )
    return InputError(f"{path}: {what}: {one_line(exc)}")


def one_line(exc):
    """The first line of an exception's message, shortened: never a traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 3] + "..."
    return text
