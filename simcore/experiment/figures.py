"""PNG figures of ``simcore grow`` runs (matplotlib, Agg backend: no display needed).

* :func:`plot_similarity` — the paper's Fig. 6: histogram of the pairwise cosine
  similarities between the neurons of layer 2 at the end of training, without
  and with the similarity phase, per method (and, for a run alone, at the seed
  vs at the end), with the share of pairs inside [-0.5, 0.5];
* :func:`plot_phase_similarity` — Fig. 6 for every phase: per run with phases (first seed
  of each method and terms), one small panel per (growth, grown layer) with the cosine
  histogram just before and just after the similarity phase;
* :func:`plot_curves` — test accuracy and parameter count over epochs;
* :func:`plot_gradcam` — the paper's Fig. 4: inputs, then the Grad-CAM maps of
  the baseline and of the model grown with the similarity phase.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["TERM_COLORS", "plot_curves", "plot_gradcam", "plot_phase_similarity",
           "plot_similarity", "term_color"]

from .statistics import MODEL_NAMES as _MODEL_NAMES  # noqa: E402
from .statistics import run_order, terms_label  # noqa: E402

#: One colour per choice of terms, the same in every figure: baseline grey, +ours blue,
#: +control red, Eq. 2 only orange, Eq. 4 only green.
TERM_COLORS = {"none": "0.45", "both": "tab:blue", "control": "tab:red", "eq2": "tab:orange",
               "eq4": "tab:green"}
_COLOR_NAMES = {"tab:blue": "blue", "tab:red": "red", "tab:orange": "orange",
                "tab:green": "green"}
#: Line styles that tell several N of one terms apart (an N sweep), in the order of N.
_N_STYLES = ("-", "--", ":", "-.")


def term_color(terms: str) -> str:
    return TERM_COLORS.get(terms, "tab:purple")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _hist(ax, stats: dict[str, Any], label: str, color: str, *, filled: bool) -> None:
    """One histogram: filled (the reference, e.g. the baseline) or as an outline on top, so
    that several stay readable where they overlap."""
    edges = np.asarray(stats["edges"])
    counts = np.asarray(stats["counts"], dtype=float)
    share = counts / max(counts.sum(), 1.0)
    text = (f"{label}: {100 * stats['share_within_half']:.0f}% in [-0.5, 0.5], "
            f"mean |cos| {stats['mean_abs']:.3f}")
    if filled:
        ax.stairs(share, edges, fill=True, alpha=0.5, color=color, label=text)
    else:
        ax.stairs(share, edges, color=color, linewidth=1.6, label=text)


def plot_similarity(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 6: layer-2 cosine-similarity histograms, baseline vs the other terms, per method.

    Uses each group's first seed; panels in the table's order with one y scale, each legend
    under its panel. A method run with only one choice of terms shows that run at the seed
    and at the end instead.
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    by_method: dict[tuple[str, str], dict[str, dict]] = {}
    for r in sorted(results, key=lambda r: (run_order(r["config"]["model"],
                                                      r["config"]["method"],
                                                      r["config"]["terms"], None),
                                            r["config"]["seed"])):
        c = r["config"]
        by_method.setdefault((c["model"], c["method"]), {}).setdefault(c["terms"], r)
    fig, axes = plt.subplots(1, len(by_method), figsize=(4.6 * len(by_method), 3.4),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, ((model, method), runs) in zip(axes[0], by_method.items(), strict=True):
        ax.axvspan(-0.5, 0.5, color="0.94", zorder=0)  # the band the shares count
        if len(runs) == 1:
            (terms, run), = runs.items()
            _hist(ax, run["similarity"]["seed"], "at the seed", TERM_COLORS["none"], filled=True)
            _hist(ax, run["similarity"]["final"], f"{terms_label(method, terms)}, at the end",
                  term_color(terms), filled=False)
        else:
            for terms, run in runs.items():
                _hist(ax, run["similarity"]["final"], terms_label(method, terms),
                      term_color(terms), filled=terms == "none")
        first = next(iter(runs.values()))
        ax.set_title(f"{_MODEL_NAMES.get(model, model)} {terms_label(method, 'none')}: "
                     f"layer 2 ({first['similarity']['layer']}), seed {first['config']['seed']}",
                     fontsize=9)
        ax.set_xlabel("cosine similarity between neurons (shaded: [-0.5, 0.5])")
        ax.set_xlim(-1, 1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    axes[0, 0].set_ylabel("share of pairs")
    return _save(fig, path)


def _phase_runs(results: Sequence[dict[str, Any]], steps: int | None) -> list[dict[str, Any]]:
    """The first seed of each (model, method, terms != none, N) whose growths recorded a
    phase; only N = ``steps`` unless ``steps`` is None."""
    chosen: dict[tuple[str, str, str, Any], dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r["config"]["seed"],
                                            r["config"].get("data_seed") or 0)):
        c = r["config"]
        has_phase = any((g.get("phase") or {}).get("layers") for g in r.get("growths", []))
        if c["terms"] != "none" and has_phase and steps in (None, r.get("phase_steps")):
            chosen.setdefault((c["model"], c["method"], c["terms"], r.get("phase_steps")), r)
    return [chosen[key] for key in sorted(chosen, key=lambda k: run_order(*k))]


def _share(stats: dict[str, Any]) -> np.ndarray:
    counts = np.asarray(stats["counts"], dtype=float)
    return counts / max(counts.sum(), 1.0)


def _side_label(side: str, stats: dict[str, Any]) -> str:
    return (f"{side}: {100 * stats['share_within_half']:.0f}% in [-0.5, 0.5], "
            f"mean |cos| {stats['mean_abs']:.3f}")


def plot_phase_similarity(results: Sequence[dict[str, Any]], path: str | Path, *,
                          columns: int = 6, phase_steps: int | None = None) -> Path:
    """Fig. 6 for every phase: cosine histograms just before and just after each phase.

    For the first seed of each (model, method, terms != none, N) run whose growths
    recorded a phase, one block of panels, one panel per (growth, grown layer), wrapped at
    ``columns``; every panel shares the figure's y scale and gives, for before and after,
    the share of pairs in [-0.5, 0.5] and the mean |cos|. An N sweep gives a block per N;
    ``phase_steps`` keeps the runs of that N only (e.g. N_best). Raises ``ValueError`` when
    no run (of that N) has a phase.
    """
    runs = _phase_runs(results, phase_steps)
    if not runs:
        raise ValueError("no run recorded a similarity phase: nothing to plot")
    blocks = []
    for r in runs:
        panels = [(number, g, name, layer)
                  for number, g in enumerate(r["growths"], start=1) if g.get("phase")
                  for name, layer in g["phase"]["layers"].items()]
        blocks.append((r, panels))
    top = max(float(_share(layer[side]).max()) for _r, panels in blocks
              for *_ignored, layer in panels for side in ("before", "after"))
    width = min(columns, max(len(panels) for _r, panels in blocks))
    heights = [math.ceil(len(panels) / width) for _r, panels in blocks]
    fig = plt.figure(figsize=(2.7 * width, 2.35 * sum(heights) + 0.45 * len(blocks)),
                     layout="constrained")
    subfigures = fig.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0]
    for subfigure, (r, panels), rows in zip(subfigures, blocks, heights, strict=True):
        c = r["config"]
        steps = r.get("phase_steps")
        model = _MODEL_NAMES.get(c["model"], c["model"])
        subfigure.suptitle(f"{model} {terms_label(c['method'], c['terms'])}"
                           + ("" if steps is None else f", N = {steps}")
                           + f" (seed {c['seed']}): cosine similarity between the neurons of "
                           f"each grown layer, before (grey) and after "
                           f"({_COLOR_NAMES.get(term_color(c['terms']), 'coloured')}) the phase; "
                           "shaded: [-0.5, 0.5]",
                           fontsize=9, x=0.01, ha="left", fontweight="bold")
        axes = subfigure.subplots(rows, width, squeeze=False)
        for ax in axes.ravel()[len(panels):]:
            ax.set_visible(False)
        for ax, (number, growth, name, layer) in zip(axes.ravel(), panels, strict=False):
            ax.axvspan(-0.5, 0.5, color="0.93", zorder=0)  # the band the shares count
            before, after = layer["before"], layer["after"]
            ax.stairs(_share(before), np.asarray(before["edges"]), fill=True, color="0.6",
                      alpha=0.7, label=_side_label("before", before))
            ax.stairs(_share(after), np.asarray(after["edges"]), color=term_color(c["terms"]),
                      linewidth=1.4, label=_side_label("after", after))
            change = layer.get("relative_change")
            ax.set_title(f"growth {number} (epoch {growth.get('epoch', '?')}): {name}"
                         + ("" if change is None else f"\nweights moved {100 * change:.1f}%"),
                         fontsize=7.5)
            ax.set_xlim(-1, 1)
            ax.set_xticks([-1, -0.5, 0, 0.5, 1])
            ax.set_ylim(0, 1.45 * top)  # one scale for the figure; headroom for the legend
            ax.tick_params(labelsize=6.5)
            ax.legend(fontsize=6, loc="upper left", frameon=False, handlelength=1.2,
                      borderaxespad=0.2)
        for index, ax in enumerate(axes.ravel()[:len(panels)]):
            if index + width >= len(panels):  # nothing drawn below this panel
                ax.set_xlabel("cosine", fontsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel("share of pairs", fontsize=7)
    return _save(fig, path)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy (top) and parameter count (bottom) over epochs, one column per
    (model, method) in the table's order: per (terms, N) the mean over seeds as a line and the
    range over seeds (min to max) shaded; one y scale per row; legends under the columns."""
    if not results:
        raise ValueError("results is empty: nothing to plot")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        c = r["config"]
        key = (c["model"], c["method"], c["terms"], r.get("phase_steps"))
        groups.setdefault(key, []).append(r)
    columns = list(dict.fromkeys(k[:2] for k in sorted(groups, key=lambda k: run_order(*k))))
    fig, axes = plt.subplots(2, len(columns), figsize=(4.6 * len(columns), 6.2), squeeze=False,
                             sharey="row", sharex=True, layout="constrained")
    for column, (model, method) in enumerate(columns):
        acc_ax, par_ax = axes[0, column], axes[1, column]
        keys = [k for k in sorted(groups, key=lambda k: run_order(*k)) if k[:2] == (model, method)]
        steps_seen: dict[str, list] = {}
        for key in keys:
            terms, steps = key[2], key[3]
            runs = groups[key]
            steps_seen.setdefault(terms, []).append(steps)
            style = _N_STYLES[(len(steps_seen[terms]) - 1) % len(_N_STYLES)]
            epochs = [h["epoch"] for h in runs[0]["history"]]
            label = terms_label(method, terms) + ("" if steps is None or terms == "none"
                                                  else f", N = {steps}")
            label += f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            for ax, field in ((acc_ax, "test_accuracy"), (par_ax, "parameters")):
                values = np.array([[h[field] for h in r["history"]] for r in runs], dtype=float)
                ax.plot(epochs, values.mean(axis=0), style, color=term_color(terms),
                        marker=".", linewidth=1.5, label=label)
                if len(runs) > 1:
                    ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                                    color=term_color(terms), alpha=0.15, linewidth=0)
        acc_ax.set_title(f"{_MODEL_NAMES.get(model, model)} {terms_label(method, 'none')}",
                         fontsize=10)
        par_ax.set_xlabel("epoch")
        par_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        par_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        par_ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.22),
                      frameon=False)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("parameters (steps: growths)")
    fig.suptitle("line: mean over seeds; shaded: min to max over seeds", fontsize=9)
    return _save(fig, path)


