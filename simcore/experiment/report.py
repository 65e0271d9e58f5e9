"""Results of ``simcore grow`` as files and as tables shaped like the paper's Tables 1-3.

:func:`summarize` groups runs by (architecture, method, terms, N) over seeds and pairs each
group with its baseline runs (same model, method, seed and data split; see
:mod:`.statistics`); :func:`format_table` prints the paper's columns — method, architecture,
accuracy, training time, N, parameters — with the evidence a comparison needs: accuracy as
mean ± SD over n seeds, the paired difference to the baseline with its 95% CI and wins, the
baseline's final size beside this row's, and the final mean |cos| with its ratio to the
baseline's; a legend under the table says what each mark means. When the ablation ran, the
two "Proposed" columns of Table 3 show which term is used (o) or not (x).
:func:`write_results` saves every run (JSON), one row per run (CSV), the paired differences
(CSV), the summary (JSON) and the table.

>>> runs = [{"config": {"model": "vgg16", "method": "firefly", "terms": t, "seed": s,
...                     "data_seed": 0},
...          "final_accuracy": a, "final_val_accuracy": None, "training_seconds": 10.0,
...          "phase_steps": n, "parameters_seed": 28666, "parameters_final": p,
...          "final_similarity": {"mean_abs": m}}
...         for t, n, a, s, p, m in [("none", None, 90.0, 0, 94000, 0.5),
...                                  ("none", None, 92.0, 1, 94000, 0.5),
...                                  ("both", 15, 93.0, 0, 96000, 0.3),
...                                  ("both", 15, 93.0, 1, 96000, 0.4)]]
>>> rows = summarize(runs)
>>> [(r["terms"], r["accuracy_mean"], r["accuracy_n"], r["similarity_ratio"]) for r in rows]
[('none', 91.0, 2, None), ('both', 93.0, 2, 0.7)]
>>> rows[1]["paired"]["mean"], rows[1]["paired"]["wins"], rows[1]["baseline_parameters_final"]
(2.0, 2, 94000.0)
>>> print(conclusion(paired_differences(runs)))  # the interval is wide with two seeds
Firefly+ours vs Firefly: +2.00 points (95% CI -10.71 to +14.71, 2 of 2 seeds better): no \
measurable difference in accuracy; final mean |cos| 0.70x.
>>> table = format_table(rows)  # one line per row, then the legend
>>> "93.00 ± 0.00 (n=2)  +2.00 [-10.71, +14.71]  2/2" in table, "Accuracy: test" in table
(True, True)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic
from .statistics import (
    MODEL_NAMES,
    SIMILARITY_METRIC,
    conclusion,
    mean_ci,
    metric_value,
    paired_differences,
    phase_steps_of,
    run_order,
    select_n_best,
    terms_label,
)

__all__ = ["LEGEND", "code_line", "format_n_sweep", "format_table", "summarize", "write_results"]

_CSV_FIELDS = ("label", "model", "method", "terms", "seed", "data_seed", "dataset", "epochs",
               "form", "final_accuracy", "final_val_accuracy", "best_accuracy",
               "training_seconds", "phase_seconds", "growth_seconds", "phase_steps",
               "parameters_seed", "parameters_final", "final_mean_abs_cosine",
               "final_share_within_half", "code")
_PAIRED_FIELDS = ("model", "method", "terms", "phase_steps", "metric", "n", "mean", "sd",
                  "ci_low", "ci_high", "confidence", "wins", "losses", "ties", "treated_mean",
                  "baseline_mean", "ratio_mean", "similarity_ratio", "parameters_final",
                  "baseline_parameters_final", "seeds", "data_seeds", "differences")
#: Metrics paired in ``paired.csv``/``summary.json``, each when every run has it.
_PAIRED_METRICS = ("final_accuracy", "final_val_accuracy", SIMILARITY_METRIC)

LEGEND = """\
Accuracy: test accuracy, mean ± sample SD over the n seeds (n=1: no SD).
vs baseline: the paired difference with the baseline run of the same seed and data split
  (points), mean and 95% t CI; wins: seeds where this row is strictly above its baseline.
