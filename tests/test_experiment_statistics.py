"""The reporting side of `simcore grow` on synthetic result dicts: paired statistics against a
hand-computed example, the N sweep's choice on validation only, the table, the files and the
per-phase figure. No run is trained here."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from simcore.experiment.figures import plot_phase_similarity
from simcore.experiment.report import (
    LEGEND,
    format_n_sweep,
    format_table,
    summarize,
    write_results,
)
from simcore.experiment.statistics import (
    conclusion,
    mean_ci,
    paired_differences,
    select_n_best,
)

T_975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom


def _histogram(spread: float, neurons: int = 16) -> dict:
    """A cosine histogram shaped like a layer's: a bell of width ``spread`` on [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, 41)
    centres = (edges[:-1] + edges[1:]) / 2
    pairs = neurons * (neurons - 1) // 2
    weights = np.exp(-0.5 * (centres / spread) ** 2)
    counts = np.round(pairs * weights / weights.sum()).astype(int)
    inside = counts[np.abs(centres) <= 0.5].sum() / counts.sum()
    mean_abs = float((np.abs(centres) * counts).sum() / counts.sum())
    return {"mean_abs": mean_abs, "share_within_half": float(inside),
            "counts": counts.tolist(), "edges": edges.tolist(), "neurons": neurons,
            "pairs": int(counts.sum()), "max_abs": 0.99, "layer": "x"}


def _growths(terms: str, layers=("features.0", "features.3", "classifier.0")) -> list[dict]:
    phase = terms != "none"
    return [{
        "epoch": epoch, "params_before": 1000, "params_after": 1300, "grown_layers": list(layers),
        "growth_seconds": 0.1, "phase_seconds": 0.2 if phase else 0.0,
        "accuracy": {"before_growth": {"test": 90.0, "val": 89.0},
                     "after_growth": {"test": 85.0, "val": 84.0},
                     "after_phase": {"test": 86.0, "val": 85.0} if phase else None},
        "phase": None if not phase else {"steps": 10, "layers": {
            name: {"before": _histogram(0.45), "after": _histogram(0.25),
                   "relative_change": 0.05, "scale_drift": 0.01} for name in layers}},
    } for epoch in (2, 4)]


def _run(method="firefly", terms="none", seed=0, accuracy=90.0, *, val=89.0, similarity=0.5,
         steps=None, model="vgg16", data_seed=0, params=170_000, growths=False):
    steps = None if terms == "none" else (10 if steps is None else steps)
    label = f"{model}-{method}-{terms}-seed{seed}"
    return {
        "label": label,
        "config": {"model": model, "method": method, "terms": terms, "seed": seed,
                   "data_seed": data_seed, "phase_steps": steps, "form": "well_posed",
                   "dataset": "digits", "epochs": 6},
        "final_accuracy": accuracy, "final_val_accuracy": val, "best_accuracy": accuracy,
        "parameters_seed": 28_666, "parameters_final": params, "training_seconds": 12.0,
        "phase_seconds": 0.4 if terms != "none" else 0.0, "growth_seconds": 0.2,
        "phase_steps": steps,
        "final_similarity": {"layers": {}, "mean_abs": similarity, "share_within_half": 0.7},
        "growths": _growths(terms) if growths else [],
        "history": [{"epoch": 1, "test_accuracy": accuracy, "val_accuracy": val,
                     "parameters": params}],
    }


def _compare_runs() -> list[dict]:
    """Firefly baseline and +ours over seeds 0-2 (differences 1, 2, 3), plus a control."""
    runs = [_run(seed=s, accuracy=a, similarity=m, params=166_000)
            for s, a, m in [(0, 90.0, 0.5), (1, 91.0, 0.4), (2, 92.0, 0.6)]]
    runs += [_run(terms="both", seed=s, accuracy=a, similarity=m, params=171_000)
             for s, a, m in [(0, 91.0, 0.25), (1, 93.0, 0.4), (2, 95.0, 0.3)]]
    runs += [_run(terms="control", seed=s, accuracy=a, similarity=m, params=171_000)
             for s, a, m in [(0, 90.0, 0.5), (1, 91.5, 0.4), (2, 91.0, 0.6)]]
    return runs


