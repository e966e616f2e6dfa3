"""The built-in model names (`keras.applications`), for users who have no model file."""

import keras

from keffconvert.errors import InputError
from keffconvert.loading.failures import one_line

BUILTIN_MODELS = {
    "efficientnetb0": keras.applications.EfficientNetB0,
    "efficientnetb1": keras.applications.EfficientNetB1,
    "efficientnetb2": keras.applications.EfficientNetB2,
    "efficientnetb3": keras.applications.EfficientNetB3,
    "efficientnetb4": keras.applications.EfficientNetB4,
    "efficientnetb5": keras.applications.EfficientNetB5,
    "efficientnetb6": keras.applications.EfficientNetB6,
    "efficientnetb7": keras.applications.EfficientNetB7,
    "efficientnetv2-b0": keras.applications.EfficientNetV2B0,
    "efficientnetv2-b1": keras.applications.EfficientNetV2B1,
    "efficientnetv2-b2": keras.applications.EfficientNetV2B2,
    "efficientnetv2-b3": keras.applications.EfficientNetV2B3,
    "efficientnetv2-s": keras.applications.EfficientNetV2S,
    "efficientnetv2-m": keras.applications.EfficientNetV2M,
    "efficientnetv2-l": keras.applications.EfficientNetV2L,
    "mobilenetv2": keras.applications.MobileNetV2,
    "resnet50": keras.applications.ResNet50,
}


def builtin_key(source):
    """The BUILTIN_MODELS key for a spelling like 'EfficientNet-B0' or 'efficientnet_b0'."""
    compact = source.strip().lower().replace("-", "").replace("_", "")
    for key in BUILTIN_MODELS:
        if key.replace("-", "") == compact:
            return key
    return None


def build_builtin(name, *, classes, input_size, weights):
    kwargs = {"weights": weights, "classes": 1000 if classes is None else int(classes)}
    if input_size is not None:
        kwargs["input_shape"] = (int(input_size), int(input_size), 3)
    try:
        return BUILTIN_MODELS[name](**kwargs)
    except Exception as exc:
        # Keras raises ValueError for a bad size/classes/weights combination, h5py an OSError for
        # an unreadable weights file, and keras.utils.get_file (Keras 3.15) a bare
        # Exception("URL fetch failure on ...") when the weights cannot be downloaded. Anything
        # else is a bug, reported as one.
        if not isinstance(exc, (ValueError, OSError)) and type(exc) is not Exception:
            raise
        raise InputError(f"{name}: cannot build the built-in model: {one_line(exc)}") from exc
