"""Inference export: fold the model (`fold`), check it against its source (`check`), write it
(`formats`; `tflite` for TensorFlow Lite, float32 or int8).

The names below load on first use (`keffconvert.lazy`), so the command line can read
`export.check`'s defaults without starting Keras.
"""

from keffconvert.lazy import lazy_names

_HOMES = {
    **dict.fromkeys(["DEFAULT_TOLERANCE", "describe_check", "verify_export"], "keffconvert.export.check"),
    **dict.fromkeys(["DEFAULT_MAX_DENSE_WEIGHTS", "TARGETS", "FoldReport", "inference_model"], "keffconvert.export.fold"),
    **dict.fromkeys(["output_ending", "save_keras", "save_saved_model"], "keffconvert.export.formats"),
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
