"""``check_backend``: run every public core function on one backend against the reference.

Fixed, seeded inputs (no Hypothesis), so the result is the same on every run and
quick enough for a console command. Each input is first cast to the dtype
under test on the backend, and the float64 reference
(:mod:`simcore.reference`) is evaluated on the *rounded* values read back, so
the error measures simcore's computation, not the rounding of the inputs.

>>> from simcore.testing import check_backend
>>> results = check_backend("numpy", dtypes=["float64"])
>>> all(r.passed for r in results), results[0].function
(True, 'similarity_map')
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ._assertions import TOLERANCES, assert_close, max_error, tolerance_for
from ._backends import Backend, backend_for_namespace, get_backend

__all__ = ["CheckResult", "check_backend"]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One line of a conformance report.

    ``max_error`` is the largest absolute difference from the reference over
    every output of the call; ``tolerance`` the largest absolute difference the
    default :data:`~simcore.testing.TOLERANCES` allow for the output where the
    error came closest to its bound. ``detail`` says what failed (a metadata
    mismatch, a value outside tolerance, or an exception), empty when passed.
    """

    backend: str
    device: str
    function: str
    dtype: str
    max_error: float
    tolerance: float
    passed: bool
    detail: str = ""


# ----------------------------------------------------------------------------- inputs


def _unit_gaussian_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * rng.uniform(0.5, 2.0, size=(n, 1))


def _stats_rows(bins: int) -> np.ndarray:
    """Rows whose cosines all sit well inside histogram bins (no edge within 0.02).

    bfloat16 rounds a cosine by up to ~4e-3; an input with a cosine that close
    to a bin edge would make the exact count comparison a coin toss.
    """
    edges = np.linspace(-1.0, 1.0, bins + 1)
    for seed in range(1000):
        w = _unit_gaussian_rows(np.random.default_rng(seed), 6, 5)
        u = w / np.linalg.norm(w, axis=1, keepdims=True)
        cosines = (u @ u.T)[np.triu_indices(6, 1)]
        if np.min(np.abs(cosines[:, None] - edges[None, :])) > 0.02:
            return w
    raise AssertionError("no seed gave well-separated cosines")  # pragma: no cover


@functools.lru_cache(maxsize=1)
def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240826)
    dense = _unit_gaussian_rows(rng, 12, 20)
    oihw = _unit_gaussian_rows(rng, 8, 27).reshape(8, 3, 3, 3)
    with_zero_rows = dense.copy()
    with_zero_rows[[1, 6]] = 0.0
    moved = dense * rng.uniform(0.7, 1.4) + 0.05 * rng.standard_normal(dense.shape)
    # The literal Eq. 4 is log|sum W / sum W_ref|: keep both sums far from 0.
    positive = np.abs(dense) + 0.1
    positive_ref = np.abs(moved) + 0.1
    return {
        "dense": dense,
        "oihw": oihw,
        "hwio": np.ascontiguousarray(np.transpose(oihw, (2, 3, 1, 0))),
        "hwio_ref": np.ascontiguousarray(
            np.transpose(oihw * 1.2 + 0.05 * rng.standard_normal(oihw.shape), (2, 3, 1, 0))
        ),
        "zero_rows": with_zero_rows,
        "moved": moved,
        "positive": positive,
        "positive_ref": positive_ref,
        "stats": _stats_rows(4),
    }


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class _Case:
    """One check: how to call the core and what the reference says it should return.

    ``arrays`` names the inputs; ``core`` and ``reference`` take them (cast to
    the dtype under test, resp. read back as float64) plus a ``rounder`` that
    rounds a NumPy array to that dtype (the reference loop of ``decorrelate``
    needs it between steps).
    """

    function: str
    arrays: tuple[str, ...]
    core: Callable[..., Any]
    reference: Callable[..., Any]
    #: Statistics are computed and returned in float32 for float16/bfloat16 inputs.
    half_results_in_float32: bool = False

    def out_dtype(self, dtype: str) -> str:
        if self.half_results_in_float32 and dtype in ("float16", "bfloat16"):
            return "float32"
        return dtype