Params: this row's size at the seed -> at the end; baseline end: the baseline's final size.
mean |cos|: final mean |cosine| between neurons of the conv/linear layers (depthwise
  excluded), and its mean per-seed ratio to the baseline's (below 1: less similar neurons).
N: steps of the similarity phase after each growth. +ours: Eq. 5 (Eq. 2 and Eq. 4; the
  Eq.2/Eq.4 columns mark o used, x unused); +control: a random perturbation of the grown
  layers as large as the phase's change. -: not applicable.
Time (s): wall time of one run's training steps, growths and phases, mean over seeds
  (evaluation, data loading and imports excluded); Seeds: the run seeds."""


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def summarize(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, terms, N), in the paper's order, over seeds.

    Each row: ``accuracy_mean``/``accuracy_std`` (sample SD, ``None`` for one seed),
    ``accuracy_n``, ``accuracy_ci_low``/``_high``, ``val_accuracy_mean``, ``time_mean``/
    ``time_std``, ``phase_seconds_mean``, ``growth_seconds_mean``, ``phase_steps``,
    ``parameters_seed``/``parameters_final`` (means), ``similarity_mean_abs`` (mean final
    mean |cos|), ``seeds`` and, for rows other than the baseline, ``paired`` (the
    :func:`~.statistics.paired_differences` row of test accuracy, ``None`` without a
    baseline partner), ``baseline_parameters_final`` and ``similarity_ratio`` from the pairs.
    """
    results = list(results)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["config"]
        groups.setdefault((c["model"], c["method"], c["terms"], phase_steps_of(r)), []).append(r)
    paired = {(p["model"], p["method"], p["terms"], p["phase_steps"]): p
              for p in paired_differences(results)}
    rows = []
    for key in sorted(groups, key=lambda k: run_order(*k)):
        runs = groups[key]
        accuracy = mean_ci([r["final_accuracy"] for r in runs])
        times = mean_ci([r["training_seconds"] for r in runs])
        pair = paired.get(key)
        rows.append({
            "model": key[0], "method": key[1], "terms": key[2], "phase_steps": key[3],
            "accuracy_mean": accuracy.mean, "accuracy_std": accuracy.sd,
            "accuracy_n": accuracy.n, "accuracy_ci_low": accuracy.low,
            "accuracy_ci_high": accuracy.high,
            "val_accuracy_mean": _mean([r.get("final_val_accuracy") for r in runs]),
            "time_mean": times.mean, "time_std": times.sd,
            "phase_seconds_mean": _mean([r.get("phase_seconds") for r in runs]),
            "growth_seconds_mean": _mean([r.get("growth_seconds") for r in runs]),
            "parameters_seed": math.fsum(r["parameters_seed"] for r in runs) / len(runs),
            "parameters_final": math.fsum(r["parameters_final"] for r in runs) / len(runs),
            "similarity_mean_abs": _mean([metric_value(r, SIMILARITY_METRIC) for r in runs]),
            "seeds": sorted(r["config"]["seed"] for r in runs),
            "paired": pair,
            "baseline_parameters_final": None if pair is None
            else pair["baseline_parameters_final"],
            "similarity_ratio": None if pair is None else pair["similarity_ratio"],
        })
    return rows


def _method_label(row: dict[str, Any]) -> str:
    # The ablation's eq2/eq4 rows are "+ours" too: the Eq.2/Eq.4 columns tell them apart.
    return terms_label(row["method"], "both" if row["terms"] in ("eq2", "eq4") else row["terms"])


def _millions(count: float | None) -> str:
    return "-" if count is None else f"{count / 1e6:.4f}M"


