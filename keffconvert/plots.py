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
