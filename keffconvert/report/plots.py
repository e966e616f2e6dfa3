"""PNG plots for the training report, drawn with matplotlib's Agg canvas (no display needed).

Both read only the report dict, so `keffconvert report` can redraw them from `report.json`.
"""

from __future__ import annotations

from keffconvert.outputs import atomic_path

COLORS = {"original": "#1f77b4", "converted": "#d62728"}


def _figure(width=6.4, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)  # no pyplot: no global state, no display
    return figure


def _save(figure, path):
    figure.tight_layout()
    with atomic_path(path, force=True) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_accuracy_vs_params(report, path):
    """Test accuracy (%) against trainable parameters, one labelled point per trained model."""
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    trained = [m for m in report["models"] if m["test_accuracy"] is not None]
    for m in report["models"]:
        x = m["trainable_params"]
        if m["test_accuracy"] is None:
            ax.axvline(x, color=COLORS.get(m["role"], "gray"), linestyle=":", linewidth=1)
            ax.annotate(f"{m['name']}\n(not trained)", (x, 0.5), xycoords=("data", "axes fraction"),
                        ha="center", fontsize=8, color="gray")
            continue
        y = 100 * m["test_accuracy"]
        ax.scatter([x], [y], s=60, color=COLORS.get(m["role"], "black"), zorder=3)
        ax.annotate(f"{m['name']}\n{x:,} params, {y:.2f}%", (x, y), textcoords="offset points", xytext=(0, 9),
                    ha="center", fontsize=8)
    if len(trained) == 2:
        xs = [m["trainable_params"] for m in trained]
        ys = [100 * m["test_accuracy"] for m in trained]
        ax.plot(xs, ys, color="gray", linewidth=1, linestyle="--", zorder=1)
    ax.set_xscale("log")
    params = [m["trainable_params"] for m in report["models"]]
    ax.set_xlim(min(params) / 2, max(params) * 2)
    if trained:
        low = min(100 * m["test_accuracy"] for m in trained)
        high = max(100 * m["test_accuracy"] for m in trained)
        ax.set_ylim(max(0, low - max(5, (high - low))), min(100, high + max(5, (high - low))))
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['source']} ({report['mode']}): accuracy against parameters", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return _save(figure, path)


def plot_training_curves(report, path):
    """Validation accuracy per epoch (solid) and training accuracy (dashed) for every trained model."""
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    drawn = False
    for m in report["models"]:
        history = m.get("history") or []
        color = COLORS.get(m["role"], None)
        if m.get("reference") and m.get("test_accuracy") is not None:
            ax.axhline(100 * m["test_accuracy"], color=color, linestyle="-.", linewidth=1,
                       label=f"{m['name']} test (as it is)")
            drawn = True
        if not history:
            continue
        if m.get("initial"):  # epoch 0: the converted model before any training
            history = [{"epoch": 0, **m["initial"]}] + list(history)
        epochs = [e["epoch"] for e in history]
        if any("test_accuracy" in e for e in history):
            ax.plot(epochs, [100 * e.get("test_accuracy", float("nan")) for e in history], color=color,
                    marker="s", markersize=3, linestyle="-", alpha=0.8, label=f"{m['name']} test")
        if any("val_accuracy" in e for e in history):
            ax.plot(epochs, [100 * e.get("val_accuracy", float("nan")) for e in history], color=color,
                    marker="o", markersize=3, label=f"{m['name']} validation")
        if any("accuracy" in e for e in history):
            ax.plot(epochs, [100 * e.get("accuracy", float("nan")) for e in history], color=color,
                    linestyle="--", alpha=0.6, label=f"{m['name']} training")
        if m.get("best_epoch"):
            ax.axvline(m["best_epoch"], color=color, linestyle=":", linewidth=1)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy per epoch (dotted: best checkpoint)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    return _save(figure, path)