def _seeds(seeds: Sequence[int]) -> str:
    """``0-4,7``: consecutive seeds as ranges."""
    spans: list[list[int]] = []
    for seed in sorted(set(seeds)):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _accuracy_cell(r: dict[str, Any]) -> str:
    spread = "" if r["accuracy_std"] is None else f" ± {r['accuracy_std']:.2f}"
    return f"{r['accuracy_mean']:.2f}{spread} (n={r['accuracy_n']})"


def _paired_cells(r: dict[str, Any]) -> list[str]:
    pair = r.get("paired")
    if pair is None:
        return ["-", "-"]
    if pair["n"] == 1:
        interval = "(1 pair, no CI)"
    else:
        interval = f"[{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}]"
    return [f"{pair['mean']:+.2f} {interval}", f"{pair['wins']}/{pair['n']}"]


def _similarity_cell(r: dict[str, Any]) -> str:
    if r.get("similarity_mean_abs") is None:
        return "-"
    ratio = r.get("similarity_ratio")
    suffix = "" if ratio is None else f" ({ratio:.2f}x)"
    return f"{r['similarity_mean_abs']:.4f}{suffix}"


def _align(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]


def format_table(rows: Sequence[dict[str, Any]], *, legend: bool = True) -> str:
    """The :func:`summarize` rows as an aligned text table, with :data:`LEGEND` under it
    unless ``legend=False`` (Table 3's term columns when the ablation ran)."""
    ablation = any(r["terms"] in ("eq2", "eq4") for r in rows)
    header = ["Method", "Architecture"]
    if ablation:
        header += ["Eq.2", "Eq.4"]
    header += ["Accuracy (%)", "vs baseline [95% CI]", "Wins", "Params", "Baseline end",
               "mean |cos|", "N", "Time (s)", "Seeds"]
    lines = [header]
    for r in rows:
        line = [_method_label(r), MODEL_NAMES.get(r["model"], r["model"])]
        if ablation:
            line += ["-" if r["terms"] == "control" else
                     "o" if r["terms"] in ("eq2", "both") else "x",
                     "-" if r["terms"] == "control" else
                     "o" if r["terms"] in ("eq4", "both") else "x"]
        line += [_accuracy_cell(r), *_paired_cells(r),
                 f"{_millions(r['parameters_seed'])} -> {_millions(r['parameters_final'])}",
                 _millions(r.get("baseline_parameters_final")), _similarity_cell(r),
                 "-" if r["phase_steps"] is None else str(r["phase_steps"]),
                 f"{r['time_mean']:.1f}", _seeds(r["seeds"])]
        lines.append(line)
    table = "\n".join(_align(lines))
    return f"{table}\n\n{LEGEND}" if legend else table


def format_n_sweep(selection: dict[str, Any]) -> str:
    """A :func:`~.statistics.select_n_best` result as a few lines: validation accuracy per
    N, N_best (chosen on validation), the test accuracy there and its paired difference."""
    name = terms_label(selection["method"], selection["terms"])
    model = MODEL_NAMES.get(selection["model"], selection["model"])
    per_n = ", ".join(f"N={v['phase_steps']}: {v['mean']:.2f}" for v in selection["validation"])
    test = selection["test"]
    spread = "" if test["sd"] is None else (
        f" ± {test['sd']:.2f}, 95% CI {test['ci_low']:.2f} to {test['ci_high']:.2f}")
    lines = [f"N sweep, {name} {model}: mean validation accuracy (%) {per_n}",
             f"N_best = {selection['n_best']} (highest validation mean; ties to the smaller N); "
             f"test accuracy at N_best {test['mean']:.2f}{spread} (n={test['n']})"]
    if selection["paired"] is not None:
        lines.append(conclusion([selection["paired"]]))
    return "\n".join(lines)


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    c = r["config"]
    return {
        "label": r.get("label"), "model": c["model"], "method": c["method"],
        "terms": c["terms"], "seed": c["seed"], "data_seed": c.get("data_seed"),
        "dataset": c.get("dataset"), "epochs": c.get("epochs"), "form": c.get("form"),
        "final_accuracy": r["final_accuracy"], "final_val_accuracy": r.get("final_val_accuracy"),
        "best_accuracy": r.get("best_accuracy"), "training_seconds": r["training_seconds"],
        "phase_seconds": r.get("phase_seconds"), "growth_seconds": r.get("growth_seconds"),
        "phase_steps": r["phase_steps"], "parameters_seed": r["parameters_seed"],
        "parameters_final": r["parameters_final"],
        "final_mean_abs_cosine": metric_value(r, SIMILARITY_METRIC),
        "final_share_within_half": metric_value(r, "final_similarity.share_within_half"),
        "code": r.get("code"),
    }


