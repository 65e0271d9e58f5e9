"""``simcore grow``: the paper's experiment as a command (arguments and entry point).

``simcore grow`` alone runs the ``quick`` preset — VGG16 grown by Firefly on
scikit-learn's bundled digits over five seeds, without the similarity phase,
with it, and with a random perturbation of the same size (the control) — and
prints a table shaped like the paper's Table 1 with paired differences and
their confidence intervals. ``--preset paper`` is the paper's CIFAR-10 setting
(needs the CIFAR files and, in practice, a GPU); ``--compare`` runs all three
methods; ``--ablation`` adds the two single-term variants (the paper's Table 3);
several ``--N`` sweep N and choose N_best on the validation split.
Every option overrides the preset. Re-running the same command reuses finished
runs and resumes an interrupted one from its checkpoint, when the same code wrote
them (runs of other code are trained again, unless ``--reuse-runs-from-other-code``);
``--fresh`` starts over.

>>> args = build_parser().parse_args(["--method", "ssd", "--epochs", "3", "--seeds", "0", "1"])
>>> plan(args)["methods"], plan(args)["terms"], plan(args)["seeds"], plan(args)["base"].epochs
(['ssd'], ['none', 'both', 'control'], [0, 1], 3)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import (
    ANCHORS,
    DEFAULT_PHASE_LAM,
    DEFAULT_PHASE_LR,
    FORMS,
    FRAMEWORKS,
    LR_SCHEDULES,
    METHODS,
    MODELS,
    PHASES,
    PRESET_SEEDS,
    PRESET_TERMS,
    PRESETS,
    STEPS,
    UNITS,
    preset,
)

__all__ = ["FIELD_FLAGS", "build_parser", "flag_names", "main", "plan"]

_SIMILARITY = {"on": ["both"], "off": ["none"], "both": ["none", "both"]}
# option name -> RunConfig field, for the options that simply override the preset
_OVERRIDES = {
    "model": "model", "width": "width", "ratio": "ratio", "unit": "unit",
    "grow_every": "grow_every", "max_growths": "max_growths",
    "growth_batches": "growth_batches", "ssd_mode": "ssd_mode",
    "firefly_candidates": "firefly_candidates", "phase": "phase",
    "phase_lr": "phase_lr", "phase_step": "phase_step", "lam": "lam", "form": "form",
    "anchor": "anchor", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "lr_schedule": "lr_schedule", "momentum": "momentum", "weight_decay": "weight_decay",
    "dataset": "dataset", "data_root": "data_root", "train_limit": "train_limit",
    "test_limit": "test_limit", "val_fraction": "val_fraction", "data_seed": "data_seed",
    "device": "device", "framework": "framework",
}

#: RunConfig field (and run_experiment argument) -> the flag a user types to set it, so that
#: an error names ``--N``, not ``phase_steps``.
FIELD_FLAGS = {field: "--" + option.replace("_", "-") for option, field in _OVERRIDES.items()}
FIELD_FLAGS.update(phase_steps="--N", seeds="--seeds", jobs="--jobs", threads="--threads",
                   methods="--method")
# Single words such as "model" or "lr" also occur in prose: they are replaced only as the
# subject of a validation message ("lr must be ..."); names with "_" are replaced anywhere.
_FIELD_PATTERN = re.compile(
    r"\b(" + "|".join(sorted((f for f in FIELD_FLAGS if "_" in f), key=len, reverse=True))
    + r")\b|\b(" + "|".join(f for f in FIELD_FLAGS if "_" not in f)
    + r")\b(?= (?:must|holds)\b)")


def flag_names(message: str) -> str:
    """``message`` with RunConfig field names replaced by the flags that set them.

    >>> flag_names("phase_steps must be >= 0, got -3")
    '--N must be >= 0, got -3'
    >>> flag_names("lr must be a finite positive number, got 0.0; the model grows")
    '--lr must be a finite positive number, got 0.0; the model grows'
    """
    return _FIELD_PATTERN.sub(lambda m: FIELD_FLAGS[m.group(0)], message)

# Options that only matter when a similarity phase runs, and those that only matter for one
# growth method: given without it, they are ignored, which a warning says.
_PHASE_OPTIONS = ("N", "phase", "phase_step", "phase_lr", "lam", "form", "anchor")
_METHOD_OPTIONS = {"ssd_mode": "ssd", "firefly_candidates": "firefly"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simcore grow",
        description="Grow a network while training (Random, SSD or Firefly), with and without "
        "the post-growth similarity phase of Sakai & Hotta, and report accuracy, training "
        "time, N and parameters like the paper's Tables 1-3, with figures (Fig. 4 Grad-CAM, "
        "Fig. 6 similarity histogram, accuracy/parameters over epochs).",
        epilog="Examples: 'simcore grow' (quick, about 2 minutes on 2 CPU cores); 'simcore grow "
        "--compare'; 'simcore grow --N 1 5 10 15 20 30' (an N sweep, N_best on the "
        "validation split); 'simcore grow --preset paper --data-root ~/data --device cuda'.",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                      help="quick: bundled digits, 8 epochs, 3 growths, 5 seeds (default); paper: "
                      "CIFAR-10, 250 epochs, a growth every 50, SGD 0.9, cosine lr, batch 128")
    what.add_argument("--method", nargs="+", choices=METHODS, default=None,
                      help="growth method(s) (default: firefly; all three with --compare)")
    what.add_argument("--similarity", choices=tuple(_SIMILARITY), default=None,
                      help="run without (off), with (on) or both ways (default: the preset's "
                      "terms; quick also runs the perturbation control)")
    what.add_argument("--compare", action="store_true",
                      help="every method with and without the similarity phase, over the "
                      "preset's seeds unless --seeds is given")
    what.add_argument("--ablation", action="store_true",
                      help="also run Eq. 2 alone and Eq. 4 alone (the paper's Table 3)")
    what.add_argument("--control", action="store_true",
                      help="also run a control: the grown layers moved at random by as much as "
                      "the phase moves them (separates decorrelation from perturbation)")
    what.add_argument("--seeds", nargs="+", type=int, default=None,
                      help="run seeds (default: the preset's)")
    model = parser.add_argument_group("model and growth")
    model.add_argument("--model", choices=MODELS, help="growth seed (default vgg16)")
    model.add_argument("--width", type=int, help="seed width of every layer (default: the "
                       "paper's, 16 for VGG16 and 32 for MobileNetV1)")
    model.add_argument("--ratio", type=float, help="growth per step (default 0.35)")
    model.add_argument("--unit", choices=UNITS, help="ratio of the neuron count (default) or "
                       "of the parameter count")
    model.add_argument("--grow-every", type=int, help="grow after every this many epochs")
    model.add_argument("--max-growths", type=int, help="number of growths")
    model.add_argument("--growth-batches", type=int,
                       help="training batches SSD/Firefly use to score candidates")
    model.add_argument("--ssd-mode", choices=("exact", "fast"), help="SSD variant")
    model.add_argument("--firefly-candidates", type=int,
                       help="Firefly's new-neuron candidates per layer (reference: 70)")
    phase = parser.add_argument_group("similarity phase (Eq. 5 after each growth)")
    phase.add_argument("--N", type=int, nargs="+", help="iterations after each growth "
                       "(default: the paper's best, Random 20, SSD 10, Firefly 15); several "
                       "values sweep N and pick N_best on the validation split, e.g. "
                       "--N 1 5 10 15 20 30")
    phase.add_argument("--phase", choices=PHASES, help="weights_only: N steps on Eq. 5 alone "
                       "(default); joint: Eq. 5 added to the next N training steps")
    phase.add_argument("--phase-step", choices=STEPS, help="relative (default): each step "
                       "moves a neuron by at most phase-lr times its norm, at any weight "
                       "scale; absolute: plain gradient steps of size phase-lr")
    phase.add_argument("--phase-lr", type=float, help="step size of the phase (default: "
                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_PHASE_LR.items()) + ")")
    phase.add_argument("--lam", type=float, help="lambda of the weight-sum term (default: "
                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_PHASE_LAM.items()) + ")")
    phase.add_argument("--form", choices=FORMS, help="Eq. 4 form (default squared_log; "
                       "literal is the paper's formula as printed)")
    phase.add_argument("--anchor", choices=ANCHORS, help="W_prev of Eq. 4: the post-growth "
                       "snapshot (default) or the previous step")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="initial SGD learning rate")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    train.add_argument("--momentum", type=float)
    train.add_argument("--weight-decay", type=float)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("digits", "cifar10", "cifar100"))
    data.add_argument("--data-root", help="folder holding cifar-10-batches-py/ or "
                      "cifar-100-python/ (extracted from the archives of "
                      "https://www.cs.toronto.edu/~kriz/cifar.html)")
    data.add_argument("--train-limit", type=int, help="use only this many training images")
    data.add_argument("--test-limit", type=int, help="use only this many test images")
    data.add_argument("--val-fraction", type=float, help="share of the training images held "
                      "out for validation (N sweeps choose on it, never on the test split)")
    data.add_argument("--data-seed", type=int, help="seed of the train/validation/test split")
    run = parser.add_argument_group("running")
    run.add_argument("--framework", choices=FRAMEWORKS,
                     help="torch (default): the PyTorch seeds and growers; jax: the Flax seeds "
                     "trained with optax and grown through simcore.adapters.jax, on the same "
                     "batches (no Grad-CAM, no mid-run checkpoints)")
    run.add_argument("--device", help="cpu, cuda, cuda:1, ... or auto (default: the preset's)")
    run.add_argument("--out", type=Path, default=None,
                     help="output folder (default: simcore-grow/<preset>)")
    run.add_argument("--fresh", action="store_true",
                     help="discard earlier runs in the output folder instead of resuming")
    run.add_argument("--reuse-runs-from-other-code", action="store_true",
                     help="reuse finished runs (and resume checkpoints) that another version "
                     "of simcore wrote with the same settings, e.g. after an edit known not to "
                     "change results; by default they are trained again and their files kept "
                     "beside as *.code-<fingerprint>.*")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: 1 on a CPU device, where the small "
                     "growth seeds gain little from threads and, on a machine busy with other "
                     "work, threads waiting for each other made a run 4-16x slower; "
                     "torch's own choice on a GPU)")
    run.add_argument("--jobs", type=int, default=None,
                     help="runs at a time, each in its own process (default: the CPU count on a "
                     "CPU device, 1 on a GPU)")
    run.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    run.add_argument("--quiet", action="store_true", help="no progress bars or run lines")
    return parser


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The base configuration, methods, terms, seeds and output folder the arguments ask for."""
    overrides = {field: getattr(args, option) for option, field in _OVERRIDES.items()
                 if getattr(args, option) is not None}
    base = preset(args.preset).replace(**overrides)
    methods = args.method or (list(METHODS) if args.compare else [base.method])
    if args.similarity is None and not args.ablation and not args.control:
        terms = list(PRESET_TERMS[args.preset])
        if base.phase != "weights_only":  # the control mirrors a weights-only phase
            terms = [t for t in terms if t != "control"]
    else:
        terms = list(_SIMILARITY[args.similarity or "both"])
    if args.ablation:
        if args.similarity in ("on", "off"):
            raise ValueError("--ablation runs the baseline and every term: leave out "
                             "--similarity")
        terms = ["none", "eq2", "eq4", "both"]
    if args.control:
        if base.phase != "weights_only":
            raise ValueError("--control mirrors a weights-only phase: it cannot run with "
                             "--phase joint")
        if terms == ["none"]:
            raise ValueError("--control is measured against the phase: leave out "
                             "--similarity off")
        terms.append("control")
    seeds = args.seeds if args.seeds is not None else list(PRESET_SEEDS[args.preset])
    phase_steps = [base.phase_steps] if not args.N else list(args.N)
    if len(phase_steps) > 1 and not base.val_fraction:
        raise ValueError("an N sweep (several --N) chooses N on a validation split: give "
                         "--val-fraction > 0")
    if args.data_root is not None and base.dataset == "digits":
        raise ValueError("--data-root reads CIFAR files, but the digits are bundled with "
                         "scikit-learn: leave out --data-root or pass --dataset cifar10")
    warnings = []
    if terms == ["none"]:
        ignored = [FIELD_FLAGS.get(o, "--" + o) for o in _PHASE_OPTIONS
                   if getattr(args, o) is not None]
        if ignored:
            warnings.append(f"{', '.join(ignored)} ignored: --similarity off runs no "
                            f"similarity phase")
    for option, method in _METHOD_OPTIONS.items():
        if getattr(args, option) is not None and method not in methods:
            warnings.append(f"{FIELD_FLAGS[option]} ignored: it applies to --method {method} "
                            f"only")
    out = args.out if args.out is not None else Path("simcore-grow") / args.preset
    return {"base": base, "methods": list(methods), "terms": terms, "seeds": list(seeds),
            "phase_steps": phase_steps, "out": out, "warnings": warnings}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``simcore grow``; returns the exit status."""
    started = time.perf_counter()  # the total below includes torch's import and the data
    args = build_parser().parse_args(argv)
    try:
        chosen = plan(args)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except (TypeError, ValueError) as err:
        print(f"simcore grow: error: {flag_names(str(err))}", file=sys.stderr)
        return 2
    for warning in chosen["warnings"]:
        print(f"simcore grow: warning: {warning}", file=sys.stderr)
    import torch

    from .compare import run_experiment  # imports torch; keep --help fast
    from .runner import resolve_device

    threads, jobs = args.threads, args.jobs
    try:
        if chosen["base"].framework == "jax":
            from .jax_runner import resolve_device as jax_device

            on_cpu = jax_device(chosen["base"].device).platform == "cpu"
        else:
            on_cpu = resolve_device(chosen["base"].device).type == "cpu"
        if jobs is not None and jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
    except ValueError as err:
        print(f"simcore grow: error: {err}", file=sys.stderr)
        return 2
    runs = len(chosen["methods"]) * len(chosen["seeds"]) * sum(
        1 if t == "none" else len(chosen["phase_steps"]) for t in chosen["terms"])
    if jobs is None:
        jobs = min(os.cpu_count() or 1, runs) if on_cpu else 1
    if threads is None and on_cpu:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)

    progress = not args.quiet and sys.stderr.isatty()
    try:
        outcome = run_experiment(
            chosen["base"], methods=chosen["methods"], terms=chosen["terms"],
            seeds=chosen["seeds"], phase_steps=chosen["phase_steps"], out_dir=chosen["out"],
            fresh=args.fresh, figures=not args.no_figures, progress=progress,
            echo=None if args.quiet else print, jobs=jobs, threads=threads or 1,
            reuse_other_code=args.reuse_runs_from_other_code)
    except KeyboardInterrupt:
        print(f"\nsimcore grow: interrupted; the checkpoint is in {chosen['out']}/runs/. "
              f"Run the same command again to resume.", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError) as err:
        print(f"simcore grow: error: {flag_names(str(err))}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged run: it stopped, its last good state kept
        print(f"simcore grow: error: {err}", file=sys.stderr)
        return 1
    print()
    print(outcome["table"])
    print()
    print(outcome["conclusion"])
    print()
    for kind, path in outcome["files"].items():
        print(f"{kind}: {path}")
    print(f"total wall time {time.perf_counter() - started:.1f} s (from the start of simcore "
          f"grow: imports, data, every run, table and figures; Python's own start-up excluded)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
