"""Start the Keras backend without TensorFlow's start-up chatter on stderr: for the command line.

TensorFlow 2.21 prints oneDNN and CUDA-probe INFO lines from C++ (absl) at import and first
device query, and no environment variable silences them any more. With TF_CPP_MIN_LOG_LEVEL >= 2
(the `keffconvert` command's default) they are dropped by pointing fd 2 at /dev/null for those two
steps only; Python exceptions are unaffected. Set TF_CPP_MIN_LOG_LEVEL=0 to see them.

Only the command does this (`keffconvert.cli.main` calls `start_backend` before any command
imports Keras): a program that imports keffconvert owns its stderr, and importing keffconvert
never redirects it. `quiet_stderr` is also used around TFLite conversion, which prints the same
way.
"""

import contextlib
import os
import sys


def tf_logs_wanted():
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") or 0) < 2


@contextlib.contextmanager
def quiet_stderr():
    """Point fd 2 at /dev/null for the block, unless TF_CPP_MIN_LOG_LEVEL < 2 asks for the logs."""
    if tf_logs_wanted():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start_backend():
    """Import Keras and its TensorFlow backend and probe the devices, without their C++ log lines.

    Does nothing once Keras is imported (the lines are printed by then)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules:
        return
    with quiet_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
