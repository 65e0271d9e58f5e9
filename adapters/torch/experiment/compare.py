"""Several runs — methods x similarity terms x seeds — on one dataset, then the table and figures.

:func:`run_experiment` is what ``simcore grow`` calls: every run lives in
``<out>/runs/<label>/`` (its checkpoint and ``result.json``), so re-running the
same command reuses finished runs and resumes an interrupted one; the
combined results, the paper-shaped table and the figures go to ``<out>/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import METHODS, TERMS, RunConfig
from .data import ImageDataset, load_dataset, normalize
from .gradcam import grad_cam
from .report import format_table, summarize, write_results
from .runner import CHECKPOINT, Hooks, load_model, resolve_device, run_one

__all__ = ["gradcam_figure", "run_experiment"]


def _check_list(values: Sequence[Any], allowed: Sequence[Any] | None, name: str) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list")
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise ValueError(f"{name} holds {v!r}; expected values from {tuple(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} holds duplicates: {list(values)}")
    return list(values)


def _one_per_class(dataset: ImageDataset, count: int) -> torch.Tensor:
    """Indices of the first test image of each of the first ``count`` classes present."""
    labels = dataset.test_labels.cpu()
    picks = []
    for cls in range(dataset.num_classes):
        hits = torch.nonzero(labels == cls)
        if len(hits):
            picks.append(int(hits[0, 0]))
        if len(picks) == count:
            break
    return torch.tensor(picks, dtype=torch.long)


def gradcam_figure(baseline_dir: str | Path, other_dir: str | Path, dataset: ImageDataset,
                   path: str | Path, *, count: int = 6, labels=("baseline", "+ours"),
                   device: str | torch.device = "cpu") -> Path:
    """Fig. 4 from two finished runs: one test image per class, and both models' Grad-CAM."""
    from .figures import plot_gradcam

    index = _one_per_class(dataset, count)
    raw = dataset.test_images[index.to(dataset.test_images.device)].to(device)
    targets = dataset.test_labels[index.to(dataset.test_labels.device)].to(device)
    inputs = normalize(raw, dataset)
    rows = []
    for label, run_dir in zip(labels, (baseline_dir, other_dir), strict=True):
        model = load_model(Path(run_dir) / CHECKPOINT, device=device)
        rows.append((label, grad_cam(model, inputs, targets).cpu().numpy()))
    images = raw.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) / 255.0
    return plot_gradcam(images, rows, path, titles=[f"class {int(t)}" for t in targets])


def run_experiment(
    base: RunConfig,
    *,
    methods: Sequence[str],
    terms: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    fresh: bool = False,
    figures: bool = True,
    progress: bool = False,
    hooks: Hooks | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every (method, terms, seed) on ``base``, then write results, table and figures.

    Returns ``{"results": [...], "summary": [...], "table": str, "files": {kind: path}}``.
    ``fresh`` discards earlier runs in ``out_dir`` (otherwise finished runs are
    reused and an interrupted one resumes).
    """
    if not isinstance(base, RunConfig):
        raise TypeError(f"base must be a RunConfig, got {type(base).__name__}")
    methods = _check_list(methods, METHODS, "methods")
    terms = _check_list(terms, TERMS, "terms")
    seeds = _check_list(seeds, None, "seeds")
    configs = [base.replace(method=m, terms=t, seed=s)
               for m in methods for t in terms for s in seeds]  # validates every seed
    out = Path(out_dir)
    dataset = load_dataset(base.dataset, root=base.data_root, seed=base.data_seed,
                           train_limit=base.train_limit, test_limit=base.test_limit)
    device = resolve_device(base.device)
    dataset = dataset.to(device)
    say = echo or (lambda _text: None)
    say(f"simcore grow: {len(configs)} run(s) on {dataset.name} "
        f"({dataset.train_labels.shape[0]} train / {dataset.test_labels.shape[0]} test images), "
        f"{base.model}, {base.epochs} epochs, device {device}; output in {out}")
    results = []
    for number, config in enumerate(configs, start=1):
        run_dir = out / "runs" / config.label
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        result = run_one(config, run_dir, dataset=dataset, progress=progress, hooks=hooks,
                         resume=not fresh)
        say(f"[{number}/{len(configs)}] {config.label}: accuracy {result['final_accuracy']:.2f}%, "
            f"{result['parameters_seed']} -> {result['parameters_final']} parameters, "
            f"{result['training_seconds']:.1f} s")
        results.append(result)
    files = write_results(results, out)
    summary = summarize(results)
    table = format_table(summary)
    if figures:
        files.update(_figures(results, configs, out, dataset, device))
    return {"results": results, "summary": summary, "table": table, "files": files}


def _figures(results, configs, out, dataset, device) -> dict[str, Path]:
    from .figures import plot_curves, plot_similarity

    files = {"similarity_figure": plot_similarity(results, out / "similarity_layer2.png"),
             "curves_figure": plot_curves(results, out / "curves.png")}
    first_seed = configs[0].seed
    by_key = {(c.method, c.terms, c.seed): c for c in configs}
    for method in dict.fromkeys(c.method for c in configs):
        baseline = by_key.get((method, "none", first_seed))
        other = next((by_key[(method, t, first_seed)] for t in ("both", "eq2", "eq4")
                      if (method, t, first_seed) in by_key), None)
        if baseline is None or other is None:
            continue
        label = "+ours" if other.terms == "both" else other.terms
        files[f"gradcam_{method}"] = gradcam_figure(
            out / "runs" / baseline.label, out / "runs" / other.label, dataset,
            out / f"gradcam_{method}.png", labels=(method, f"{method} {label}"), device=device)
    return files
