"""Cost of the similarity loss's value and gradient, as multiples of one GEMM, measured in one run.

Absolute times on shared machines are noise; ratios measured side by side are not. For
each weight shape ``n x d`` (fp32) every contender's value+grad time is divided by one
``n x d x n`` GEMM (``A @ B``, distinct operands: no SYRK shortcut) *of its own library
and device*, timed in the same interleaved loop; the best of ``--repeats`` rounds counts,
and each sample repeats the call for at least ``--min-sample`` seconds. Libraries are timed
one after another, never interleaved with each other (their thread pools would compete).
The floor is about 1.5x: half a GEMM for the Gram matrix by symmetry, one GEMM back. Each
library's ``products`` column measures that floor as the library reaches it: ``w @ w.T``
then ``(n x n) @ w``, plainly (SYRK where the library has one for ``w @ w.T``: NumPy); the
loss cannot cost less than those two products plus its ``n x n`` elementwise work.

Contenders (each where its library is installed and asked for with ``--backends``):

* ``numpy``: ``simcore.similarity_loss_and_grad`` on a NumPy array;
* ``torch``: ``simcore.adapters.torch.similarity_loss(w).backward()`` (what a training
  step runs), and ``torch autograd``: the usual hand-written loss (normalise rows,
  ``U @ U.T``, mean off-diagonal ``|C|``, ``backward``), on the CPU;
* ``torch_cuda``: the same two on the GPU;
* ``jax``: ``jax.jit(jax.value_and_grad(simcore.adapters.jax.similarity_loss))``, and
  ``keras``: ``keras.regularizers.OrthogonalRegularizer(factor=1, mode="rows")`` under the
  JAX backend, jitted the same way. It is the same quantity: Keras returns
  ``factor * 0.5 * sum_{i != j} |C_ij| / (n (n - 1) / 2)``, which is ``factor`` times
  Eq. 2, so its default ``factor=0.01`` gives ``0.01 * mu`` (checked at start; zero rows
  aside, which Keras keeps in ``n``). Skipped with a note when Keras is not installed;
* ``cupy``: ``simcore.adapters.cupy.similarity_loss_and_grad`` with ``method="gemm"`` and
  ``"syrk"`` (the diagonal tiles by cuBLAS SYRK).

Then the peak extra memory of the NumPy path against its ``n x d`` gradient.

Run: ``python benchmarks/bench_similarity.py [--quick] [--json PATH] [--threads N]
[--clock cpu] [--backends numpy,torch,jax] [--shapes 4096x4096,...] [--min-sample S]``.
``--clock cpu`` times process CPU time instead of wall time: on a machine shared with other jobs it
measures the work rather than the waiting (CPU backends only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc

SHAPES = [(256, 1152), (512, 4608), (2048, 2048), (4096, 4096)]
QUICK_SHAPES = [(256, 1152), (1024, 1024)]
CPU_BACKENDS = ("numpy", "torch", "jax")
ALL_BACKENDS = ("numpy", "torch", "torch_cuda", "jax", "cupy")


def _set_threads_before_imports(argv):
    """``--threads N`` must reach OpenBLAS/MKL/OpenMP before NumPy or torch is imported."""
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[index + 1] if arg == "--threads" and index + 1 < len(argv) else None)
        if value is not None:
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[name] = value


_set_threads_before_imports(sys.argv[1:])

import numpy as np  # noqa: E402

import simcore  # noqa: E402


class Contender:
    """One column: ``run()`` computes value and gradient; ``gemm()`` is its ``library``'s GEMM
    (the baseline of every column of that library and device), ``products()`` the two products
    any value+grad needs, done plainly by that library: ``G = w @ w.T``, then ``G @ w``."""

    def __init__(self, name, run, gemm, sync=None, library=None, products=None):
        self.name, self.run, self.gemm, self.products = name, run, gemm, products
        self.sync = sync or (lambda: None)
        self.library = library or name


def _numpy(w, other):
    gram = np.empty((w.shape[0], w.shape[0]), dtype=w.dtype)
    back = np.empty_like(w)

    def gemm():
        return w @ other

    def products():  # NumPy's w @ w.T of one array is SYRK (half a GEMM)
        np.matmul(w, w.T, out=gram)
        np.matmul(gram, w, out=back)

    return [Contender("numpy", lambda: simcore.similarity_loss_and_grad(w), gemm,
                      products=products)]


def _torch(w, other, device):
    import torch
    from simcore.adapters.torch import similarity_loss

    x = torch.from_numpy(w).to(device)
    y = torch.from_numpy(other).to(device)
    param = x.clone().requires_grad_(True)
    gram = torch.empty((x.shape[0], x.shape[0]), dtype=x.dtype, device=device)
    back = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else None
    suffix = "" if device == "cpu" else " cuda"

    def gemm():
        return x @ y

    def products():
        torch.mm(x, x.T, out=gram)
        torch.mm(gram, x, out=back)

    def ours():
        param.grad = None
        similarity_loss(param).backward()

    def autograd():
        param.grad = None
        u = param / torch.linalg.vector_norm(param, dim=1, keepdim=True)
        c = u @ u.T
        n = c.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=c.device)
        (c.abs()[off_diagonal].sum() / (n * (n - 1))).backward()

    library = f"torch{suffix}"
    return [Contender(library, ours, gemm, sync, products=products),
            Contender(f"torch autograd{suffix}", autograd, gemm, sync, library)]


def _keras_regularizer():
    """``keras.regularizers.OrthogonalRegularizer(factor=1, mode="rows")``, or a reason why not."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return None, "keras is not installed (pip install keras): its column is skipped"
    if keras.backend.backend() != "jax":
        return None, f"keras runs on {keras.backend.backend()!r}, not JAX: its column is skipped"
    return keras.regularizers.OrthogonalRegularizer(factor=1.0, mode="rows"), None


