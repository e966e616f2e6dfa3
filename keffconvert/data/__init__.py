"""Data: where images come from and how they reach a model.

`sources.open_data` opens what training reads ('digits', an `.npz`, an image folder, TFRecord
shards) as three splits: in memory (`arrays.Dataset`) or streamed from disk
(`stream.StreamDataset`), with `splits` and `checks` doing the pure-numpy work; `images_tf` and
`stream` are the TensorFlow side (decoding, tf.data pipelines, augmentation). `image_sources`
opens what calibration reads (labels optional, flat folders too) as batch sources;
`model_inputs` draws calibration and probe sets from them, `pixels` scales images as a model
takes them. The names below load on first use (`keffconvert.lazy`).
"""

from keffconvert.lazy import lazy_names

_HOMES = {"Dataset": "keffconvert.data.arrays", "is_streamed": "keffconvert.data.sources",
          "load_dataset": "keffconvert.data.sources", "open_data": "keffconvert.data.sources"}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
