"""Load the model to convert: a `.keras` / `.h5` file (tf.keras 2.x ones included), or a built-in name."""

from keffconvert.loading.builtin import BUILTIN_MODELS
from keffconvert.loading.legacy_h5 import translate_legacy_config
from keffconvert.loading.model_file import MODEL_SUFFIXES, is_model_path, load_model

__all__ = ["BUILTIN_MODELS", "MODEL_SUFFIXES", "is_model_path", "load_model", "translate_legacy_config"]