def _cases() -> list[_Case]:
    import simcore
    import simcore.reference as ref

    cases = [
        _Case("similarity_map", ("dense",),
              lambda run, w: run(simcore.similarity_map, w),
              lambda w: ref.similarity_map(w)),
        _Case("similarity_loss", ("dense",),
              lambda run, w: run(simcore.similarity_loss, w),
              lambda w: ref.similarity_loss(w)),
        _Case("similarity_loss_and_grad", ("dense",),
              lambda run, w: run(simcore.similarity_loss_and_grad, w),
              lambda w: ref.similarity_loss_and_grad(w)),
        _Case("similarity_loss_and_grad[oihw]", ("oihw",),
              lambda run, w: run(simcore.similarity_loss_and_grad, w, neuron_axis=0),
              lambda w: ref.similarity_loss_and_grad(w, neuron_axis=0)),
        _Case("similarity_loss_and_grad[hwio]", ("hwio",),
              lambda run, w: run(simcore.similarity_loss_and_grad, w, neuron_axis=-1),
              lambda w: ref.similarity_loss_and_grad(w, neuron_axis=-1)),
        _Case("similarity_loss_and_grad[block_size=5]", ("dense",),
              lambda run, w: run(simcore.similarity_loss_and_grad, w, block_size=5),
              lambda w: ref.similarity_loss_and_grad(w)),
        _Case("similarity_loss_and_grad[zero_rows]", ("zero_rows",),
              lambda run, w: run(simcore.similarity_loss_and_grad, w),
              lambda w: ref.similarity_loss_and_grad(w)),
    ]
    for form in simcore.FORMS:
        names = ("positive", "positive_ref") if form == "literal" else ("moved", "dense")
        for statistic in simcore.STATISTICS:
            options = {"form": form, "statistic": statistic}
            label = f"[{form},{statistic}]"
            cases.append(_Case(
                "weight_sum_penalty" + label, names,
                functools.partial(_call, simcore.weight_sum_penalty, options),
                functools.partial(_call_ref, ref.weight_sum_penalty, options)))
            cases.append(_Case(
                "weight_sum_penalty_and_grad" + label, names,
                functools.partial(_call, simcore.weight_sum_penalty_and_grad, options),
                functools.partial(_call_ref, ref.weight_sum_penalty_and_grad, options)))
    layers = ("moved", "hwio", "dense", "hwio_ref")
    objective = {"lam": 0.3, "neuron_axis": [0, -1]}
    cases += [
        _Case("growth_objective", layers,
              lambda run, a, b, ra, rb: run(
                  simcore.growth_objective, [a, b], [ra, rb], **objective),
              lambda a, b, ra, rb: ref.growth_objective([a, b], [ra, rb], **objective)),
        _Case("growth_objective_and_grad", layers,
              lambda run, a, b, ra, rb: run(
                  simcore.growth_objective_and_grad, [a, b], [ra, rb], **objective),
              lambda a, b, ra, rb: ref.growth_objective_and_grad([a, b], [ra, rb], **objective)),
    ]
    for anchor in simcore.ANCHORS:
        for step in simcore.STEPS:
            cases.append(_Case(
                f"decorrelate[{anchor},{step}]", layers,
                functools.partial(_decorrelate_core, anchor, step),
                functools.partial(_decorrelate_reference, anchor, step)))
    cases.append(_Case("similarity_stats", ("stats",),
                       lambda run, w: _stats_tuple(run(simcore.similarity_stats, w, bins=4)),
                       lambda w: _stats_tuple_ref(ref.similarity_stats(w, bins=4)),
                       half_results_in_float32=True))
    return cases


def _call(fn, options, run, *arrays):
    return run(fn, *arrays, **options)


def _call_ref(fn, options, *arrays):
    return fn(*arrays, **options)


_DECORRELATE: dict[str, Any] = {"steps": 3, "lr": 0.1, "lam": 0.3, "neuron_axis": [0, -1]}


def _decorrelate_core(anchor, step, run, a, b, ra, rb):
    import simcore

    return run(simcore.decorrelate, [a, b], [ra, rb], anchor=anchor, step=step, **_DECORRELATE)


def _decorrelate_reference(anchor, step, a, b, ra, rb, *, rounder):
    """The weight-only descent of ``decorrelate``, written as a loop over the reference."""
    import simcore.reference as ref

    current, anchors = [a, b], [ra, rb]
    lr, lam, axes = _DECORRELATE["lr"], _DECORRELATE["lam"], _DECORRELATE["neuron_axis"]
    for _ in range(_DECORRELATE["steps"]):
        sims = [ref.similarity_loss_and_grad(w, neuron_axis=axis)[1]
                for w, axis in zip(current, axes, strict=True)]
        sums = [lam * ref.weight_sum_penalty_and_grad(w, r)[1]
                for w, r in zip(current, anchors, strict=True)]
        if anchor == "previous":
            anchors = current
        if step == "relative":
            moved = ref.relative_update(current, sims, sums, lr=lr, neuron_axis=axes)
        else:
            moved = [w - lr * (g + h) for w, g, h in zip(current, sims, sums, strict=True)]
        # The core stores each step in the input dtype: round the same way.
        current = [rounder(w) for w in moved]
    return current


def _stats_tuple(stats):
    return (stats.counts, stats.edges, stats.share_within_half, stats.mean_abs, stats.max_abs,
            stats.pairs)


def _stats_tuple_ref(stats):
    return tuple(np.asarray(stats[key]) for key in
                 ("counts", "edges", "share_within_half", "mean_abs", "max_abs", "pairs"))


