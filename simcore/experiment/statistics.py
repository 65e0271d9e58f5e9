"""Honest statistics of ``simcore grow`` runs: paired differences, t intervals, the N sweep.

A run with the similarity phase is compared with the baseline run (``terms="none"``) of the
same model, method, seed and data split: the seed fixes the initialisation and the batch
order, so the per-seed difference removes most of the seed-to-seed spread that an unpaired
comparison of two means would carry. Every interval is a two-sided Student t interval of the
mean; one value gives no standard deviation and no interval (``None``), never a "± 0".

* :func:`mean_ci` — mean, sample standard deviation and t interval of some values;
* :func:`paired_differences` — one row per (model, method, terms, N): the per-seed
  differences with vs without, their mean and interval, wins/losses/ties, the per-pair
  ratio of final mean |cos|;
* :func:`select_n_best` — the N sweep: N_best chosen on validation accuracy only, then the
  test accuracy at N_best;
* :func:`conclusion` — one sentence per row saying what the numbers do and do not show.

Pure Python, numpy and scipy: no torch, so the reports can be rebuilt from ``results.json``.

>>> d = mean_ci([1.0, 2.0, 3.0])
>>> round(d.mean, 3), round(d.sd, 3), round(d.low, 3), round(d.high, 3)
(2.0, 1.0, -0.484, 4.484)
>>> mean_ci([5.0]).sd is None
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

__all__ = ["MeanCI", "conclusion", "mean_ci", "metric_value", "paired_differences",
           "phase_steps_of", "run_order", "select_n_best"]

#: Display order of the choices of ``terms``; values not listed sort after them.
TERMS_ORDER = ("none", "eq2", "eq4", "both", "control")
_MODELS_ORDER = ("vgg16", "mobilenet_v1")
_METHODS_ORDER = ("random", "ssd", "firefly")
METHOD_NAMES = {"random": "Random", "ssd": "SSD", "firefly": "Firefly"}
MODEL_NAMES = {"vgg16": "VGG16", "mobilenet_v1": "MobileNetV1"}
SIMILARITY_METRIC = "final_similarity.mean_abs"


class MeanCI(NamedTuple):
    """Mean of ``n`` values, their sample SD and the t interval; ``sd``/``low``/``high`` are
    ``None`` when ``n == 1``."""

    mean: float
    sd: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean, sample standard deviation (ddof 1) and two-sided t interval of the mean.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)``. Raises
    ``ValueError`` on no values, a non-finite value, or a confidence outside (0, 1).
    """
    data = np.asarray(list(values), dtype=float)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if data.size == 0:
        raise ValueError("no values: a mean needs at least one")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"values must be finite, got {data.tolist()}")
    mean = math.fsum(data.tolist()) / data.size
    if data.size == 1:
        return MeanCI(mean, None, None, None, 1, confidence)
    sd = float(np.std(data, ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, data.size - 1)) * sd / math.sqrt(data.size)
    return MeanCI(mean, sd, mean - half, mean + half, int(data.size), confidence)


def metric_value(result: dict[str, Any], metric: str) -> Any:
    """``result``'s value at a dotted path (``"final_similarity.mean_abs"``); ``None`` if absent."""
    value: Any = result
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def phase_steps_of(result: dict[str, Any], baseline: str = "none") -> int | None:
    """N of a run as the reports group it: ``None`` for the baseline, else the N the run used
    (its configured ``phase_steps`` when the run did not record one)."""
    config = result["config"]
    if config["terms"] == baseline:
        return None
    steps = result.get("phase_steps")
    return config.get("phase_steps") if steps is None else steps


def _position(value: Any, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), str(value))


def run_order(model: str, method: str, terms: str, steps: int | None) -> tuple:
    """Sort key in the paper's order: model, method, terms (baseline first), then N."""
    return (_position(model, _MODELS_ORDER), _position(method, _METHODS_ORDER),
            _position(terms, TERMS_ORDER), steps is not None, steps or 0)


def _pair_key(result: dict[str, Any]) -> tuple:
    c = result["config"]
    return c["model"], c["method"], c["seed"], c.get("data_seed")


def _baselines(results: Sequence[dict[str, Any]], baseline: str) -> dict[tuple, dict]:
    found: dict[tuple, dict] = {}
    for r in results:
        if r["config"]["terms"] != baseline:
            continue
        key = _pair_key(r)
        if key in found:
            raise ValueError(f"two {baseline!r} runs for (model, method, seed, data_seed) = "
                             f"{key}: cannot tell which one to pair with")
        found[key] = r
    return found


def _ratio(treated: Any, base: Any) -> float | None:
    if treated is None or base is None or base == 0:
        return None
    return float(treated) / float(base)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not values or len(present) < len(values):
        return None
    return math.fsum(present) / len(present)


