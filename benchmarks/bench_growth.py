"""What a growth costs: SSD (exact, fast) and Firefly on the seeds, and SSD's width curve.

Two parts, each row printed as soon as it is measured:

1. **Seeds** (``simcore grow``'s quick preset: 32x32 inputs, batch 64, 17 batches an epoch, one
   torch thread): VGG16 and MobileNetV1 at the widths of their first, second and third growth
   (the seed grown by Random at ratio 0.35 before each), one growth's time divided by one
   training epoch's time measured in the same process just before it.
2. **Width curve**: one 3x3 conv of ``w`` -> ``w`` channels on a 4x4 map (batch 64: 1024
   rows), SSD exact vs fast growing that layer alone, seconds per growth as ``w`` grows; exact
   stops where its matrices would pass ``--exact-max-bytes`` (it refuses with a GrowthError
   there) or its predicted time passes ``--exact-budget``; fast mode also with the defaults it
   had before (30 power + 200 Rayleigh steps).

Each time is the minimum of ``--repeats`` runs. Expect about 3-6 minutes on 2 idle CPU cores
(more on a loaded machine). Writes ``--out`` (JSON). Usage::

    python benchmarks/bench_growth.py [--quick] [--out bench_growth.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from simcore.adapters.torch import FireflyGrower, RandomGrower, SSDGrower
from simcore.adapters.torch.models import mobilenet_v1, vgg16
from torch import nn

from simcore.growth import GrowthError
from simcore.growth.ssd_grower import exact_bytes

BATCH, STEPS_PER_EPOCH, CLASSES = 64, 17, 10


def _data(seed: int, shape=(BATCH, 3, 32, 32)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen), torch.randint(0, CLASSES, (shape[0],),
                                                             generator=gen)


def _epoch_seconds(model: nn.Module, x, y) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    started = time.perf_counter()
    for _ in range(STEPS_PER_EPOCH):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - started


def _growth_seconds(model: nn.Module, grower_factory, batch, **kwargs) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    started = time.perf_counter()
    grower_factory().grow(model, [batch], F.cross_entropy, optimizer, **kwargs)
    return time.perf_counter() - started


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


METHODS = {
    "ssd_exact": lambda: SSDGrower("exact", seed=0),
    "ssd_fast": lambda: SSDGrower("fast", seed=0),
    "firefly": lambda: FireflyGrower(seed=0, new_per_layer=16),  # the quick preset's candidates
}


def seeds(repeats: int, growths: int, say) -> list[dict]:
    rows = []
    for name, build in (("vgg16", vgg16), ("mobilenet_v1", mobilenet_v1)):
        torch.manual_seed(0)
        model = build(num_classes=CLASSES)
        x, y = _data(0)
        for growth in range(1, growths + 1):
            epoch = min(_epoch_seconds(_copy(model), x, y) for _ in range(repeats))
            row = {"model": name, "growth": growth, "parameters": sum(
                p.numel() for p in model.parameters()), "epoch_seconds": epoch}
            for method, make in METHODS.items():
                seconds = min(_growth_seconds(_copy(model), make, (x, y))
                              for _ in range(repeats))
                row[f"{method}_seconds"] = seconds
                row[f"{method}_epochs"] = seconds / epoch
            rows.append(row)
            say(f"{name:13s} growth {growth}  {row['parameters']:7d} params  epoch "
                f"{epoch:6.2f} s  " + "  ".join(
                    f"{m} {row[m + '_seconds']:6.2f} s = {row[m + '_epochs']:4.2f} ep"
                    for m in METHODS))
            RandomGrower(seed=growth).grow(model, None, None, ratio=0.35)
    return rows


def _one_layer(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES))


def width_curve(widths, repeats: int, exact_budget: float, exact_max_bytes: int,
                say) -> list[dict]:
    rows = []
    batch = _data(1, (BATCH, 3, 4, 4))
    exact_per_flop = None  # seconds per predicted flop of the last exact growth measured
    for width in widths:
        row: dict = {"width": width, "fan_in": 9 * width}
        n, d, m = width, 9 * width, BATCH * 16
        exact_flops = 2.0 * n * m * d * d + 3.0 * n * d**3
        for mode in ("exact", "fast", "fast_before"):
            key = f"{mode}_seconds"
            too_long = exact_per_flop is not None and exact_per_flop * exact_flops > exact_budget
            # over its memory limit exact mode refuses at once (shown); else a long one is skipped
            if mode == "exact" and too_long and exact_bytes(n, d, 4) <= exact_max_bytes:
                row[key], row["exact_note"] = None, f"predicted over {exact_budget:.0f} s"
                continue
            # fast_before: the defaults before the growth-cost work (30 power + 200 steps)
            steps = dict(power_steps=30, rayleigh_steps=200) if mode == "fast_before" else {}
            try:
                seconds = min(_growth_seconds(
                    _one_layer(width), lambda mode=mode, steps=steps: SSDGrower(
                        mode.split("_")[0], seed=0, exact_max_bytes=exact_max_bytes, **steps),
                    batch, layers=["2"]) for _ in range(repeats))
            except GrowthError as err:
                row[key], row[f"{mode}_note"] = None, str(err)
                continue
            row[key] = seconds
            if mode == "exact":
                exact_per_flop = seconds / exact_flops
        rows.append(row)

        def show(value, note=""):
            if value is None:
                return "      skipped" if note.startswith("predicted") else "      refused"
            return f"{value:11.2f} s"

        exact = show(row["exact_seconds"], row.get("exact_note", ""))
        say(f"width {width:4d} (fan-in {9 * width:5d})  exact {exact}  "
            f"fast {show(row['fast_seconds'])}  fast (30 + 200 steps) "
            f"{show(row['fast_before_seconds'])}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, two growths, widths up to 256 (about 2 minutes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exact-budget", type=float, default=60.0,
                        help="skip exact widths predicted to take longer (seconds)")
    parser.add_argument("--exact-max-bytes", type=int, default=2 * 2**30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_growth.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    growths = 2 if args.quick else 3
    widths = [16, 32, 64, 128, 256] + ([] if args.quick else [512])

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"bench_growth: expect about {2 if args.quick else 5} minutes on 2 idle CPU cores; "
        f"torch {torch.__version__}, {args.threads} thread(s)")
    say("seeds: one growth / one epoch (17 steps of batch 64), same process")
    seed_rows = seeds(repeats, growths, say)
    say("width curve: SSD growth of one w -> w 3x3 conv, 1024 rows (batch 64, 4x4)")
    curve = width_curve(widths, repeats, args.exact_budget, args.exact_max_bytes, say)
    faster = [r["width"] for r in curve if r["fast_seconds"] is not None and (
        r["exact_seconds"] is None or r["fast_seconds"] < r["exact_seconds"])]
    say(f"fast is faster than exact from width {faster[0] if faster else '-'} on")
    result = {"machine": platform.platform(), "python": sys.version.split()[0],
              "torch": torch.__version__, "threads": args.threads, "repeats": repeats,
              "seeds": seed_rows, "width_curve": curve,
              "fast_faster_from_width": faster[0] if faster else None}
    Path(args.out).write_text(json.dumps(result, indent=2))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
