"""Results of ``simcore grow`` as files and as tables shaped like the paper's Tables 1-3.

:func:`summarize` groups runs by (architecture, method, terms) over seeds
(mean and sample standard deviation); :func:`format_table` prints the paper's
columns — method, architecture, accuracy, training time, N, parameters — and,
when the ablation was run, the two "Proposed" columns of its Table 3 (o: the
term is used, x: it is not). :func:`write_results` saves every run as JSON and
one row per run as CSV.

>>> runs = [{"config": {"model": "vgg16", "method": "firefly", "terms": t, "seed": s},
...          "final_accuracy": a, "training_seconds": 10.0, "phase_steps": n,
...          "parameters_seed": 28666, "parameters_final": 94000}
...         for t, n, a, s in [("none", None, 90.0, 0), ("none", None, 92.0, 1),
...                            ("both", 15, 93.0, 0), ("both", 15, 93.0, 1)]]
>>> print(format_table(summarize(runs)))
Method        Architecture  Accuracy (%)  Training time (s)  N   Parameters          Seeds
Firefly       VGG16         91.00 ± 1.41  10.0               -   0.0287M -> 0.0940M  2
Firefly+ours  VGG16         93.00 ± 0.00  10.0               15  0.0287M -> 0.0940M  2
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import METHODS, MODELS, TERMS

__all__ = ["format_table", "summarize", "write_results"]

_METHOD_NAMES = {"random": "Random", "ssd": "SSD", "firefly": "Firefly"}
_MODEL_NAMES = {"vgg16": "VGG16", "mobilenet_v1": "MobileNetV1"}
_CSV_FIELDS = ("label", "model", "method", "terms", "seed", "dataset", "epochs", "final_accuracy",
               "best_accuracy", "training_seconds", "phase_steps", "parameters_seed",
               "parameters_final", "layer2_share_within_half", "layer2_mean_abs_cosine")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, terms): mean/std of accuracy, mean time, N, parameters."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["config"]
        groups.setdefault((c["model"], c["method"], c["terms"]), []).append(r)

    def order(key):
        model, method, terms = key
        return MODELS.index(model), METHODS.index(method), TERMS.index(terms)

    rows = []
    for key in sorted(groups, key=order):
        runs = groups[key]
        acc_mean, acc_std = _mean_std([r["final_accuracy"] for r in runs])
        time_mean, time_std = _mean_std([r["training_seconds"] for r in runs])
        rows.append({
            "model": key[0], "method": key[1], "terms": key[2],
            "accuracy_mean": acc_mean, "accuracy_std": acc_std,
            "time_mean": time_mean, "time_std": time_std,
            "phase_steps": runs[0]["phase_steps"],
            "parameters_seed": statistics.fmean(r["parameters_seed"] for r in runs),
            "parameters_final": statistics.fmean(r["parameters_final"] for r in runs),
            "seeds": sorted(r["config"]["seed"] for r in runs),
        })
    return rows


def _method_label(row: dict[str, Any]) -> str:
    name = _METHOD_NAMES[row["method"]]
    if row["terms"] == "none":
        return name
    return f"{name}+ours"


def _millions(count: float) -> str:
    return f"{count / 1e6:.4f}M"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as an aligned text table (Table 3's term columns when the ablation ran)."""
    ablation = any(r["terms"] in ("eq2", "eq4") for r in rows)
    header = ["Method", "Architecture"]
    if ablation:
        header += ["Eq.2", "Eq.4"]
    header += ["Accuracy (%)", "Training time (s)", "N", "Parameters", "Seeds"]
    lines = [header]
    for r in rows:
        line = [_method_label(r), _MODEL_NAMES[r["model"]]]
        if ablation:
            line += ["o" if r["terms"] in ("eq2", "both") else "x",
                     "o" if r["terms"] in ("eq4", "both") else "x"]
        line += [f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}", f"{r['time_mean']:.1f}",
                 "-" if r["phase_steps"] is None else str(r["phase_steps"]),
                 f"{_millions(r['parameters_seed'])} -> {_millions(r['parameters_final'])}",
                 str(len(r["seeds"]))]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    c = r["config"]
    final = r.get("similarity", {}).get("final", {})
    return {
        "label": r.get("label"), "model": c["model"], "method": c["method"],
        "terms": c["terms"], "seed": c["seed"], "dataset": c.get("dataset"),
        "epochs": c.get("epochs"), "final_accuracy": r["final_accuracy"],
        "best_accuracy": r.get("best_accuracy"), "training_seconds": r["training_seconds"],
        "phase_steps": r["phase_steps"], "parameters_seed": r["parameters_seed"],
        "parameters_final": r["parameters_final"],
        "layer2_share_within_half": final.get("share_within_half"),
        "layer2_mean_abs_cosine": final.get("mean_abs"),
    }


def write_results(results: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``results.json`` (every run, full), ``results.csv`` (a row per run), ``summary.json``,
    ``table.txt``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv",
             "summary": out / "summary.json", "table": out / "table.txt"}
    paths["json"].write_text(json.dumps(list(results), indent=1))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(_csv_row(r))
    rows = summarize(results)
    paths["summary"].write_text(json.dumps(rows, indent=1))
    paths["table"].write_text(format_table(rows) + "\n")
    return paths
