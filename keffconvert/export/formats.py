"""Writing an export: a `.keras` file or a SavedModel folder, and the default name of each format."""

OUTPUT_ENDINGS = {"keras": "_inference.keras", "tflite": ".tflite", "saved_model": "_saved_model"}


def output_ending(fmt, int8=False):
    """What `outputs.default_output` appends to MODEL's stem for an export in format `fmt`:
    `m_inference.keras`, `m.tflite`, `m_int8.tflite` or `m_saved_model`."""
    return "_int8.tflite" if fmt == "tflite" and int8 else OUTPUT_ENDINGS[fmt]


def save_keras(model, path, force=False):
    from keffconvert.outputs import save_model

    return save_model(model, path, force)


def save_saved_model(model, path, force=False, check=None):
    """A TensorFlow SavedModel directory (Keras' `model.export`, signature `serve`).

    It is written into a hidden folder beside `path`, `check(folder)` is called on it there when
    given (it raises to refuse the export: nothing is written, an old `path` is kept), and only then
    is it moved to `path`, replacing an old one when `force`.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from keffconvert.errors import OutputError
    from keffconvert.outputs import check_writable_dir

    path = check_writable_dir(path, force)
    folder = path.parent if str(path.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    try:
        staged = staging / "model"
        model.export(str(staged), format="tf_saved_model", verbose=False)
        if check is not None:
            check(staged)
        old = staging / "old" if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(staged, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
    except OSError as error:
        raise OutputError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
