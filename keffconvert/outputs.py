"""Write outputs atomically and never over an existing file unless asked (`--force`).

Everything keffconvert writes (models, reports, plots) goes to a temporary file in the target
folder first and is renamed into place, so a crash or Ctrl-C never leaves half a file behind.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from keffconvert.errors import OutputError


def default_output(source, ending):
    """Where an output made from MODEL `source` goes by default: beside it, its stem followed by
    `ending` (`dir/m.h5`, "_keff.keras" -> `dir/m_keff.keras`); for a built-in model name, in the
    current folder (`efficientnetb0` -> `efficientnetb0_keff.keras`)."""
    path = Path(source)
    if path.suffix:
        return path.with_name(f"{path.stem}{ending}")
    return Path(f"{str(source).replace('/', '_')}{ending}")


def check_writable(path, force=False):
    """Refuse an existing output without `force`, and a folder we cannot write to."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file path")
    return _check_free_and_folder(path, force)


def check_writable_dir(path, force=False):
    """The same checks for an output that is a directory (a SavedModel)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    return _check_free_and_folder(path, force)


def _check_free_and_folder(path, force):
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path, force=False):
    """Yield a temporary path beside `path` (same suffix); rename it onto `path` on success."""
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    os.unlink(tmp)  # savers such as Keras' refuse some existing files; give them a free name
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model, path, force=False):
    """`model.save` through a temporary file, so `path` is either complete or untouched."""
    with atomic_path(path, force) as tmp:
        model.save(tmp)
    return Path(path)


def write_text(path, text, force=False):
    with atomic_path(path, force) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, data, force=False):
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", force)
