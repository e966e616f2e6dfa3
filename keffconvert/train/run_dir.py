"""The run folder: where a run writes, whether it may resume there, and what `--force` clears."""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import keras

from keffconvert.errors import OutputError
from keffconvert.outputs import write_json
from keffconvert.loading import MODEL_SUFFIXES
from keffconvert.train.recipe import Recipe

RUN_FORMAT = "keffconvert-run/1"


RUN_FILES = ("report.json", "report.md", "run.json")


MODEL_DIRS = ("original", "converted")


def check_run_dir(out, settings, force):
    """Refuse a finished run (without `force`) or an unfinished one with other settings.

    Returns True when `out` holds an unfinished run with the same settings (to resume). Writes
    nothing: the folder is only set up by `start_run_dir`, once model and data have loaded.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    report, run_file = out / "report.json", out / "run.json"
    if report.exists() and not force:
        raise OutputError(f"{out} holds a finished run ({report}); pass --force to start over, "
                          "or choose another --out")
    if force or not run_file.exists():
        return False
    try:
        previous = json.loads(run_file.read_text())["settings"]
    except (ValueError, KeyError, OSError) as error:
        raise OutputError(f"{run_file} is unreadable ({error}); pass --force to start over") from error
    progress = any((out / name / "history.json").exists() for name in MODEL_DIRS)
    if isinstance(previous.get("recipe"), dict):  # a recipe field added since: its default is what that run did
        previous["recipe"] = {**asdict(Recipe()), **previous["recipe"]}
    if previous != settings and progress:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise OutputError(f"{out} holds an unfinished run with other settings ({', '.join(changed)}); "
                          "run the same command to resume it, pass --force to start over, or choose another --out")
    return progress


def start_run_dir(out, settings, force, resumed):
    """Create the run folder (clearing an earlier run's files with `force`) and record the settings."""
    out = Path(out)
    if force or not resumed:
        clear_run(out)
    make_output_dir(out)
    write_json(out / "run.json", {"format": RUN_FORMAT, "settings": settings}, force=True)


def make_output_dir(out):
    """Create `out` (and its parents), or say in one line why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {out}: {error.strerror or error}") from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")


def clear_run(out):
    """Remove what a previous run wrote in `out` (only the files and folders train creates)."""
    from keffconvert.report.run_files import CONFUSION_FILES, HEATMAP_FILE, PLOT_FILES, SAMPLE_FILE

    if not ((out / "run.json").is_file() or (out / "report.json").is_file()):
        return  # not a run folder: touch nothing
    for name in (*RUN_FILES, *PLOT_FILES.values(), *CONFUSION_FILES.values(), HEATMAP_FILE, SAMPLE_FILE):
        if (out / name).is_file():
            (out / name).unlink()
    for name in MODEL_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def source_name(model):
    if isinstance(model, keras.Model):
        return model.name
    path = Path(os.fspath(model))
    return path.stem if path.suffix.lower() in MODEL_SUFFIXES else os.fspath(model).lower()


def default_out(model, mode):
    return Path("runs") / f"{source_name(model).replace('/', '_')}-{mode}"