def plot_sweep(report, path):
    """A sweep's test accuracy against trainable parameters (left) and MACs (right): one point per
    channels-per-group setting, the original as a star, the Pareto front joined and filled."""
    figure = _figure(width=11, height=4.4)
    points = [{**report["reference"], "label": "original"}] + \
        [{**row, "label": f"cpg {row['channels_per_group']}"} for row in report["rows"]]
    for index, (cost, title) in enumerate((("trainable_params", "trainable parameters"), ("macs", "MACs per image"))):
        ax = figure.add_subplot(1, 2, index + 1)
        shown = [p for p in points if p[cost] is not None and p["test_accuracy"] is not None]
        for p in shown:
            x, y = p[cost], 100 * p["test_accuracy"]
            on_front = p[f"pareto_{cost}"]
            color = COLORS["original"] if p["label"] == "original" else COLORS["converted"]
            ax.scatter([x], [y], s=110 if p["label"] == "original" else 55, zorder=3,
                       marker="*" if p["label"] == "original" else "o", edgecolors=color,
                       facecolors=color if on_front else "white", linewidths=1.5)
            ax.annotate(f"{p['label']}\n{y:.2f}%", (x, y), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=7)
        front = sorted((p[cost], 100 * p["test_accuracy"]) for p in shown if p[f"pareto_{cost}"])
        if front:
            ax.plot([x for x, _ in front], [y for _, y in front], color="gray", linestyle="--", linewidth=1,
                    zorder=1, label="Pareto front (filled points)")
            ax.legend(fontsize=8, loc="lower right")
        if shown:
            xs = [p[cost] for p in shown]
            ys = [100 * p["test_accuracy"] for p in shown]
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
            spread = max(ys) - min(ys)
            ax.set_ylim(max(0, min(ys) - max(3, spread / 2)), min(101, max(ys) + max(3, spread / 2)))
        else:
            ax.text(0.5, 0.5, f"no {title} known", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{title} (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"{report['source']} ({report['mode']}, {report['epochs']} epochs): accuracy against size",
                    fontsize=10)
    return _save(figure, path)


def plot_confusion_matrix(per_class, path, title):
    """The confusion matrix of one model (rows: true class, columns: predicted), counts in the cells,
    shaded by the fraction of the true class, with the class names of the data."""
    import numpy as np

    counts = np.asarray(per_class["confusion_matrix"], dtype=float)
    names = per_class["class_names"]
    side = min(12.0, 2.0 + 0.45 * len(names))
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot(1, 1, 1)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\naccuracy {100 * per_class['accuracy']:.2f}% on {per_class['samples']} test images",
                 fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(figure, path)


HEATMAP_PANEL_INCHES = 2.0
HEATMAP_DPI = 100
HEATMAP_TITLE_INCHES = 0.8


def heatmap_figure_size(rows, columns):
    """(width, height) in pixels of the heatmaps PNG: one square panel per image and column, plus a
    title band."""
    return (round(columns * HEATMAP_PANEL_INCHES * HEATMAP_DPI),
            round((rows * HEATMAP_PANEL_INCHES + HEATMAP_TITLE_INCHES) * HEATMAP_DPI))


def plot_heatmaps(images, labels, class_names, columns, path, *, title=""):
    """Grad-CAM heatmaps side by side: one row per image; the image itself with its true class,
    then one column per model, its heatmap over the image with its predicted class and confidence
    (green when right, red when wrong).

    `images` are uint8 (N, H, W, C); `columns` is a list of (heading, GradCam) pairs.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, count = len(images), 1 + len(columns)
    width, height = heatmap_figure_size(rows, count)
    figure = Figure(figsize=(width / HEATMAP_DPI, height / HEATMAP_DPI), dpi=HEATMAP_DPI)
    FigureCanvasAgg(figure)
    top = 1 - HEATMAP_TITLE_INCHES / (height / HEATMAP_DPI)
    grid = figure.add_gridspec(rows, count, left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.25)
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)  # noqa: E731
    for i, image in enumerate(images):
        shown = image[..., 0] if image.shape[-1] == 1 else image
        gray = "gray" if image.shape[-1] == 1 else None
        ax = figure.add_subplot(grid[i, 0])
        ax.imshow(shown, cmap=gray)
        ax.set_title(f"true: {name(int(labels[i]))}", fontsize=8)
        ax.axis("off")
        for j, (heading, cam) in enumerate(columns, 1):
            ax = figure.add_subplot(grid[i, j])
            ax.imshow(np.asarray(image, dtype=float).mean(axis=-1), cmap="gray")
            ax.imshow(cam.maps[i], cmap="jet", alpha=0.15 + 0.55 * cam.maps[i], vmin=0, vmax=1)  # cold: see-through
            right = int(cam.predicted[i]) == int(labels[i])
            ax.set_title(f"{heading}: {name(int(cam.predicted[i]))} ({100 * cam.confidence[i]:.1f}%)", fontsize=8,
                         color="#2ca02c" if right else "#d62728")
            ax.axis("off")
    import textwrap

    figure.suptitle("\n".join(textwrap.wrap(title, max(30, width // 6))[:3]), fontsize=8,
                    y=1 - 0.05 / (height / HEATMAP_DPI), va="top")
    with atomic_path(path, force=True) as tmp:
        figure.savefig(tmp, format="png")
    return path
