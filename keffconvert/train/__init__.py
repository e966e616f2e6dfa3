"""Training: convert, train the converted model (and the original beside it), report.

    from keffconvert.train import Recipe, train

    report = train("efficientnetb0", data="digits", image_size=32, with_original=True,
                   recipe=Recipe(epochs=20), out="runs/b0")

`run.train` is the whole run; each module below does one job of it: `recipe` (how to train),
`inputs` (model and data), `run_dir` (the run folder), `one_model` (one model's training and
test), `backup` (the per-epoch atomic backup), `callbacks`, `precision`, `distill` and
`feature_distill`, `finetune`, `distribute_tf`; `sweep` runs `train` at several cpgs.
"""

from keffconvert.train.recipe import Recipe, recipe_from_options
from keffconvert.train.run import train

__all__ = ["Recipe", "recipe_from_options", "train"]
