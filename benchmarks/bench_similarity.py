"""Cost of the similarity loss and its gradient, as multiples of one GEMM, measured in one run.

Absolute times on shared machines are noise; ratios measured side by side are
not. For each weight shape ``n x d`` (fp32) this prints the time of

* one ``n x d x n`` GEMM (``A @ B`` with distinct operands: no SYRK shortcut),
* ``simcore.similarity_loss_and_grad`` on NumPy and on torch CPU tensors,
* a hand-written torch autograd loss (normalise, ``U @ U.T``, mean off-diagonal
  ``|C|``, ``backward``), the usual way people write it,

each as a multiple of the GEMM (median of interleaved repetitions), then the
peak extra memory of the row-block path at ``n = 16384`` against
``block_size * n`` floats.

Run: ``python benchmarks/bench_similarity.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy as np

import simcore

SHAPES = [(512, 4608), (2048, 2048), (4096, 4096)]
QUICK_SHAPES = [(256, 1152), (1024, 1024)]


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torch_contenders(w_np):
    try:
        import torch
    except ImportError:
        return {}
    w = torch.from_numpy(w_np)

    def core_torch():
        simcore.similarity_loss_and_grad(w)

    def autograd_torch():
        x = w.detach().requires_grad_(True)
        u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        c = u @ u.T
        n = c.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        loss = c.abs()[off_diagonal].sum() / (n * (n - 1))
        loss.backward()

    return {"simcore torch": core_torch, "torch autograd": autograd_torch}


def time_shapes(shapes, repeats):
    """Yield ``((n, d), gemm seconds, {contender: time / gemm})`` per shape, as measured."""
    rng = np.random.default_rng(0)
    for n, d in shapes:
        w = rng.standard_normal((n, d), dtype=np.float32)
        other = rng.standard_normal((d, n), dtype=np.float32)
        contenders = {
            "gemm": lambda w=w, other=other: w @ other,
            "simcore numpy": lambda w=w: simcore.similarity_loss_and_grad(w),
            **_torch_contenders(w),
        }
        for fn in contenders.values():  # warm-up: threads, allocator, torch dispatch
            fn()
        samples = {name: [] for name in contenders}
        for _ in range(repeats):  # interleaved, so drifting machine load hits all alike
            for name, fn in contenders.items():
                samples[name].append(_median_time(fn, 1))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        gemm = medians.pop("gemm")
        yield (n, d), gemm, {name: t / gemm for name, t in medians.items()}


def block_memory(n, d, block_size):
    """Peak bytes NumPy allocates inside the call, beyond the input itself."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, d), dtype=np.float32)
    gc.collect()
    tracemalloc.start()
    simcore.similarity_loss_and_grad(w, block_size=block_size)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"timing {len(shapes)} shapes, {args.repeats} interleaved repetitions each, then the "
          f"block path's memory; each row prints as it is measured (the full run took 331 s "
          f"on a busy 2-core CPU, --quick a few seconds)", flush=True)

    print("value+grad time / one n x d x n GEMM (fp32, median of interleaved runs; the "
          "GEMM ms column is one GEMM's wall time)", flush=True)
    for index, ((n, d), gemm, ratios) in enumerate(time_shapes(shapes, args.repeats)):
        if index == 0:
            print(f"{'n x d':>12} {'GEMM ms':>9} " + " ".join(f"{name:>15}" for name in ratios))
        cells = " ".join(f"{ratio:>14.2f}x" for ratio in ratios.values())
        print(f"{f'{n} x {d}':>12} {gemm * 1e3:>9.1f} {cells}", flush=True)

    n, d = (4096, 64) if args.quick else (16384, 256)
    block_size = 256
    peak = block_memory(n, d, block_size)
    unit = block_size * n * 4
    inputs = n * d * 4
    print()
    print(f"block path, n={n}, d={d}, block_size={block_size}, fp32:")
    print(f"  peak extra memory {peak / 2**20:.1f} MiB = {peak / unit:.2f} x block_size*n floats")
    print(f"  (the input is {inputs / 2**20:.1f} MiB; a full n x n map would be "
          f"{n * n * 4 / 2**20:.0f} MiB = {n / block_size:.0f} x block_size*n floats)")


if __name__ == "__main__":
    main()
