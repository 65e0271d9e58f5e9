"""The ``simcore`` console command (also ``python -m simcore``).

Subcommands:

* ``simcore check [--backends numpy,torch] [--dtypes float32,float64]``: run
  :func:`simcore.testing.check_backend` on every installed backend (or those
  named) and print one table row per backend, function and dtype; exit status
  1 when any check fails or a named backend is unusable.
* ``simcore grow [options]``: the paper's experiment (needs torch), implemented in
  :mod:`simcore.experiment.cli`; imported only when invoked.

Each subcommand is a ``_register_*`` function that adds its parser and sets
``handler`` (called with the parsed arguments, returning the exit status); a new
subcommand adds one such function to :data:`SUBCOMMANDS`.

>>> main(["check", "--backends", "numpy", "--dtypes", "float64", "--failures-only"])
0 failed of 26 checks on numpy (float64)
0
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _comma_list(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _format_number(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


#: Column widths of the check table, fixed so that each backend's rows can be printed as soon
#: as that backend is checked (the longest function name today is 49 characters).
_CHECK_WIDTHS = {"backend": 16, "device": 6, "function": 49, "dtype": 8, "max error": 9,
                 "tolerance": 9, "result": 6}


def _print_row(cells: Sequence[str], out) -> None:
    widths = _CHECK_WIDTHS.values()
    print("  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip(),
          file=out, flush=True)


def _run_check(args: argparse.Namespace) -> int:
    from simcore.testing import (
        TOLERANCES,
        BackendUnavailableError,
        available_backends,
        check_backend,
    )

    try:
        unknown = [d for d in args.dtypes or () if d not in TOLERANCES]
        if unknown:
            raise ValueError(f"unknown dtypes {unknown}; expected names from {sorted(TOLERANCES)}")
        backends = available_backends(args.backends)
    except (BackendUnavailableError, ValueError) as err:
        print(f"simcore check: {err}", file=sys.stderr)
        return 1
    if not backends:
        print("simcore check: no backend available", file=sys.stderr)
        return 1
    names = ", ".join(b.name for b in backends)
    # on stderr, so that stdout stays the table; each backend's rows follow as it finishes
    print(f"simcore check: every public function on {names} against simcore.reference, "
          f"one backend after the other", file=sys.stderr, flush=True)
    details, total, failed, header_printed = [], 0, 0, False
    for backend in backends:
        started = time.perf_counter()
        results = check_backend(backend, dtypes=args.dtypes)
        total += len(results)
        failed += sum(not result.passed for result in results)
        for result in results:
            if result.passed and args.failures_only:
                continue
            if not header_printed:
                _print_row(list(_CHECK_WIDTHS), sys.stdout)
                _print_row(["-" * w for w in _CHECK_WIDTHS.values()], sys.stdout)
                header_printed = True
            _print_row([result.backend, result.device, result.function, result.dtype,
                        _format_number(result.max_error), _format_number(result.tolerance),
                        "pass" if result.passed else "FAIL"], sys.stdout)
            if result.detail:
                details.append(f"{result.backend} {result.function} {result.dtype}: "
                               f"{result.detail}")
        print(f"simcore check: {backend.name}: {len(results)} checks, "
              f"{sum(not r.passed for r in results)} failed, "
              f"{time.perf_counter() - started:.1f} s (the checks themselves)",
              file=sys.stderr, flush=True)
    for line in details:
        print(line)
    dtypes = f" ({', '.join(args.dtypes)})" if args.dtypes else ""
    print(f"{failed} failed of {total} checks on {names}{dtypes}")
    return 1 if failed or total == 0 else 0


def _register_check(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="run the conformance checks against the NumPy reference on each backend",
        description="Run every public simcore function on fixed inputs on each backend and "
        "compare with simcore.reference; print a table and exit 1 if anything fails.",
    )
    parser.add_argument(
        "--backends", type=_comma_list, default=None,
        help="comma list of backends (default: $SIMCORE_TEST_BACKENDS, else every installed "
        "one: numpy, array_api_strict, torch, torch_cuda, jax, jax_jit, cupy)",
    )
    parser.add_argument(
        "--dtypes", type=_comma_list, default=None,
        help="comma list of dtypes (default: every dtype each backend supports)",
    )
    parser.add_argument(
        "--failures-only", action="store_true", help="print only failing rows and the summary"
    )
    parser.set_defaults(handler=_run_check)


#: What `simcore grow` imports beyond the core: the `experiment` extra.
GROW_REQUIREMENTS = {"torch": "torch", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
                     "tqdm": "tqdm"}


def _run_grow(args: argparse.Namespace) -> int:
    missing = [name for module, name in GROW_REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        print(f"simcore grow needs {', '.join(missing)}: pip install 'simcore[experiment]'",
              file=sys.stderr)
        return 2
    # Imported here: the experiment needs torch, and `import simcore` must not import it.
    from simcore.experiment.cli import main as grow_main

    return grow_main(args.grow_args)


def _register_grow(subparsers) -> None:
    # The experiment module owns the options (`simcore grow --help` lists them); "+" as the
    # only prefix makes this parser pass every "-x"/"--x" through to it untouched.
    parser = subparsers.add_parser(
        "grow", add_help=False, prefix_chars="+",
        help="grow a network while training, with and without the similarity phase, and "
        "print the paper-shaped table (needs torch; see 'simcore grow --help')",
    )
    parser.add_argument("grow_args", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=_run_grow)


#: Functions that each add one subcommand to the ``simcore`` parser.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_register_check,
                                                                   _register_grow]


def build_parser() -> argparse.ArgumentParser:
    """The ``simcore`` argument parser with every registered subcommand."""
    from simcore import __version__

    parser = argparse.ArgumentParser(
        prog="simcore",
        description="simcore: neuron-similarity loss (Sakai & Hotta) on any Array-API backend",
    )
    parser.add_argument("--version", action="version", version=f"simcore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``simcore`` command; returns the exit status."""
    # Progress lines must reach a file or pipe as they are printed, not at exit.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on captured streams
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover - `python -m simcore.cli`
    sys.exit(main())
