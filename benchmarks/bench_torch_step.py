"""Overhead of the similarity penalty per training step of the grown VGG16 (CPU, batch 128).

Not a test: prints ratios measured in one run, with the two kinds of steps
interleaved and their medians compared, because absolute times on a shared
machine are noise. The paper reports 1-3% more training time with its method.

1. ``time(step with penalty) / time(step without)`` for a VGG16 grown to about
   0.3M parameters (the size after the paper's four growths, per-layer widths
   below), batch 128, 32x32 inputs, SGD with momentum. The penalty is
   ``SimilarityPenalty(model, lam=...)`` (Eq. 5 over the 13 convs and the
   classifier) added to the cross-entropy.
2. The penalty's value+gradient: our ``autograd.Function`` (the core's analytic
   gradient) against plain autograd through the same formula (the core's
   ``similarity_loss`` traced by torch), for a few layer sizes.

Run: ``python benchmarks/bench_torch_step.py [--reps 15] [--batch 128] [--threads N]
[--clock wall|cpu]`` (on a shared machine: ``--threads 1 --clock cpu``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from simcore.adapters.torch import SimilarityPenalty, similarity_loss, vgg16
from torch import nn

import simcore

# Per-layer widths after four growths of the 16-wide seed (35% of the neurons each time,
# spread unevenly as a global top-k would): about 0.3M parameters.
GROWN_WIDTHS = [32, 40, 48, 48, 56, 56, 56, 64, 64, 56, 56, 48, 48]


def _step(model, optimizer, x, y, penalty):
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    if penalty is not None:
        loss = loss + penalty()
    loss.backward()
    optimizer.step()


def _timed(fn, clock=time.perf_counter):
    start = clock()
    fn()
    return clock() - start


def step_overhead(reps: int, batch: int, clock) -> None:
    torch.manual_seed(0)
    model = vgg16(width=GROWN_WIDTHS)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    penalty = SimilarityPenalty(model, lam=0.1)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(2):  # warm-up (allocator, oneDNN primitives)
        _step(model, optimizer, x, y, None)
        _step(model, optimizer, x, y, penalty)
    plain, with_penalty, alone = [], [], []
    for rep in range(reps):
        order = (None, penalty) if rep % 2 == 0 else (penalty, None)
        for p in order:
            t = _timed(lambda p=p: _step(model, optimizer, x, y, p), clock)
            (plain if p is None else with_penalty).append(t)
        alone.append(_timed(lambda: penalty().backward(), clock))
    base, ours = statistics.median(plain), statistics.median(with_penalty)
    # Each rep times the two steps back to back: the median of the per-rep ratios is
    # robust to load that drifts between reps on a shared machine.
    paired = statistics.median(b / a for a, b in zip(plain, with_penalty, strict=True))
    print(f"VGG16 widths {GROWN_WIDTHS}: {params:,} parameters, batch {batch}, "
          f"{torch.get_num_threads()} threads, {reps} interleaved reps, medians of "
          f"{clock.__name__}")
    print(f"  step without penalty: {base * 1e3:8.1f} ms")
    print(f"  step with penalty:    {ours * 1e3:8.1f} ms")
    print(f"  penalty alone (value + backward over {len(penalty.layer_names)} layers): "
          f"{statistics.median(alone) * 1e3:.2f} ms")
    print(f"  ratio of medians with/without: {ours / base:.4f} "
          f"(overhead {100 * (ours / base - 1):+.2f}%)")
    print(f"  median of paired ratios:       {paired:.4f} (overhead {100 * (paired - 1):+.2f}%)")
    print(f"  penalty alone / step without:  {100 * statistics.median(alone) / base:.2f}%")


def _median_time(fn, reps):
    fn()
    return statistics.median(_timed(fn) for _ in range(reps))


def function_vs_autograd(reps: int) -> None:
    print("similarity loss value + gradient, float32: ours (analytic autograd.Function) vs "
          "plain autograd through the core's formula")
    print(f"  {'n x d':>12} {'ours ms':>9} {'autograd ms':>12} {'autograd/ours':>14} "
          f"{'ours/GEMM':>10}")
    gen = torch.Generator().manual_seed(0)
    for n, d in [(64, 576), (128, 1152), (256, 2304), (512, 4608)]:
        w = torch.randn(n, d, generator=gen)

        def ours(w=w):
            p = w.clone().requires_grad_(True)
            similarity_loss(p).backward()

        def plain(w=w):
            p = w.clone().requires_grad_(True)
            simcore.similarity_loss(p).backward()

        def gemm(w=w):
            w @ w.T

        reps_here = max(5, reps if n <= 256 else reps // 3)
        t_ours, t_plain = _median_time(ours, reps_here), _median_time(plain, reps_here)
        t_gemm = _median_time(gemm, reps_here)
        print(f"  {f'{n} x {d}':>12} {t_ours * 1e3:9.3f} {t_plain * 1e3:12.3f} "
              f"{t_plain / t_ours:14.2f} {t_ours / t_gemm:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: this process's CPU time (time.process_time), which other processes on a "
             "shared machine barely disturb; meaningful with --threads 1",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each row reaches a file or pipe as printed
    print(f"part 1: {args.reps} interleaved pairs of training steps with and without the "
          f"penalty (about 1 s per pair on a 2-core CPU); part 2: one row per layer size")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    step_overhead(args.reps, args.batch, clock)
    function_vs_autograd(args.reps * 2)


if __name__ == "__main__":
    main()