def _jax(w, other, regularizer):
    import jax
    import jax.numpy as jnp
    from simcore.adapters.jax import similarity_loss

    x, y = jnp.asarray(w), jnp.asarray(other)
    gemm_jit = jax.jit(lambda a, b: a @ b)
    products_jit = jax.jit(lambda a: (a @ a.T) @ a)
    ours_jit = jax.jit(jax.value_and_grad(similarity_loss))

    def gemm():
        return gemm_jit(x, y).block_until_ready()

    contenders = [Contender("jax", lambda: jax.block_until_ready(ours_jit(x)), gemm,
                            products=lambda: products_jit(x).block_until_ready())]
    if regularizer is not None:
        keras_jit = jax.jit(jax.value_and_grad(regularizer))
        contenders.append(Contender("keras (jax)", lambda: jax.block_until_ready(keras_jit(x)),
                                    gemm, library="jax"))
    return contenders


def _cupy(w, other):
    import cupy
    from simcore.adapters.cupy import similarity_loss_and_grad

    x, y = cupy.asarray(w), cupy.asarray(other)
    sync = cupy.cuda.get_current_stream().synchronize
    return [Contender(f"cupy {method}", lambda method=method: similarity_loss_and_grad(
        x, method=method), lambda: x @ y, sync, "cupy",
        products=(lambda: (x @ x.T) @ x) if method == "gemm" else None)
        for method in ("gemm", "syrk")]


def contenders_for(backends, w, other, regularizer):
    columns = []
    for backend in backends:
        if backend == "numpy":
            columns += _numpy(w, other)
        elif backend == "torch":
            columns += _torch(w, other, "cpu")
        elif backend == "torch_cuda":
            columns += _torch(w, other, "cuda")
        elif backend == "jax":
            columns += _jax(w, other, regularizer)
        elif backend == "cupy":
            columns += _cupy(w, other)
    return columns


def _timer(clock):
    return time.process_time if clock == "cpu" else time.perf_counter


def _timed(fn, sync, clock, number=1):
    """Seconds per call of ``number`` calls in a row."""
    timer = _timer(clock)
    sync()
    start = timer()
    for _ in range(number):
        fn()
    sync()
    return (timer() - start) / number


def _calls_per_sample(fn, sync, min_sample):
    """How many calls make one sample last ``min_sample`` seconds (wall clock): a single
    call of a small shape lasts a millisecond, where one thread wake-up or timer tick is a
    large part of it."""
    once = _timed(fn, sync, "wall")
    return max(1, min(1000, int(min_sample / max(once, 1e-9)) + 1))


