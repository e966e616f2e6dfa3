"""The files a training run's report writes into its run folder (`train.run_dir` clears them)."""

PLOT_FILES = {"accuracy": "accuracy_vs_params.png", "curves": "training_curves.png"}
# Drawn only when the report holds per-class results (older reports do not): one per model role.
CONFUSION_FILES = {"original": "confusion_original.png", "converted": "confusion_converted.png"}
SAMPLE_FILE = "test_sample.npz"  # the test images the heatmaps are drawn on
HEATMAP_FILE = "heatmaps.png"
