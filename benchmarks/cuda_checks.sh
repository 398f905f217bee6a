#!/usr/bin/env bash
# The CUDA checks as one command: the GPU-marked tests, the W4A16 linear rows of benchmarks/gpu.py
# (--quant-only), then benchmarks/gpu.py one shape at a time, each part under its own time limit so that a
# hang or a crash in one still leaves the others' results.
#
#   bash benchmarks/cuda_checks.sh [OUTDIR]        # logs and JSON land in OUTDIR (default: $OUT or /tmp)
#
# Knobs (environment): TEST_LIMIT (s, 200), QUANT_LIMIT (s, 120), BENCH_LIMIT (s per shape, 150), SHAPES
# (space-separated, "tinyllama-1.1b llama-3-8b"), BENCH_ARGS (extra gpu.py arguments for the shapes). Runs
# from a source checkout: src/ goes on PYTHONPATH, nothing is installed.
set -u
out=${1:-${OUT:-/tmp/asyncllm-cuda-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt"

timeout "${TEST_LIMIT:-200}" python3 -m pytest -m cuda -q -p no:cacheprovider --tb=short -rfEs \
  --continue-on-collection-errors tests/kernels tests/core/test_runner_graphs.py >"$out/pytest.log" 2>&1
echo "pytest -m cuda: exit $? after $(( $(date +%s) - started )) s"
grep -E "^(FAILED|ERROR)|passed|failed|error" "$out/pytest.log" | tail -30

t0=$(date +%s)
timeout "${QUANT_LIMIT:-120}" python3 benchmarks/gpu.py --quant-only --json "$out/gpu-quant.json" \
  >"$out/bench-quant.log" 2>&1
echo "gpu.py --quant-only: exit $? after $(( $(date +%s) - t0 )) s"
grep -vE "^\s*$" "$out/bench-quant.log" | tail -15

for shape in ${SHAPES:-tinyllama-1.1b llama-3-8b}; do
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_LIMIT:-150}" python3 benchmarks/gpu.py --models "$shape" --json "$out/gpu-$shape.json" \
    ${BENCH_ARGS:-} >"$out/bench-$shape.log" 2>&1
  echo "gpu.py $shape: exit $? after $(( $(date +%s) - t0 )) s"
  grep -vE "^\s*$" "$out/bench-$shape.log" | tail -25
done
echo "total $(( $(date +%s) - started )) s"
