"""TensorFlow Lite export (TensorFlow only): float32, or int8 post-training quantisation.

The model is first folded for inference by `keffconvert.export.inference_model(target="tflite")`
(BatchNormalization into convs, interleaves into weights where exact, GroupedPointwiseConv2D as
Conv2D(groups), which TFLite runs as a grouped CONV_2D), then converted with
`tf.lite.TFLiteConverter`.

int8 is full-integer post-training quantisation of weights and activations (TFLite's
`Optimize.DEFAULT` with a representative dataset and `TFLITE_BUILTINS_INT8` ops); the model keeps
float32 input and output tensors, so it is called like the float32 one. The representative
dataset is calibration data: an .npz holding `x` (or `x_test`) images of the model's input
size, or 'digits' (scikit-learn's digits resized to the input size).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from keffconvert.quiet_start import quiet_stderr

DEFAULT_CALIBRATION_SAMPLES = 128


def to_tflite(model, *, int8=False, calibration=None, per_channel=True, fold=True, max_dense_weights=None,
              report=None):
    """The .tflite flatbuffer (bytes) of `model`.

    `calibration`: an array of input images (n, H, W, C), required for `int8`.
    `per_channel=False` quantises each int8 weight tensor with one scale instead of one per
    output channel. Per channel is TFLite's default and the more accurate, but each output
    channel then carries a float32 scale and an int64 zero point for its weights and for its
    bias (24 bytes), which outweighs the 16 int8 weights of a kEffNet grouped filter: half of a
    converted EfficientNet-B0's int8 file is that metadata.
    `fold=False` converts the model as it is (no BN or interleave folding).
    """
    import tensorflow as tf

    from keffconvert.export.fold import DEFAULT_MAX_DENSE_WEIGHTS, inference_model

    if fold:
        limit = DEFAULT_MAX_DENSE_WEIGHTS if max_dense_weights is None else max_dense_weights
        model = inference_model(model, target="tflite", max_dense_weights=limit, batch_size=1, report=report)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        if calibration is None or len(calibration) == 0:
            raise ValueError("int8 quantisation needs calibration images")
        samples = np.asarray(calibration, "float32")

        def representative():
            for i in range(len(samples)):
                yield [samples[i:i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if not per_channel:
            converter._experimental_disable_per_channel = True
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints its signature
        return converter.convert()


def interpreter(content, threads=2):
    """A ready tf.lite.Interpreter for a flatbuffer (XNNPACK is TFLite's default CPU delegate)."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (LiteRT)
        it = tf.lite.Interpreter(model_content=content, num_threads=threads)
        it.allocate_tensors()  # also prints "Created TensorFlow Lite XNNPACK delegate" on fd 2
    return it


def predict(content, x, threads=2):
    """Run the flatbuffer on each image of `x` (batch 1), return the stacked outputs."""
    it = content if not isinstance(content, (bytes, bytearray)) else interpreter(content, threads)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    x = np.asarray(x, "float32")
    if tuple(inp["shape"][1:]) != tuple(x.shape[1:]) or inp["shape"][0] != 1:
        it.resize_tensor_input(inp["index"], (1,) + tuple(x.shape[1:]))
        it.allocate_tensors()
    results = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1])
        it.invoke()
        results.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def write_tflite(content, path, force=False):
    from keffconvert.outputs import atomic_path

    with atomic_path(path, force) as tmp:
        tmp.write_bytes(content)
    return path


def predict_saved_model(path, x):
    """Outputs of a SavedModel written by `keffconvert.export.save_saved_model` (signature `serve`)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(tf.constant(np.asarray(x, "float32"))))
