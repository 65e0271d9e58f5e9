"""Helpers of benchmarks/gpu_check.sh: device report, import links, the JSON + Markdown summary.

``--devices PATH``: versions and the devices torch, CuPy and JAX see, as JSON (and printed).
``--link-tree DIR``: a folder of links under which ``simcore``, ``simcore.adapters`` and
``simcore.reference`` import from this source tree without installing it.
``--summarize OUT [--dry-run]``: read ``OUT/steps.tsv`` (name, exit status, milliseconds,
command per step), the step logs and ``OUT/bench.json``; write ``OUT/summary.json`` and
``OUT/summary.md``. The GPU target is value+grad <= 1.3x one cuBLAS GEMM at 4096 x 4096 fp32;
the exit status is 0 when every step that ran passed (the target is reported, not enforced).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TARGET = 1.3
TARGET_SHAPE = (4096, 4096)


def devices() -> dict:
    """What each library is and which devices it sees (errors recorded, never raised)."""
    report: dict = {"python": sys.version.split()[0]}
    for name in ("numpy", "torch", "cupy", "jax", "keras"):
        try:
            module = importlib.import_module(name)
            report[name] = {"version": getattr(module, "__version__", "?")}
        except Exception as error:  # noqa: BLE001 - an absent or broken library is a finding
            report[name] = {"error": f"{type(error).__name__}: {error}"}
    try:
        import torch

        report["torch"]["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            report["torch"]["device"] = torch.cuda.get_device_name(0)
    except Exception as error:  # noqa: BLE001
        report["torch"]["cuda_error"] = repr(error)
    try:
        import cupy

        report["cupy"]["devices"] = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001
        report["cupy"]["devices_error"] = f"{type(error).__name__}: {error}"
    try:
        import jax

        report["jax"]["devices"] = [str(d) for d in jax.devices()]
    except Exception as error:  # noqa: BLE001
        report["jax"]["devices_error"] = f"{type(error).__name__}: {error}"
    return report


def link_tree(folder: Path) -> None:
    """``folder/simcore`` mirrors ``simcore/`` with ``adapters`` and ``reference`` linked in."""
    package = folder / "simcore"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "simcore").iterdir():
        target = package / entry.name
        if not target.exists():
            target.symlink_to(entry)
    for name in ("adapters", "reference"):
        target = package / name
        if not target.exists():
            target.symlink_to(ROOT / name)


def _steps(out: Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, milliseconds, command = (line.split("\t") + ["", "", ""])[:4]
        log = out / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        steps.append({"name": name, "status": status, "seconds": int(milliseconds or 0) / 1e3,
                      "command_or_reason": command, "log_tail": tail})
    return steps


def _target(bench: dict | None) -> dict:
    """The ratio of each GPU contender at 4096 x 4096 against the 1.3x target."""
    found: dict = {"target": GPU_TARGET, "shape": list(TARGET_SHAPE), "ratios": {}}
    for row in (bench or {}).get("shapes", []):
        if (row["n"], row["d"]) == TARGET_SHAPE:
            found["ratios"] = {name: ratio for name, ratio in row["ratios"].items()
                               if "autograd" not in name and "keras" not in name}
    found["met"] = {name: ratio <= GPU_TARGET for name, ratio in found["ratios"].items()}
    return found


def summarize(out: Path, dry_run: bool) -> int:
    steps = _steps(out)
    bench_path = out / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    devices_path = out / "devices.json"
    summary = {
        "dry_run": dry_run,
        "steps": steps,
        "passed": all(s["status"] in ("0", "skipped") for s in steps),
        "devices": json.loads(devices_path.read_text()) if devices_path.exists() else None,
        "benchmark": bench,
        "gpu_target": _target(bench),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# simcore GPU check{' (dry run on CPU)' if dry_run else ''}", "",
             "| step | status | seconds | command or reason |", "|---|---|---|---|"]
    for s in steps:
        status = {"0": "passed", "skipped": "skipped", "124": "timed out"}.get(
            s["status"], f"failed ({s['status']})")
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.1f} | "
                     f"`{s['command_or_reason']}` |")
    if bench and bench.get("shapes"):
        def cells_of(row):  # the contenders, then each library's two plain products
            return {**row["ratios"], **{f"{library} products": ratio
                                        for library, ratio in row.get("products", {}).items()}}

        names = list(cells_of(bench["shapes"][0]))
        lines += ["", "value+grad / one GEMM of the same library and device (fp32, best of "
                  f"{bench.get('repeats')} rounds; '<library> products': w @ w.T then "
                  "(n x n) @ w, done plainly):", "",
                  "| n x d | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for row in bench["shapes"]:
            found = cells_of(row)
            cells = " | ".join(f"{found.get(name, float('nan')):.2f}x" for name in names)
            lines.append(f"| {row['n']} x {row['d']} | {cells} |")
        for note in bench.get("notes", []):
            lines.append(f"\nnote: {note}")
    target = summary["gpu_target"]
    if target["ratios"]:
        met = ", ".join(f"{name} {ratio:.2f}x ({'met' if target['met'][name] else 'missed'})"
                        for name, ratio in target["ratios"].items())
        lines += ["", f"Target value+grad <= {GPU_TARGET}x one GEMM at 4096 x 4096: {met}."]
    lines += ["", f"All steps that ran passed: {summary['passed']}."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["passed"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--devices", type=Path, metavar="PATH")
    group.add_argument("--link-tree", type=Path, metavar="DIR")
    group.add_argument("--summarize", type=Path, metavar="OUT")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.devices:
        report = devices()
        args.devices.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    if args.link_tree:
        link_tree(args.link_tree)
        return 0
    return summarize(args.summarize, args.dry_run)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.exit(main())
