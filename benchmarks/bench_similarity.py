"""Cost of the similarity loss's value and gradient, as multiples of one GEMM, measured in one run.

Absolute times on shared machines are noise; ratios measured side by side are not. For
each weight shape ``n x d`` (fp32) every contender's value+grad time is divided by one
``n x d x n`` GEMM (``A @ B``, distinct operands: no SYRK shortcut) *of its own library
and device*, timed in the same interleaved loop; the best of ``--repeats`` rounds counts.
The floor is about 1.5x: half a GEMM for the Gram matrix by symmetry, one GEMM back.

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
[--clock cpu] [--backends numpy,torch,jax] [--shapes 4096x4096,...]``. ``--clock cpu``
times process CPU time instead of wall time: on a machine shared with other jobs it
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
    (the baseline of every column of that library and device)."""

    def __init__(self, name, run, gemm, sync=None, library=None):
        self.name, self.run, self.gemm = name, run, gemm
        self.sync = sync or (lambda: None)
        self.library = library or name


def _numpy(w, other):
    def gemm():
        return w @ other

    return [Contender("numpy", lambda: simcore.similarity_loss_and_grad(w), gemm)]


def _torch(w, other, device):
    import torch
    from simcore.adapters.torch import similarity_loss

    x = torch.from_numpy(w).to(device)
    y = torch.from_numpy(other).to(device)
    param = x.clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else None
    suffix = "" if device == "cpu" else " cuda"

    def gemm():
        return x @ y

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
    return [Contender(library, ours, gemm, sync),
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
    ours_jit = jax.jit(jax.value_and_grad(similarity_loss))

    def gemm():
        return gemm_jit(x, y).block_until_ready()

    contenders = [Contender("jax", lambda: jax.block_until_ready(ours_jit(x)), gemm)]
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
        x, method=method), lambda: x @ y, sync, "cupy") for method in ("gemm", "syrk")]


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


def _timed(fn, sync, clock):
    timer = _timer(clock)
    sync()
    start = timer()
    fn()
    sync()
    return timer() - start


def time_shapes(shapes, repeats, backends=("numpy", "torch"), clock="wall", regularizer=None):
    """Yield ``((n, d), {column: numpy GEMM ms or ratio})`` per shape, as soon as it is measured.

    Each column's ratio is its best time over its own library's best GEMM time; GEMMs and
    contenders run interleaved, so drifting machine load hits all alike.
    """
    rng = np.random.default_rng(0)
    for n, d in shapes:
        w = rng.standard_normal((n, d), dtype=np.float32)
        other = rng.standard_normal((d, n), dtype=np.float32)
        columns = contenders_for(backends, w, other, regularizer)
        gemms = {}  # one baseline per library and device
        for column in columns:
            gemms.setdefault(column.library, (column.gemm, column.sync))
        for column in columns:  # warm-up: threads, allocators, jit compilation, workspaces
            column.run()
            column.gemm()
            column.sync()
        best = {name: float("inf") for name in [*(f"{g} GEMM" for g in gemms),
                                                 *(c.name for c in columns)]}
        for _ in range(repeats):
            for library, (gemm, sync) in gemms.items():
                key = f"{library} GEMM"
                best[key] = min(best[key], _timed(gemm, sync, clock))
            for column in columns:
                best[column.name] = min(best[column.name], _timed(column.run, column.sync, clock))
        ratios = {c.name: best[c.name] / best[f"{c.library} GEMM"] for c in columns}
        yield (n, d), {library: best[f"{library} GEMM"] * 1e3 for library in gemms}, ratios
        del columns
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


def expected_seconds(shapes, repeats, column_count):
    """A rough duration from this machine's GEMM speed (a 1024^3 GEMM, extrapolated)."""
    a = np.ones((1024, 1024), dtype=np.float32)
    best = float("inf")
    for _ in range(3):  # the best of a few: one sample can land on a load spike
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    rate = 2 * 1024**3 / max(best, 1e-6)
    gemm_seconds = sum(2 * n * n * d / rate for n, d in shapes)
    # each round: one GEMM per library and ~2 GEMMs per column (calibrated on a busy 2-core
    # machine, where big GEMMs run nearer peak than the probe), warm-up round included
    return gemm_seconds * (repeats + 1) * (1 + 2 * column_count) + 5 * column_count


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

    column_count = sum(len(c) for c in ([1] if "numpy" in backends else [],
                                        [1, 1] if "torch" in backends else [],
                                        [1, 1] if "jax" in backends else []))
    estimate = expected_seconds(shapes, args.repeats, max(column_count, 1))
    print(f"timing {len(shapes)} shapes x {len(backends)} backends, {args.repeats} interleaved "
          f"rounds each (best round counts, {args.clock} clock); expected to take about "
          f"{estimate:.0f} s here (from this machine's GEMM speed; the default run took 320 s on "
          f"a busy 2-core CPU, --quick seconds). Each row prints as it is measured.", flush=True)
    print("value+grad time / one n x d x n GEMM of the same library and device (fp32)",
          flush=True)
    started = time.perf_counter()
    for index, ((n, d), gemm_ms, ratios) in enumerate(
            time_shapes(shapes, args.repeats, backends, args.clock, regularizer)):
        if index == 0:
            print(f"{'n x d':>12} {'GEMM ms':>9} " + " ".join(f"{name:>15}" for name in ratios))
        first_gemm = next(iter(gemm_ms.values()))
        cells = " ".join(f"{ratio:>14.2f}x" for ratio in ratios.values())
        print(f"{f'{n} x {d}':>12} {first_gemm:>9.1f} {cells}", flush=True)
        results["shapes"].append({"n": n, "d": d, "gemm_ms": gemm_ms, "ratios": ratios})
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
