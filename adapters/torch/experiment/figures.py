"""PNG figures of ``simcore grow`` runs (matplotlib, Agg backend: no display needed).

* :func:`plot_similarity` — the paper's Fig. 6: histogram of the pairwise cosine
  similarities between the neurons of layer 2 at the end of training, without
  and with the similarity phase, per method (and, for a run alone, at the seed
  vs at the end), with the share of pairs inside [-0.5, 0.5];
* :func:`plot_curves` — test accuracy and parameter count over epochs;
* :func:`plot_gradcam` — the paper's Fig. 4: inputs, then the Grad-CAM maps of
  the baseline and of the model grown with the similarity phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_curves", "plot_gradcam", "plot_similarity"]

from .config import TERM_LABELS  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _hist(ax, stats: dict[str, Any], label: str, color: str) -> None:
    edges = np.asarray(stats["edges"])
    counts = np.asarray(stats["counts"], dtype=float)
    share = counts / max(counts.sum(), 1.0)
    ax.stairs(share, edges, fill=True, alpha=0.45, color=color,
              label=f"{label}: {100 * stats['share_within_half']:.0f}% in [-0.5, 0.5], "
                    f"mean |cos| {stats['mean_abs']:.3f}")


def plot_similarity(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 6: layer-2 cosine-similarity histograms, baseline vs the other terms, per method.

    Uses each group's first seed. A method run with only one choice of terms
    shows that run at the seed and at the end instead.
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    by_method: dict[tuple[str, str], dict[str, dict]] = {}
    for r in sorted(results, key=lambda r: r["config"]["seed"]):
        c = r["config"]
        by_method.setdefault((c["model"], c["method"]), {}).setdefault(c["terms"], r)
    fig, axes = plt.subplots(1, len(by_method), figsize=(5.2 * len(by_method), 3.6),
                             squeeze=False)
    colors = {"none": "tab:gray", "eq2": "tab:orange", "eq4": "tab:green", "both": "tab:blue"}
    for ax, ((model, method), runs) in zip(axes[0], sorted(by_method.items()), strict=True):
        if len(runs) == 1:
            (terms, run), = runs.items()
            _hist(ax, run["similarity"]["seed"], "seed", "tab:gray")
            _hist(ax, run["similarity"]["final"], f"end ({TERM_LABELS[terms]})", colors[terms])
        else:
            for terms, run in runs.items():
                _hist(ax, run["similarity"]["final"], TERM_LABELS[terms], colors[terms])
        layer = next(iter(runs.values()))["similarity"]["layer"]
        ax.set_title(f"{model} {method}: layer 2 ({layer})", fontsize=9)
        ax.set_xlabel("cosine similarity between neurons")
        ax.set_ylabel("share of pairs")
        ax.set_xlim(-1, 1)
        ax.legend(fontsize=6.5, loc="upper left")
    return _save(fig, path)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy (left) and parameter count (right) over epochs, one line per run."""
    if not results:
        raise ValueError("results is empty: nothing to plot")
    fig, (acc_ax, par_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in results:
        epochs = [h["epoch"] for h in r["history"]]
        acc_ax.plot(epochs, [h["test_accuracy"] for h in r["history"]], marker=".",
                    label=r["label"])
        par_ax.plot(epochs, [h["parameters"] for h in r["history"]], marker=".",
                    label=r["label"])
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    par_ax.set(xlabel="epoch", ylabel="parameters", title="parameters (growth steps)")
    par_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    acc_ax.legend(fontsize=6)
    return _save(fig, path)


def plot_gradcam(images: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                 path: str | Path, *, titles: Sequence[str] | None = None) -> Path:
    """Fig. 4: ``images`` ``(K, H, W, 3)`` in [0, 1] on top, then one row of maps per model.

    ``rows`` pairs a row label with Grad-CAM maps ``(K, H, W)`` in [0, 1]; each
    map is drawn over its (greyed) input.
    """
    images = np.asarray(images, dtype=float)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (K, H, W, 3), got shape {images.shape}")
    count = images.shape[0]
    for label, maps in rows:
        if np.shape(maps) != images.shape[:3]:
            raise ValueError(f"maps of row {label!r} have shape {np.shape(maps)}, "
                             f"expected {images.shape[:3]}")
    fig, axes = plt.subplots(1 + len(rows), count, figsize=(1.5 * count, 1.6 * (1 + len(rows))),
                             squeeze=False)
    grey = images.mean(axis=-1)
    for k in range(count):
        axes[0, k].imshow(images[k])
        if titles is not None:
            axes[0, k].set_title(titles[k], fontsize=7)
        for row, (_label, maps) in enumerate(rows, start=1):
            axes[row, k].imshow(grey[k], cmap="gray")
            axes[row, k].imshow(np.asarray(maps[k]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for row, label in enumerate(["input"] + [label for label, _ in rows]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