def _require(result: dict[str, Any], metric: str) -> float:
    value = metric_value(result, metric)
    if value is None:
        raise ValueError(f"run {result.get('label', result['config'])!r} has no {metric!r}")
    return float(value)


def _paired_row(key: tuple, pairs: list[tuple[dict, dict]], metric: str,
                confidence: float) -> dict[str, Any]:
    model, method, terms, steps = key
    pairs = sorted(pairs, key=lambda pair: (pair[0]["config"]["seed"],
                                            pair[0]["config"].get("data_seed") or 0))
    treated = [_require(t, metric) for t, _ in pairs]
    base = [_require(b, metric) for _, b in pairs]
    differences = [t - b for t, b in zip(treated, base, strict=True)]
    estimate = mean_ci(differences, confidence)
    similarity = [_ratio(metric_value(t, SIMILARITY_METRIC), metric_value(b, SIMILARITY_METRIC))
                  for t, b in pairs]
    return {
        "model": model, "method": method, "terms": terms, "phase_steps": steps,
        "metric": metric, "n": estimate.n, "mean": estimate.mean, "sd": estimate.sd,
        "ci_low": estimate.low, "ci_high": estimate.high, "confidence": confidence,
        "wins": sum(d > 0 for d in differences), "losses": sum(d < 0 for d in differences),
        "ties": sum(d == 0 for d in differences), "differences": differences,
        "seeds": [t["config"]["seed"] for t, _ in pairs],
        "data_seeds": [t["config"].get("data_seed") for t, _ in pairs],
        "treated_mean": math.fsum(treated) / len(treated),
        "baseline_mean": math.fsum(base) / len(base),
        "ratio_mean": _mean_or_none([_ratio(t, b) for t, b in zip(treated, base, strict=True)]),
        "similarity_ratio": _mean_or_none(similarity),
        "parameters_final": math.fsum(t["parameters_final"] for t, _ in pairs) / len(pairs),
        "baseline_parameters_final":
            math.fsum(b["parameters_final"] for _, b in pairs) / len(pairs),
    }