def _paired_csv_row(p: dict[str, Any]) -> dict[str, Any]:
    row = {field: p[field] for field in _PAIRED_FIELDS}
    for field in ("seeds", "data_seeds", "differences"):  # lists: one cell, ';'-separated
        row[field] = ";".join(str(v) for v in p[field])
    return row


def _all_paired(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for metric in _PAIRED_METRICS:
        if all(metric_value(r, metric) is not None for r in results):
            rows += paired_differences(results, metric=metric)
    return rows


def _n_sweeps(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`select_n_best` for each (model, method) whose "+ours" runs use several N."""
    steps: dict[tuple[str, str], set] = {}
    for r in results:
        if r["config"]["terms"] == "both":
            steps.setdefault((r["config"]["model"], r["config"]["method"]), set()).add(
                phase_steps_of(r))
    sweeps = []
    for model, method in sorted(k for k, v in steps.items() if len(v) > 1):
        try:
            sweeps.append(select_n_best(results, model=model, method=method))
        except ValueError as error:  # e.g. no validation split: say so rather than choose
            sweeps.append({"model": model, "method": method, "error": str(error)})
    return sweeps


def _csv_text(fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(results: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write, each atomically, and return their paths by kind:

    ``json``: ``results.json`` (every run, full); ``csv``: ``results.csv`` (a row per run);
    ``paired``: ``paired.csv`` (the paired differences of test accuracy, and of validation
    accuracy and final mean |cos| when every run has them); ``summary``: ``summary.json``
    (``{"rows": summarize(...), "paired": [...], "n_sweeps": [...], "conclusion": str}``);
    ``table``: ``table.txt`` (the table, its legend, the code that made it (:func:`code_line`)
    and the conclusion).
    """
    results = list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv",
             "paired": out / "paired.csv", "summary": out / "summary.json",
             "table": out / "table.txt"}
    rows = summarize(results)
    paired = _all_paired(results)
    accuracy_rows = [p for p in paired if p["metric"] == "final_accuracy"]
    text = conclusion(accuracy_rows)
    write_atomic(paths["json"], json.dumps(results, indent=1))
    write_atomic(paths["csv"], _csv_text(_CSV_FIELDS, map(_csv_row, results)))
    write_atomic(paths["paired"], _csv_text(_PAIRED_FIELDS, map(_paired_csv_row, paired)))
    write_atomic(paths["summary"], json.dumps(
        {"rows": rows, "paired": paired, "n_sweeps": _n_sweeps(results), "conclusion": text},
        indent=1))
    write_atomic(paths["table"], format_table(rows) + "\n" + code_line(results)
                 + ("\n\n" + text if text else "") + "\n")
    return paths


def code_line(results: Sequence[dict[str, Any]]) -> str:
    """Which version of simcore produced ``results``: their code fingerprints
    (:mod:`.fingerprint`), with the number of runs of each when there are several."""
    counts: dict[str, int] = {}
    for r in results:
        code = r.get("code") or "not recorded"
        counts[code] = counts.get(code, 0) + 1
    if len(counts) == 1:
        return f"Code: {next(iter(counts))} (simcore's source fingerprint, every run)"
    parts = ", ".join(f"{code} ({n} run{'s' * (n > 1)})" for code, n in counts.items())
    return f"Code: several versions of simcore's source: {parts}"
