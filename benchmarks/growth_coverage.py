"""Which zoo model grows with which method: the README's coverage table.

For every model of :mod:`simcore.adapters.torch.zoo` (at ``--width``, 32x32 random images,
seeded) and every method (Random; SSD fast mode; Firefly), one growth of ``--ratio`` of the
neurons on a copy of the model, checked by :func:`simcore.adapters.torch.coverage.check_growth`.
A cell reads ``share · kept`` (the share of neurons in growable layers; the outputs unchanged
to 1e-5 relative, eval mode), ``share · Δ 3e-03`` (how far the outputs moved instead), or
``refused: <the GrowthError's first words>``. ``--why`` also lists each skipped layer (by
module name) with its reason. Deterministic (fixed seeds, one torch thread); about a minute on
2 CPU cores at the default width:

    python benchmarks/growth_coverage.py [--why]

tests/test_torch_zoo.py checks the same facts (growth or a clear GrowthError, Random keeps the
function, the grown model trains a step) model by model.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from simcore.adapters.torch import FireflyGrower, RandomGrower, SSDGrower
from simcore.adapters.torch.coverage import check_growth
from simcore.adapters.torch.zoo import NAMES, build

METHODS = {
    "random": lambda: RandomGrower(seed=0),
    "ssd (fast)": lambda: SSDGrower("fast", seed=0, rayleigh_steps=20),
    "firefly": lambda: FireflyGrower(seed=0),
}


def _batch(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    return [(images, torch.randint(0, 10, (size,), generator=generator))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125, help="zoo width multiplier")
    parser.add_argument("--ratio", type=float, default=0.35, help="share of neurons to add")
    parser.add_argument("--batch", type=int, default=8, help="images in the scoring batch")
    parser.add_argument("--models", nargs="*", default=list(NAMES), choices=NAMES)
    parser.add_argument("--why", action="store_true", help="list each skipped layer's reason")
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic, and fast on a loaded machine
    batches = _batch(args.batch)
    start = time.perf_counter()
    print(f"| model | {' | '.join(METHODS)} |")
    print(f"|---|{'---|' * len(METHODS)}")
    reasons: dict[str, dict[str, str]] = {}
    for name in args.models:
        cells = []
        for make in METHODS.values():
            model = build(name, width=args.width, seed=0)
            try:
                check = check_growth(model, make(), batches, F.cross_entropy, ratio=args.ratio)
            except Exception as error:  # noqa: BLE001 - a crash is a table entry, not the end
                cells.append(f"CRASH {type(error).__name__}: {str(error)[:60]}")
                continue
            cells.append(check.cell())
            for layer, why in check.skipped.items():
                reasons.setdefault(name, {}).setdefault(layer, why)
        print(f"| `{name}` | {' | '.join(cells)} |", flush=True)
    if args.why:
        for name, skipped in reasons.items():
            print(f"\n{name}:")
            for layer, why in skipped.items():
                print(f"  {layer}: {why}")
    print(f"\n({len(args.models)} models x {len(METHODS)} methods, width {args.width}, "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