def _flatten(values: Any) -> list[Any]:
    if isinstance(values, (tuple, list)):
        return [leaf for v in values for leaf in _flatten(v)]
    return [values]


# ----------------------------------------------------------------------------- running


def _integer_dtype_name(backend: Backend) -> str:
    info = backend.xp.__array_namespace_info__()
    default = info.default_dtypes(device=backend.device)["integral"]
    return backend.dtype_name(default)


def _run_case(backend: Backend, case: _Case, dtype: str) -> CheckResult:
    device = str(backend.device)
    try:
        arrays = [backend.asarray(_inputs()[name], dtype) for name in case.arrays]
        rounded = [backend.to_numpy(x).astype(np.float64) for x in arrays]

        def rounder(x):
            return backend.to_numpy(backend.asarray(x, dtype)).astype(np.float64)

        if case.function.startswith("decorrelate"):
            expected = case.reference(*rounded, rounder=rounder)
        else:
            expected = case.reference(*rounded)
        actual = case.core(backend.run, *arrays)
        actual, expected = _flatten(actual), _flatten(expected)
        if len(actual) != len(expected):
            raise AssertionError(f"got {len(actual)} outputs, the reference has {len(expected)}")
        worst = (-1.0, 0.0, 0.0)  # (error / tolerance, error, tolerance)
        failures = []
        integer_dtype = _integer_dtype_name(backend)
        for got, want in zip(actual, expected, strict=True):
            want = np.asarray(want)
            out_dtype = integer_dtype if want.dtype.kind in "iu" else case.out_dtype(dtype)
            # Tolerances follow the input dtype: a float32 statistic of float16
            # inputs is only as accurate as the float16 cosines it is built from.
            tol_dtype = out_dtype if out_dtype == integer_dtype else dtype
            rtol, atol = tolerance_for(want, tol_dtype)
            try:
                assert_close(got, want, backend=backend, dtype=out_dtype, rtol=rtol, atol=atol)
            except AssertionError as err:
                failures.append(str(err))
            try:
                error, tol = _worst_element(backend.to_numpy(got), want, rtol, atol)
            except Exception:  # noqa: BLE001 - unreadable or misshapen output: already failed
                error, tol = float("nan"), float("nan")
            ratio = error / tol if tol > 0 else (0.0 if error == 0 else np.inf)
            if not ratio <= worst[0]:  # NaN ratios count as worst
                worst = (ratio, error, tol)
        return CheckResult(backend.name, device, case.function, dtype, worst[1], worst[2],
                           not failures, "; ".join(failures))
    except Exception as err:  # noqa: BLE001 - a conformance report records every failure
        return CheckResult(backend.name, device, case.function, dtype, float("nan"), float("nan"),
                           False, f"{type(err).__name__}: {err}")


def _worst_element(got: np.ndarray, want: np.ndarray, rtol: float, atol: float):
    """``(error, bound)`` at the element closest to failing ``|got - want| <= atol +
    rtol |want|``, the test :func:`assert_close` applies to every element."""
    got, want = np.broadcast_arrays(np.asarray(got, np.float64), np.asarray(want, np.float64))
    both = np.isfinite(got) & np.isfinite(want)
    if not both.any():
        return max_error(got, want), atol
    error = np.abs(got - want)[both]
    bound = atol + rtol * np.abs(want)[both]
    worst = int(np.argmax(error / bound)) if np.all(bound > 0) else int(np.argmax(error))
    return float(error[worst]), float(bound[worst])


def check_backend(
    backend_or_xp: Backend | str | Any, *, dtypes: Iterable[str] | None = None
) -> list[CheckResult]:
    """Run every public simcore function on one backend and compare with the reference.

    ``backend_or_xp`` is a :class:`Backend`, a registered backend's name
    (``"torch"``), or an Array-API namespace (``torch``, ``jax.numpy``, an
    ``array_api_compat`` namespace or a third-party one). ``dtypes`` defaults to
    every dtype the backend is tested in; names it lacks are skipped.

    Returns one :class:`CheckResult` per function and dtype; it never raises for
    a failing function (the result records why), so one broken function does not
    hide the others.
    """
    if isinstance(backend_or_xp, str):
        backend = get_backend(backend_or_xp)
    else:
        backend = backend_for_namespace(backend_or_xp)
    if dtypes is None:
        chosen: Sequence[str] = backend.dtypes
    else:
        if isinstance(dtypes, str):
            raise TypeError("dtypes must be a sequence of dtype names, not a single str")
        unknown = [d for d in dtypes if d not in TOLERANCES]
        if unknown:
            raise ValueError(f"unknown dtypes {unknown}; expected names from {sorted(TOLERANCES)}")
        # A known dtype that this backend lacks (bfloat16 on NumPy) is skipped.
        chosen = [d for d in dtypes if d in backend.dtypes]
    return [_run_case(backend, case, dtype) for dtype in chosen for case in _cases()]