def time_shapes(shapes, repeats, backends=("numpy", "torch"), clock="wall", regularizer=None,
                min_sample=0.05):
    """Yield ``((n, d), {library: GEMM ms}, {column: ratio}, {library: ratio of its two plain
    products})`` per shape, as soon as it is measured.

    Each ratio is a best time over its own library's best GEMM time. One library at a time:
    two libraries interleaved fight over the cores (OpenBLAS's threads spin on after a call,
    while torch's OpenMP threads want the same cores), which says nothing about either. Within
    a library, its GEMM, its plain products and its contenders run interleaved, so drifting
    machine load hits all alike; each sample is as many calls as last ``min_sample`` seconds.
    """
    rng = np.random.default_rng(0)
    for n, d in shapes:
        w = rng.standard_normal((n, d), dtype=np.float32)
        other = rng.standard_normal((d, n), dtype=np.float32)
        columns = contenders_for(backends, w, other, regularizer)
        libraries = {}
        for column in columns:
            libraries.setdefault(column.library, []).append(column)
        gemm_ms, ratios, products = {}, {}, {}
        for library, group in libraries.items():
            first = group[0]
            entries = {"GEMM": (first.gemm, first.sync)}
            if first.products is not None:
                entries["products"] = (first.products, first.sync)
            entries.update((column.name, (column.run, column.sync)) for column in group)
            for fn, sync in entries.values():  # warm-up: threads, allocators, jit, workspaces
                fn()
                sync()
            numbers = {name: _calls_per_sample(fn, sync, min_sample)
                       for name, (fn, sync) in entries.items()}
            best = dict.fromkeys(entries, float("inf"))
            for _ in range(repeats):
                for name, (fn, sync) in entries.items():
                    best[name] = min(best[name], _timed(fn, sync, clock, numbers[name]))
            gemm_ms[library] = best["GEMM"] * 1e3
            ratios.update((column.name, best[column.name] / best["GEMM"]) for column in group)
            if "products" in best:
                products[library] = best["products"] / best["GEMM"]
            del entries
            gc.collect()
        yield (n, d), gemm_ms, ratios, products
        del columns, libraries
        gc.collect()


def keras_factor_check(regularizer):
    """Keras's value over Eq. 2 on a random layer (should be its ``factor``, here 1)."""
    import jax.numpy as jnp

    w = np.random.default_rng(2).standard_normal((64, 27)).astype(np.float32)
    ours = float(simcore.similarity_loss(w))
    theirs = float(regularizer(jnp.asarray(w)))
    return {"keras": theirs, "simcore": ours, "ratio": theirs / ours}


