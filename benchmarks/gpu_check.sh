#!/usr/bin/env bash
# The GPU check of simcore in one script (README, 'Performance'): about 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR] # the same steps on CPU, tiny sizes
#
# OUT_DIR defaults to $OUT, else ./gpu-check. Nothing is downloaded: the project is installed
# without dependencies (pip --no-deps --no-build-isolation -e .; PYTHONPATH as a fallback)
# into whatever Python runs the script ($PYTHON, default python3), which must already have
# CUDA torch, cupy, JAX with CUDA, hypothesis and pytest. Steps, each under `timeout`:
#   1. install   the project, without dependencies
#   2. devices   versions and the devices torch, CuPy and JAX see
#   3. tests     the CuPy adapter's tests and the core's conformance tests on cupy, torch_cuda
#                and jax (SIMCORE_TEST_BACKENDS; a named backend that is missing fails)
#   4. bench     benchmarks/bench_similarity.py on cupy (GEMM and SYRK diagonal tiles),
#                CUDA torch and JAX: value+grad / one cuBLAS GEMM (target <= 1.3x at 4096^2)
#   5. grow      a short `simcore grow --device cuda` (one seed, one growth, two epochs)
# Every step runs even when an earlier one failed; the summary (summary.json, summary.md,
# written by benchmarks/gpu_check_summary.py) records each step's exit status, time and log
# tail, the benchmark table and the target. --dry-run skips what needs CUDA with the reason.
set -u

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu-check}}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
cd "$ROOT" || exit 2

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, log to NAME.log, record the result.
step() {
    local name="$1" limit="$2"
    shift 2
    local started rc milliseconds
    started=$(date +%s%N)
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    milliseconds=$(( ($(date +%s%N) - started) / 1000000 ))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$milliseconds" "$*" >> "$STEPS"
    tail -n 3 "$OUT_DIR/$name.log"
    echo "   -> exit $rc in ${milliseconds} ms"
}

# skip NAME REASON: record a step that cannot run here.
skip() {
    printf '%s\t%s\t0\t%s\n' "$1" "skipped" "$2" >> "$STEPS"
    echo "== $1 skipped: $2"
}

if [ "$DRY_RUN" = 1 ]; then
    skip install "dry run: the caller's environment is left as it is"
else
    step install 90 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi
# adapters/ and reference/ install as simcore.adapters and simcore.reference; where simcore is
# not importable that way (no install), a folder of links gives Python the same names.
if ! "$PYTHON" -c "import simcore.adapters, simcore.reference" 2>/dev/null; then
    LINKS="$(mktemp -d)"
    trap 'rm -rf "$LINKS"' EXIT
    "$PYTHON" "$ROOT/benchmarks/gpu_check_summary.py" --link-tree "$LINKS"
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    echo "== simcore imported through links in $LINKS (PYTHONPATH)"
fi

step devices 60 "$PYTHON" "$ROOT/benchmarks/gpu_check_summary.py" --devices \
    "$OUT_DIR/devices.json"

if [ "$DRY_RUN" = 1 ]; then
    skip tests-gpu "dry run: cupy, torch_cuda and jax-on-GPU need a CUDA device"
    step tests 150 env SIMCORE_TEST_BACKENDS=numpy "$PYTHON" -m pytest -q -x -p no:cacheprovider \
        tests/test_adapter_cupy.py tests/test_core_reference.py
    skip bench-gpu "dry run: cupy, CUDA torch and JAX-on-GPU need a CUDA device"
    step bench 120 "$PYTHON" benchmarks/bench_similarity.py --backends numpy,torch \
        --shapes 64x32,128x64 --repeats 2 --no-memory --json "$OUT_DIR/bench.json"
    skip grow-cuda "dry run: simcore grow --device cuda needs a CUDA device; ran on cpu"
    step grow 150 "$PYTHON" -m simcore grow --device cpu --method random --similarity on \
        --seeds 0 --epochs 2 --max-growths 1 --grow-every 1 --train-limit 256 \
        --test-limit 128 --no-figures --quiet --fresh --out "$OUT_DIR/grow"
else
    step tests 170 env SIMCORE_TEST_BACKENDS=cupy,torch_cuda,jax "$PYTHON" -m pytest -q \
        -p no:cacheprovider tests/test_adapter_cupy.py tests/test_core_reference.py \
        tests/test_core_extremes.py
    step bench 120 "$PYTHON" benchmarks/bench_similarity.py --backends cupy,torch_cuda,jax \
        --shapes 1024x1024,4096x4096,8192x4096 --repeats 10 --no-memory \
        --json "$OUT_DIR/bench.json"
    step grow 90 "$PYTHON" -m simcore grow --device cuda --method ssd --similarity on \
        --seeds 0 --epochs 2 --max-growths 1 --grow-every 1 --no-figures --quiet --fresh \
        --out "$OUT_DIR/grow"
fi

"$PYTHON" "$ROOT/benchmarks/gpu_check_summary.py" --summarize "$OUT_DIR" \
    $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
