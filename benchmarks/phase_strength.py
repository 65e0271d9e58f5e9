"""How strong should the post-growth phase be? A sweep of its step size on the bundled digits.

For each relative step size ``lr`` this runs the quick preset (Firefly, VGG16, N = 15, five
seeds) with the phase and compares it with the same seeds without it. Each row is printed as
soon as its runs finish:

* moved: relative change of the grown layers' weights per phase (mean over growths, layers);
* |cos| x: mean |cos| of the grown layers after the phase / before it;
* cost: test accuracy right after the phase minus right after the growth (points), i.e. how
  much the phase undoes of what the network had learnt;
* final |cos| x: final mean |cos| of all conv/linear layers with the phase / without it;
* vs baseline: paired final test-accuracy difference, mean and 95% CI;
* phase share: the phase's wall time as a share of the run's training time (its own timers).

The default (``DEFAULT_PHASE_LR["relative"]``) is the largest ``lr`` whose mean cost stays
under one point. Takes about 5 minutes on 2 CPU cores with ``--jobs 2``:

    python benchmarks/phase_strength.py --out runs/phase-strength

Run again with the same ``--out``, it reuses the runs this code finished and trains again
those another version of simcore wrote (saying how many); ``--reuse-runs-from-other-code``
reuses them anyway.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from simcore.experiment import preset
from simcore.experiment.compare import REUSE_FLAG, code_note, run_experiment
from simcore.experiment.statistics import paired_differences


def _phase_means(result):
    layers = [layer for growth in result["growths"] for layer in growth["phase"]["layers"].values()]
    moved = np.mean([layer["relative_change"] for layer in layers])
    ratio = np.mean([layer["after"]["mean_abs"] / layer["before"]["mean_abs"] for layer in layers])
    cost = np.mean([g["accuracy"]["after_phase"]["test"] - g["accuracy"]["after_growth"]["test"]
                    for g in result["growths"]])
    return moved, ratio, cost, result["phase_seconds"] / result["training_seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, nargs="+",
                        default=[0.003, 0.005, 0.01, 0.015, 0.02, 0.03, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/phase-strength"))
    parser.add_argument(REUSE_FLAG, action="store_true",
                        help="reuse runs in --out that another version of simcore finished "
                        "(by default they are trained again)")
    args = parser.parse_args(argv)
    base = preset("quick")
    started = time.perf_counter()
    common = dict(methods=["firefly"], seeds=args.seeds, figures=False, echo=None,
                  jobs=args.jobs, reuse_other_code=args.reuse_runs_from_other_code)
    statuses = []

    def run(config, terms, folder):
        outcome = run_experiment(config, terms=terms, out_dir=args.out / folder, **common)
        statuses.extend(outcome["statuses"])
        return outcome["results"]

    baseline = run(base, ["none"], "baseline")
    print(f"{'lr':>6}  {'moved':>6}  {'|cos| x':>7}  {'cost':>6}  {'final |cos| x':>13}  "
          f"{'vs baseline [95% CI]':>22}  {'phase share':>11}", flush=True)
    for lr in args.lr:
        runs = run(base.replace(phase_lr=lr), ["both"], f"lr{lr:g}")
        (paired,) = paired_differences(baseline + runs)
        moved, ratio, cost, share = np.mean([_phase_means(r) for r in runs], axis=0)
        interval = f"{paired['mean']:+.2f} [{paired['ci_low']:+.2f}, {paired['ci_high']:+.2f}]"
        print(f"{lr:6g}  {100 * moved:5.1f}%  {ratio:7.2f}  {cost:+6.1f}  "
              f"{paired['similarity_ratio']:13.2f}  {interval:>22}  {100 * share:10.1f}%",
              flush=True)
    print(f"{len(args.seeds)} seeds per row; {time.perf_counter() - started:.0f} s; "
          f"{statuses.count('reused')} of {len(statuses)} runs reused from earlier (same code)")
    note = code_note(statuses)
    if note:
        print(note)


if __name__ == "__main__":
    main()
