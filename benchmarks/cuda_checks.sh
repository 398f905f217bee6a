#!/usr/bin/env bash
# The CUDA checks as one command: the GPU-marked tests, the W4A16 linear rows of benchmarks/gpu.py
# (--quant-only), its W4A16 model rows (--w4a16-only, one shape at a time), then benchmarks/gpu.py one shape
# at a time, each part under its own time limit so that a hang or a crash in one still leaves the others'
# results, and last one tensor-parallel rank's step time (benchmarks/tp_step.py). The default limits fit one
# 600 s device call with little room for start-up: 150 + 90 + 150 + 150 + 60 = 600 s (one model shape:
# Llama-3-8B); lower BENCH_LIMIT or set a shape list to "" to skip a part where the window is shorter, or add
# SHAPES="tinyllama-1.1b llama-3-8b" where a longer window allows.
#
#   bash benchmarks/cuda_checks.sh [OUTDIR]        # logs and JSON land in OUTDIR (default: $OUT or /tmp)
#
# Knobs (environment): TEST_LIMIT (s, 150), QUANT_LIMIT (s, 90), W4A16_LIMIT (s per shape, 150),
# W4A16_SHAPES (space-separated, "llama-3-8b"), BENCH_LIMIT (s per shape, 150), SHAPES (space-separated,
# "llama-3-8b"), BENCH_ARGS (extra gpu.py arguments for the shapes), TP_LIMIT (s per shape, 60), TP_SHAPES
# (tp_step.py presets, "llama-8b"). Runs from a source
# checkout: src/ goes on PYTHONPATH, nothing is installed.
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

timeout "${TEST_LIMIT:-150}" python3 -m pytest -m cuda -q -p no:cacheprovider --tb=short -rfEs \
  --continue-on-collection-errors tests/kernels tests/core/test_runner_graphs.py tests/quant/test_rtn.py \
  >"$out/pytest.log" 2>&1
echo "pytest -m cuda: exit $? after $(( $(date +%s) - started )) s"
grep -E "^(FAILED|ERROR)|passed|failed|error" "$out/pytest.log" | tail -30

t0=$(date +%s)
timeout "${QUANT_LIMIT:-90}" python3 benchmarks/gpu.py --quant-only --json "$out/gpu-quant.json" \
  >"$out/bench-quant.log" 2>&1
echo "gpu.py --quant-only: exit $? after $(( $(date +%s) - t0 )) s"
grep -vE "^\s*$" "$out/bench-quant.log" | tail -15

# W4A16 model rows: the shape decoded dense and with every decoder linear W4A16, no HF (at batch 1 and 64)
for shape in ${W4A16_SHAPES-llama-3-8b}; do
  t0=$(date +%s)
  timeout "${W4A16_LIMIT:-150}" python3 benchmarks/gpu.py --w4a16-only --models "$shape" \
    --json "$out/gpu-w4a16-$shape.json" >"$out/bench-w4a16-$shape.log" 2>&1
  echo "gpu.py --w4a16-only $shape: exit $? after $(( $(date +%s) - t0 )) s"
  grep -vE "^\s*$" "$out/bench-w4a16-$shape.log" | tail -12
done

for shape in ${SHAPES-llama-3-8b}; do
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_LIMIT:-150}" python3 benchmarks/gpu.py --models "$shape" --json "$out/gpu-$shape.json" \
    ${BENCH_ARGS:-} >"$out/bench-$shape.log" 2>&1
  echo "gpu.py $shape: exit $? after $(( $(date +%s) - t0 )) s"
  grep -vE "^\s*$" "$out/bench-$shape.log" | tail -25
done
# One tensor-parallel rank's step time with the collectives stubbed (a projection for 2/4/8-GPU nodes)
for shape in ${TP_SHAPES-llama-8b}; do
  t0=$(date +%s)
  timeout "${TP_LIMIT:-60}" python3 benchmarks/tp_step.py --device cuda --preset "$shape" \
    >"$out/tp-step-$shape.log" 2>&1
  echo "tp_step.py $shape: exit $? after $(( $(date +%s) - t0 )) s"
  grep -vE "^\s*$" "$out/tp-step-$shape.log" | tail -15
done
echo "total $(( $(date +%s) - started )) s"