def test_mean_ci_matches_the_hand_computed_t_interval_and_one_value_has_none():
    estimate = mean_ci([1.0, 2.0, 3.0])
    assert (estimate.mean, estimate.sd, estimate.n) == (2.0, 1.0, 3)
    assert estimate.low == pytest.approx(2.0 - T_975_2 / math.sqrt(3), abs=1e-9)
    assert estimate.high == pytest.approx(2.0 + T_975_2 / math.sqrt(3), abs=1e-9)
    single = mean_ci([7.0])
    assert (single.mean, single.sd, single.low, single.high) == (7.0, None, None, None)
    for bad in ([], [1.0, math.nan]):
        with pytest.raises(ValueError):
            mean_ci(bad)


def test_paired_differences_pair_by_seed_and_data_split_and_count_wins():
    runs = _compare_runs()
    runs.reverse()  # pairing must not depend on the order of the results
    runs.append(_run(terms="both", seed=0, data_seed=1, accuracy=99.0))  # no baseline: left out
    accuracy = {(r["terms"]): r for r in paired_differences(runs)}
    both = accuracy["both"]
    assert both["differences"] == [1.0, 2.0, 3.0] and both["seeds"] == [0, 1, 2]
    assert (both["n"], both["mean"], both["sd"]) == (3, 2.0, 1.0)
    assert both["ci_low"] == pytest.approx(2.0 - T_975_2 / math.sqrt(3), abs=1e-9)
    assert (both["wins"], both["losses"], both["ties"]) == (3, 0, 0)
    assert (both["parameters_final"], both["baseline_parameters_final"]) == (171_000, 166_000)
    control = accuracy["control"]
    assert control["differences"] == [0.0, 0.5, -1.0]
    assert (control["wins"], control["losses"], control["ties"]) == (1, 1, 1)
    # final mean |cos|: the mean of per-pair ratios (0.5, 1, 0.5), not the ratio of the means
    assert both["similarity_ratio"] == pytest.approx(2 / 3)
    similarity = paired_differences(runs, metric="final_similarity.mean_abs")[0]
    assert similarity["differences"] == pytest.approx([-0.25, 0.0, -0.3])
    assert similarity["ratio_mean"] == pytest.approx(2 / 3)


def test_pairing_refuses_ambiguity_and_one_pair_has_no_interval():
    with pytest.raises(ValueError, match="two 'none' runs"):
        paired_differences([_run(seed=0), _run(seed=0), _run(terms="both", seed=0)])
    (row,) = paired_differences([_run(seed=4, accuracy=90.0),
                                 _run(terms="both", seed=4, accuracy=90.5)])
    assert row["n"] == 1 and row["sd"] is None and row["ci_low"] is None
    assert "one seed cannot tell" in conclusion([row])
    table = format_table(summarize([_run(seed=4), _run(terms="both", seed=4, accuracy=90.5)]))
    assert "± 0.00" not in table and "+0.50 (1 pair, no CI)" in table


def test_conclusion_says_no_measurable_difference_when_the_interval_holds_zero():
    runs = _compare_runs()
    text = conclusion(paired_differences(runs)).splitlines()
    assert text[0] == ("Firefly+ours vs Firefly: +2.00 points (95% CI -0.48 to +4.48, 3 of 3 "
                       "seeds better): no measurable difference in accuracy; final mean |cos| "
                       "0.67x.")
    assert text[1].startswith("Firefly+control vs Firefly: -0.17 points (95% CI -2.06 to +1.73, "
                              "1 of 3 seeds better, 1 tied): no measurable difference")
    clear = [_run(seed=s, accuracy=90.0 + s) for s in range(3)]
    clear += [_run(terms="both", seed=s, accuracy=91.0 + s + 0.1 * s) for s in range(3)]
    assert "measurably higher accuracy" in conclusion(paired_differences(clear))