def block_memory(n, d, block_size):
    """Peak bytes NumPy allocates in a repeated call (warm workspace), beyond the input."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, d), dtype=np.float32)
    simcore.similarity_loss_and_grad(w, block_size=block_size)
    gc.collect()
    tracemalloc.start()
    simcore.similarity_loss_and_grad(w, block_size=block_size)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def expected_seconds(shapes, repeats, entries, min_sample):
    """A rough duration from this machine's GEMM speed (a 1024^3 GEMM, extrapolated).

    ``entries`` counts what is timed per shape (GEMMs, plain products, contenders); each
    costs about two GEMMs a call (the loss's 1.5-2 GEMMs, autograd's more, the GEMM one) but
    at least ``min_sample`` a sample, over ``repeats`` rounds plus warm-up and calibration."""
    a = np.ones((1024, 1024), dtype=np.float32)
    best = float("inf")
    for _ in range(3):  # the best of a few: one sample can land on a load spike
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    rate = 2 * 1024**3 / max(best, 1e-6)
    per_sample = [max(2 * (2 * n * n * d / rate), min_sample) for n, d in shapes]
    return sum(per_sample) * (repeats + 2) * entries + 3 * entries


def _available(backend):
    try:
        if backend == "numpy":
            return True
        if backend in ("torch", "torch_cuda"):
            import torch

            return backend == "torch" or torch.cuda.is_available()
        if backend == "jax":
            import jax  # noqa: F401

            return True
        if backend == "cupy":
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any import or driver failure means "not here"
        return False
    return False


def _shape(text):
    n, d = text.lower().split("x")
    return int(n), int(d)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", help="comma list of NxD (default: the four of the README)")
    parser.add_argument("--backends", default=",".join(CPU_BACKENDS),
                        help=f"comma list of {', '.join(ALL_BACKENDS)} (missing ones are skipped)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, help="BLAS/OpenMP threads (default: the library's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--min-sample", type=float, default=0.05, metavar="SECONDS",
                        help="repeat a call within one sample until it lasts this long")
    args = parser.parse_args(argv)
    if args.threads:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    shapes = ([_shape(s) for s in args.shapes.split(",")] if args.shapes
              else QUICK_SHAPES if args.quick else SHAPES)
    asked = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(asked) - set(ALL_BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; expected some of {list(ALL_BACKENDS)}")
    backends = [b for b in asked if _available(b)]
    notes = [f"{b} is not available here: skipped" for b in asked if b not in backends]
    regularizer = None
    if "jax" in backends:
        regularizer, note = _keras_regularizer()
        if note:
            notes.append(note)
    results = {"shapes": [], "notes": notes, "clock": args.clock, "repeats": args.repeats,
               "min_sample": args.min_sample,
               "threads": args.threads, "backends": backends, "machine": {
                   "platform": platform.platform(), "python": platform.python_version(),
                   "cpus": os.cpu_count(), "numpy": np.__version__}}
    for note in notes:
        print(f"note: {note}", flush=True)
    if regularizer is not None:
        check = keras_factor_check(regularizer)
        results["keras_factor_check"] = check
        print(f"keras OrthogonalRegularizer(factor=1, mode='rows') / simcore loss = "
              f"{check['ratio']:.6f} (Keras's value is factor * Eq. 2; default factor 0.01)",
              flush=True)

    per_library = {"numpy": 2, "torch": 3, "torch_cuda": 3, "jax": 3, "cupy": 3}
    entries = sum(per_library[b] + (b == "jax" and regularizer is not None) for b in backends)
    estimate = expected_seconds(shapes, args.repeats, max(entries, 1), args.min_sample)
    print(f"timing {len(shapes)} shapes x {len(backends)} backends, one library at a time, "
          f"{args.repeats} interleaved rounds each (best round counts, {args.clock} clock, each "
          f"sample at least {args.min_sample * 1e3:.0f} ms of calls); expected to take about "
          f"{estimate:.0f} s here (from this machine's GEMM speed). Each row prints as it is "
          f"measured.", flush=True)
    print("value+grad time / one n x d x n GEMM of the same library and device (fp32); "
          "'<library> products': w @ w.T then (n x n) @ w, the two products any value+grad "
          "needs, as that library does them plainly (NumPy's w @ w.T is SYRK)", flush=True)
    started = time.perf_counter()
    for index, ((n, d), gemm_ms, ratios, products) in enumerate(
            time_shapes(shapes, args.repeats, backends, args.clock, regularizer,
                        args.min_sample)):
        cells = {**ratios, **{f"{library} products": ratio for library, ratio in products.items()}}
        widths = [max(15, len(name)) for name in cells]
        if index == 0:
            print(f"{'n x d':>12} {'GEMM ms':>9} " + " ".join(
                f"{name:>{width}}" for name, width in zip(cells, widths, strict=True)))
        first_gemm = next(iter(gemm_ms.values()))
        values = zip(cells.values(), widths, strict=True)
        print(f"{f'{n} x {d}':>12} {first_gemm:>9.2f} " + " ".join(
            f"{ratio:>{width - 1}.2f}x" for ratio, width in values), flush=True)
        results["shapes"].append({"n": n, "d": d, "gemm_ms": gemm_ms, "ratios": ratios,
                                  "products": products})
    results["seconds"] = time.perf_counter() - started
    if results["shapes"]:
        print(f"(GEMM ms: one {next(iter(results['shapes'][0]['gemm_ms']))} GEMM, {args.clock} "
              f"clock; timing took {results['seconds']:.0f} s)", flush=True)

    if not args.no_memory and "numpy" in backends:
        n, d = (4096, 64) if args.quick else (16384, 256)
        block_size = 256
        peak = block_memory(n, d, block_size)
        gradient = n * d * 4
        results["memory"] = {"n": n, "d": d, "block_size": block_size, "peak_bytes": peak}
        print()
        print(f"NumPy path, n={n}, d={d}, block_size={block_size}, fp32, a repeated call:")
        print(f"  peak extra memory {peak / 2**20:.1f} MiB = {peak / gradient:.2f} x the n x d "
              f"gradient it returns (a full n x n map would be {n * n * 4 / 2**20:.0f} MiB)",
              flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
        print(f"wrote {args.json}", flush=True)
    return results


if __name__ == "__main__":
    main()
