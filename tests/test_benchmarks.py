"""benchmarks/bench_similarity.py (columns, JSON, the Keras column) and benchmarks/gpu_check.sh
(its CPU dry run and its summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_similarity  # noqa: E402
import gpu_check_summary  # noqa: E402


def test_the_benchmark_writes_a_json_of_its_ratios(tmp_path, capsys):
    path = tmp_path / "bench.json"
    results = bench_similarity.main(["--quick", "--shapes", "48x20,64x9", "--repeats", "1",
                                     "--backends", "numpy", "--json", str(path)])
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(results))
    assert [(row["n"], row["d"]) for row in written["shapes"]] == [(48, 20), (64, 9)]
    assert all(row["ratios"]["numpy"] > 0 and row["gemm_ms"]["numpy"] > 0
               and row["products"]["numpy"] > 0 for row in written["shapes"])
    assert written["memory"]["peak_bytes"] > 0
    out = capsys.readouterr().out
    assert "expected to take about" in out and "64 x 9" in out and "numpy products" in out


def test_each_sample_repeats_a_short_call_and_libraries_are_timed_apart(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_similarity, "_calls_per_sample", lambda fn, sync, least: 3)

    def contenders(backends, w, other, regularizer):
        def column(name, library):
            return bench_similarity.Contender(
                name, lambda: calls.append(name), lambda: calls.append(f"{library} GEMM"),
                library=library, products=lambda: calls.append(f"{library} products"))
        return [column("first", "a"), column("second", "b")]

    monkeypatch.setattr(bench_similarity, "contenders_for", contenders)
    (_, gemm_ms, ratios, products), = bench_similarity.time_shapes([(4, 3)], repeats=2)
    assert set(ratios) == {"first", "second"} and set(products) == set(gemm_ms) == {"a", "b"}
    # every call of library a (warm-up, then 2 rounds of 3 calls per entry) before any of b
    last_a = max(i for i, name in enumerate(calls) if name in ("first", "a GEMM", "a products"))
    first_b = min(i for i, name in enumerate(calls) if name in ("second", "b GEMM", "b products"))
    assert last_a < first_b
    assert calls.count("first") == 1 + 2 * 3 and calls.count("a GEMM") == 1 + 2 * 3


def test_the_keras_column_is_skipped_with_a_note_without_keras(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras -> ImportError
    regularizer, note = bench_similarity._keras_regularizer()
    assert regularizer is None and "keras is not installed" in note


def test_the_keras_factor_is_one_for_keras_rows_formula_written_out():
    # Keras is not a dependency (CI has none): Keras 3's OrthogonalRegularizer(mode="rows") is
    # written out here as its source computes it, so the factor the README states is checked
    # everywhere; the benchmark compares with Keras itself where it is installed.
    jnp = pytest.importorskip("jax.numpy")

    def keras_rows(w, factor=1.0):
        rows = w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        product = rows @ rows.T
        size = product.shape[0]
        off_diagonal = product * (1.0 - jnp.eye(size))
        return factor * 0.5 * jnp.sum(jnp.abs(off_diagonal)) / (size * (size - 1) / 2)

    assert bench_similarity.keras_factor_check(keras_rows)["ratio"] == pytest.approx(1, rel=1e-5)


def _fake_run(out, statuses, ratio):
    out.mkdir()
    (out / "steps.tsv").write_text("".join(f"{name}\t{status}\t1500\tcmd {name}\n"
                                           for name, status in statuses))
    (out / "bench.json").write_text(json.dumps({"repeats": 3, "notes": [], "shapes": [
        {"n": 4096, "d": 4096, "gemm_ms": {"cupy": 1.0},
         "ratios": {"cupy gemm": ratio, "torch autograd cuda": 4.0},
         "products": {"cupy": 1.5}}]}))


def test_the_summary_reports_steps_and_the_gpu_target(tmp_path):
    _fake_run(tmp_path / "ok", [("tests", "0"), ("grow", "skipped")], 1.25)
    assert gpu_check_summary.main(["--summarize", str(tmp_path / "ok")]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["passed"] and summary["gpu_target"]["met"] == {"cupy gemm": True}
    assert "| 4096 x 4096 | 1.25x | 4.00x | 1.50x |" in (tmp_path / "ok" / "summary.md").read_text()

    _fake_run(tmp_path / "bad", [("tests", "1"), ("grow", "124")], 1.6)
    assert gpu_check_summary.main(["--summarize", str(tmp_path / "bad")]) == 1
    markdown = (tmp_path / "bad" / "summary.md").read_text()
    assert "failed (1)" in markdown and "timed out" in markdown and "(missed)" in markdown


@pytest.mark.slow  # about 2 minutes on a busy 2-core machine: tests, benchmark, a short grow
def test_the_gpu_check_dry_run_passes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"]
    by_name = {step["name"]: step for step in summary["steps"]}
    assert {"devices", "tests", "bench", "grow"} <= {n for n, s in by_name.items()
                                                     if s["status"] == "0"}
    assert "CUDA" in by_name["tests-gpu"]["command_or_reason"]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "bench.json").exists()