def _sweep(val_by_n: dict[int, list[float]], test_by_n: dict[int, list[float]]) -> list[dict]:
    runs = [_run(seed=s, accuracy=90.0, val=89.0) for s in range(3)]
    for steps, vals in val_by_n.items():
        runs += [_run(terms="both", seed=s, steps=steps, val=v, accuracy=test_by_n[steps][s])
                 for s, v in enumerate(vals)]
    return runs


class _TestSetGuard(dict):
    """A result whose test accuracy must not be read (it would pick another N)."""

    def __getitem__(self, key):
        if key in ("final_accuracy", "best_accuracy"):
            raise AssertionError(f"the test set of {self['label']} was read")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in ("final_accuracy", "best_accuracy"):
            raise AssertionError(f"the test set of {self['label']} was read")
        return super().get(key, default)


def test_n_sweep_chooses_on_validation_and_never_reads_the_test_set():
    # Validation prefers N=5; the test set would prefer N=20 (and holds NaN at N=1).
    runs = _sweep({1: [80.0, 81.0, 82.0], 5: [90.0, 91.0, 92.0], 20: [85.0, 85.0, 85.0]},
                  {1: [math.nan] * 3, 5: [92.0, 92.5, 93.0], 20: [99.0, 99.0, 99.0]})
    guarded = [r if r["config"]["phase_steps"] in (None, 5) else _TestSetGuard(r) for r in runs]
    selection = select_n_best(guarded, method="firefly", model="vgg16")
    assert selection["n_best"] == 5
    assert [v["phase_steps"] for v in selection["validation"]] == [1, 5, 20]
    assert selection["validation"][1]["mean"] == pytest.approx(91.0)
    assert selection["test"]["mean"] == pytest.approx(92.5) and selection["test"]["n"] == 3
    assert selection["paired"]["differences"] == [2.0, 2.5, 3.0]
    assert "N_best = 5" in format_n_sweep(selection)


def test_n_sweep_ties_go_to_the_smaller_n_and_missing_validation_is_refused():
    tied = _sweep({10: [90.0, 91.0, 92.0], 3: [92.0, 90.0, 91.0]},
                  {10: [95.0] * 3, 3: [91.0] * 3})
    assert select_n_best(tied, method="firefly", model="vgg16")["n_best"] == 3
    missing = _sweep({3: [90.0, 91.0, 92.0], 10: [90.0, 91.0, 92.0]}, {3: [91.0] * 3,
                                                                      10: [91.0] * 3})
    missing[-1]["final_val_accuracy"] = None
    with pytest.raises(ValueError, match="no validation accuracy.*never on the test set"):
        select_n_best(missing, method="firefly", model="vgg16")
    with pytest.raises(ValueError, match="nothing to sweep"):
        select_n_best(missing, method="ssd", model="vgg16")


def test_table_shows_paired_difference_sizes_similarity_and_legend():
    runs = _compare_runs()
    runs += [_run(terms="eq2", seed=s, accuracy=90.0 + s) for s in range(3)]
    rows = summarize(runs)
    assert [r["terms"] for r in rows] == ["none", "eq2", "both", "control"]
    table, legend = format_table(rows).split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["Method", "Architecture", "Eq.2", "Eq.4", "Accuracy", "(%)"]
    assert "vs baseline [95% CI]" in lines[0] and "Baseline end" in lines[0]
    baseline, eq2, both, control = lines[1:]
    assert baseline.split()[:4] == ["Firefly", "VGG16", "x", "x"]
    assert eq2.split()[:4] == ["Firefly+ours", "VGG16", "o", "x"]
    assert both.split()[:4] == ["Firefly+ours", "VGG16", "o", "o"]
    assert control.split()[:4] == ["Firefly+control", "VGG16", "-", "-"]
    assert "93.00 ± 2.00 (n=3)" in both and "+2.00 [-0.48, +4.48]  3/3" in both
    assert "0.0287M -> 0.1710M  0.1660M" in both and "0.3167 (0.67x)" in both
    assert both.rstrip().endswith("0-2")
    assert "91.00 ± 1.00 (n=3)  -" in baseline
    assert legend == LEGEND and "+control" in legend and "95% t CI" in legend


