"""benchmarks/bench_growth.py's width curve: a row per width, printed as it is measured, with
exact mode refused over its memory limit and fast mode measured at every width."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_growth.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_growth", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # six growths with torch.fx tracing: 13 s on the loaded 2-core machine
def test_the_width_curve_times_both_modes_and_shows_exact_refusing_past_its_limit():
    bench = _bench()
    lines: list[str] = []
    # width 4: three (4, 36, 36) float32 arrays (62208 bytes) fit; width 8's (248832) do not
    rows = bench.width_curve([4, 8], repeats=1, exact_budget=60.0, exact_max_bytes=62208,
                             say=lines.append)
    assert [r["width"] for r in rows] == [4, 8] and len(lines) == 2
    assert rows[0]["exact_seconds"] > 0 and rows[1]["exact_seconds"] is None
    assert "exact_max_bytes" in rows[1]["exact_note"] and "refused" in lines[1]
    for row in rows:
        assert row["fast_seconds"] > 0 and row["fast_before_seconds"] > 0