def plot_gradcam(images: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                 path: str | Path, *, titles: Sequence[str] | None = None,
                 title: str | None = None) -> Path:
    """Fig. 4: ``images`` ``(K, H, W, 3)`` in [0, 1] on top, then one row of maps per model.

    ``rows`` pairs a row label with Grad-CAM maps ``(K, H, W)`` in [0, 1]; each
    map is drawn over its (greyed) input, with a colour bar for the map's scale and
    ``title`` (if given) above the figure.
    """
    images = np.asarray(images, dtype=float)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (K, H, W, 3), got shape {images.shape}")
    count = images.shape[0]
    for label, maps in rows:
        if np.shape(maps) != images.shape[:3]:
            raise ValueError(f"maps of row {label!r} have shape {np.shape(maps)}, "
                             f"expected {images.shape[:3]}")
    fig, axes = plt.subplots(1 + len(rows), count,
                             figsize=(1.25 * count + 1.2, 1.35 * (1 + len(rows)) + 0.5),
                             squeeze=False, layout="constrained")
    grey = images.mean(axis=-1)
    shown = None
    for k in range(count):
        axes[0, k].imshow(images[k])
        if titles is not None:
            axes[0, k].set_title(titles[k], fontsize=8)
        for row, (_label, maps) in enumerate(rows, start=1):
            axes[row, k].imshow(grey[k], cmap="gray")
            shown = axes[row, k].imshow(np.asarray(maps[k]), cmap="jet", alpha=0.5, vmin=0,
                                        vmax=1)
    for row, label in enumerate(["input"] + [label for label, _ in rows]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes[1:, :].ravel().tolist(), shrink=0.9, pad=0.01)
        bar.set_label("Grad-CAM (1: the image's\nmost used region)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