def test_write_results_writes_runs_pairs_summary_and_table_atomically(tmp_path):
    runs = _compare_runs()
    paths = write_results(runs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "paired.csv", "results.csv", "results.json", "summary.json", "table.txt"]
    assert json.loads(paths["json"].read_text()) == runs
    with paths["csv"].open() as handle:
        per_run = list(csv.DictReader(handle))
    assert len(per_run) == len(runs)
    assert {"final_val_accuracy", "final_mean_abs_cosine", "phase_seconds", "growth_seconds",
            "terms"} <= set(per_run[0])
    assert per_run[3]["terms"] == "both" and float(per_run[3]["final_mean_abs_cosine"]) == 0.25
    with paths["paired"].open() as handle:
        paired = list(csv.DictReader(handle))
    accuracy = [p for p in paired if p["metric"] == "final_accuracy" and p["terms"] == "both"]
    assert accuracy[0]["differences"] == "1.0;2.0;3.0" and accuracy[0]["wins"] == "3"
    assert {p["metric"] for p in paired} == {"final_accuracy", "final_val_accuracy",
                                             "final_similarity.mean_abs"}
    summary = json.loads(paths["summary"].read_text())
    assert set(summary) == {"rows", "paired", "n_sweeps", "conclusion"}
    assert summary["rows"][1]["paired"]["mean"] == 2.0 and summary["n_sweeps"] == []
    assert summary["conclusion"].startswith("Firefly+ours vs Firefly: +2.00 points")
    text = paths["table"].read_text()
    assert LEGEND in text and "no measurable difference" in text
    # which code made the numbers: one version, or each with its count
    assert "\nCode: not recorded (simcore's source fingerprint, every run)\n" in text
    assert per_run[0]["code"] == ""
    for i, r in enumerate(runs):
        r["code"] = "a" * 12 if i < 7 else "b" * 12
    paths = write_results(runs, tmp_path)
    assert (f"\nCode: several versions of simcore's source: {'a' * 12} (7 runs), {'b' * 12} "
            "(2 runs)\n") in paths["table"].read_text()
    with paths["csv"].open() as handle:
        assert [row["code"] for row in csv.DictReader(handle)][6:8] == ["a" * 12, "b" * 12]


def test_write_results_reports_an_n_sweep_and_refuses_to_choose_without_validation(tmp_path):
    runs = _sweep({1: [80.0, 81.0, 82.0], 5: [90.0, 91.0, 92.0]},
                  {1: [99.0] * 3, 5: [92.0, 92.5, 93.0]})
    (sweep,) = json.loads(write_results(runs, tmp_path)["summary"].read_text())["n_sweeps"]
    assert sweep["n_best"] == 5
    for r in runs:
        r["final_val_accuracy"] = None
    (sweep,) = json.loads(write_results(runs, tmp_path)["summary"].read_text())["n_sweeps"]
    assert "no validation accuracy" in sweep["error"] and "n_best" not in sweep


def test_phase_figure_is_written_for_every_grown_layer(tmp_path):
    runs = [_run(seed=s, growths=True) for s in range(2)]
    runs += [_run(terms=t, seed=s, growths=True) for t in ("both", "control") for s in range(2)]
    path = plot_phase_similarity(runs, tmp_path / "phase.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no run recorded a similarity phase"):
        plot_phase_similarity(runs[:2], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no run recorded"):  # no run of that N
        plot_phase_similarity(runs, tmp_path / "n7.png", phase_steps=7)