def paired_differences(results: Iterable[dict[str, Any]], metric: str = "final_accuracy",
                       baseline: str = "none", confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per-seed differences ``run - baseline run`` of ``metric``, one row per
    (model, method, terms != ``baseline``, N), in the paper's order.

    Runs pair by (model, method, seed, data_seed); a run without a baseline partner is left
    out (its row lists only the pairs found; a group with none has no row). ``metric`` is a
    dotted path into the result (``"final_similarity.mean_abs"``). Each row holds ``n``
    pairs, ``mean``, ``sd``, ``ci_low``/``ci_high`` (``None`` for one pair), ``wins``
    (run strictly above its baseline), ``losses``, ``ties``, the per-seed ``differences`` and
    ``seeds``, the means with and without, ``ratio_mean`` (per-pair ratio of ``metric``,
    averaged), ``similarity_ratio`` (the same for final mean |cos|, ``None`` where a run
    lacks it) and both runs' final parameter counts. Raises ``ValueError`` when two baseline
    runs share a pairing key, or when a paired run lacks ``metric``.
    """
    results = list(results)
    baselines = _baselines(results, baseline)
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in results:
        c = r["config"]
        if c["terms"] == baseline:
            continue
        partner = baselines.get(_pair_key(r))
        key = (c["model"], c["method"], c["terms"], phase_steps_of(r, baseline))
        if partner is None:
            continue
        if any(_pair_key(t) == _pair_key(r) for t, _ in groups.get(key, [])):
            raise ValueError(f"two runs for {key} with (model, method, seed, data_seed) = "
                             f"{_pair_key(r)}: cannot pair both with one baseline")
        groups.setdefault(key, []).append((r, partner))
    return [_paired_row(key, groups[key], metric, confidence)
            for key in sorted(groups, key=lambda k: run_order(*k))]


def select_n_best(results: Iterable[dict[str, Any]], *, method: str, model: str,
                  terms: str = "both", baseline: str = "none",
                  confidence: float = 0.95) -> dict[str, Any]:
    """The N sweep: N_best by mean validation accuracy over seeds, then test accuracy there.

    Among the ``terms`` runs of ``model`` and ``method``, grouped by N, N_best has the highest
    mean ``final_val_accuracy`` (a tie goes to the smaller N). The choice reads validation
    accuracy only; test accuracy is read afterwards, and only for the runs at N_best and
    their baselines. Returns ``{"model", "method", "terms", "n_best", "validation":
    [{"phase_steps", "mean", "sd", "n"}, ...] (ascending N), "test": {"mean", "sd", "ci_low",
    "ci_high", "n"}, "paired": paired_differences row at N_best or None}``. Raises
    ``ValueError`` when no run matches, or when a run lacks validation accuracy or N.
    """
    results = list(results)
    sweep = [r for r in results if r["config"]["model"] == model
             and r["config"]["method"] == method and r["config"]["terms"] == terms]
    if not sweep:
        raise ValueError(f"no {terms!r} runs of {model} {method}: nothing to sweep")
    by_steps: dict[int, list[float]] = {}
    for r in sweep:
        steps = phase_steps_of(r, baseline)
        if steps is None:
            raise ValueError(f"run {r.get('label')!r} has no phase_steps: N cannot be swept")
        val = r.get("final_val_accuracy")
        if val is None or not math.isfinite(val):
            raise ValueError(f"run {r.get('label')!r} has no validation accuracy "
                             f"(final_val_accuracy={val!r}): N_best is chosen on a validation "
                             "split, never on the test set; run the sweep with one")
        by_steps.setdefault(steps, []).append(float(val))
    validation: list[dict[str, Any]] = []
    for steps in sorted(by_steps):
        estimate = mean_ci(by_steps[steps], confidence)
        validation.append({"phase_steps": steps, "mean": estimate.mean, "sd": estimate.sd,
                           "n": estimate.n})
    # max over (mean, -N): the highest mean, and among equal means the smallest N.
    n_best = max(validation, key=lambda v: (v["mean"], -v["phase_steps"]))["phase_steps"]
    at_best = [r for r in sweep if phase_steps_of(r, baseline) == n_best]
    test = mean_ci([r["final_accuracy"] for r in at_best], confidence)
    others = [r for r in results if r["config"]["terms"] == baseline]
    paired = paired_differences(at_best + others, baseline=baseline, confidence=confidence)
    paired = [row for row in paired if (row["model"], row["method"]) == (model, method)]
    return {"model": model, "method": method, "terms": terms, "n_best": n_best,
            "validation": validation,
            "test": {"mean": test.mean, "sd": test.sd, "ci_low": test.low,
                     "ci_high": test.high, "n": test.n},
            "paired": paired[0] if paired else None}


def terms_label(method: str, terms: str) -> str:
    """How a row is named in sentences: ``Firefly``, ``Firefly+ours``, ``Firefly+control``,
    ``Firefly+ours (Eq. 2 only)``."""
    name = METHOD_NAMES.get(method, method)
    return {"none": name, "both": f"{name}+ours", "control": f"{name}+control",
            "eq2": f"{name}+ours (Eq. 2 only)",
            "eq4": f"{name}+ours (Eq. 4 only)"}.get(terms, f"{name}+{terms}")


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def conclusion(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence per :func:`paired_differences` row, a line each, saying what it shows.

    An interval that contains 0 is "no measurable difference"; one pair says that one seed
    cannot tell. Rows of ``final_accuracy`` speak of accuracy in points; other metrics are
    named by their path. The mean ratio of final mean |cos| closes the sentence when known.
    """
    models = {row["model"] for row in rows}
    steps: dict[tuple[str, str, str], set[int]] = {}
    for row in rows:
        steps.setdefault((row["model"], row["method"], row["terms"]), set()).add(
            row["phase_steps"])
    sentences = []
    for row in rows:
        accuracy = row["metric"] == "final_accuracy"
        what = "accuracy" if accuracy else row["metric"]
        unit = " points" if accuracy else ""
        subject = terms_label(row["method"], row["terms"])
        if len(steps[(row["model"], row["method"], row["terms"])]) > 1:
            subject += f" (N={row['phase_steps']})"
        subject = f"{subject} vs {METHOD_NAMES.get(row['method'], row['method'])}"
        if len(models) > 1:
            subject = f"{MODEL_NAMES.get(row['model'], row['model'])} {subject}"
        if row["n"] == 1:
            effect = f"{_signed(row['mean'])}{unit} (1 seed)"
            verdict = f"one seed cannot tell whether {what} differs"
        else:
            percent = round(100 * row["confidence"])
            tied = f", {row['ties']} tied" if row["ties"] else ""
            effect = (f"{_signed(row['mean'])}{unit} ({percent}% CI {_signed(row['ci_low'])} to "
                      f"{_signed(row['ci_high'])}, {row['wins']} of {row['n']} seeds better"
                      f"{tied})")
            if row["ci_low"] <= 0.0 <= row["ci_high"]:
                verdict = f"no measurable difference in {what}"
            elif row["ci_low"] > 0.0:
                verdict = f"measurably higher {what}"
            else:
                verdict = f"measurably lower {what}"
        sentence = f"{subject}: {effect}: {verdict}"
        if row.get("similarity_ratio") is not None:
            sentence += f"; final mean |cos| {row['similarity_ratio']:.2f}x"
        sentences.append(sentence + ".")
    return "\n".join(sentences)
