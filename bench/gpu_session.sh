#!/usr/bin/env bash
# One call on a lent GPU machine: build fastcl._C, run the GPU tests, then the GPU benchmarks and
# the memory checker, each within what is left of one time budget, so that a slow step costs the
# ones after it and never the whole call. Logs and JSON go to $OUT (default /tmp/fastcl-gpu).
#
#   BUDGET_S=520 bash bench/gpu_session.sh
#   STEPS="build sweep tests_triton" BUDGET_S=300 bash bench/gpu_session.sh     # some steps only
#
# Steps, in order: build info tests_learner_gpu sweep tests_triton tests_cuda_backend e2e_smollm
# profile profile_2mb op_prefill op_decode memcheck (all by default).
#
# The image's python3 must hold a CUDA torch, triton, transformers, peft, pytest and
# pytest-benchmark. SmolLM2's GGUF (94 MB) does not travel, so the GPU benchmarks use models
# built with its shapes and random weights (bench/gpu_end_to_end.py); its tokenizer (3 MB) does,
# for tests/test_learner_gpu.py: save it here with
#   python -c "import fastcl.models; fastcl.models.load_default()[1].save_pretrained('.gpu_carry/smollm2_tokenizer')"
# and carry .gpu_carry (ignored through .git/info/exclude).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastcl-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
# PYTHONSAFEPATH (python >= 3.11): keeps the checkout's root off sys.path; its kernels/ shares a
# name with Hugging Face's `kernels` package, which transformers >= 5 imports (kernels/__init__.py).
PYTEST="env PYTHONSAFEPATH=1 $PY -m pytest"
BUDGET_S=${BUDGET_S:-520}
STEPS=${STEPS:-build info tests_learner_gpu sweep tests_triton tests_cuda_backend e2e_smollm profile profile_2mb op_prefill op_decode memcheck}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FASTCL_BUILD_CUDA=${FASTCL_BUILD_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME SECONDS CMD...: run CMD with at most SECONDS (or what is left), log to $OUT/run.log.
step() {
    local name=$1 want=$2 limit rc t0
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    limit=$(left)
    (( want < limit )) && limit=$want
    if (( limit < 10 )); then
        echo "$name: skipped, budget spent" | tee -a "$OUT/summary.txt"
        return 1
    fi
    echo "=== $name (limit ${limit}s)" >>"$OUT/run.log"
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$OUT/run.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
    return $rc
}

{
    nvidia-smi -L
    $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    $PY -m pip list 2>/dev/null | grep -i -E "^(peft|pytest|pytest-benchmark|pytest-xdist|pytest-timeout|safetensors|accelerate) "
    nvcc --version | tail -1
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

step build 240 $PY -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUT/run.log"; exit 1; }
step info 30 $PY -c "import fastcl, json; print(json.dumps(fastcl.info(), indent=1, default=str))"

# The learning path on the GPU against the same runs on the CPU (learn, gate, rollback, save/load,
# the default recipe with the shipped texts).
step tests_learner_gpu 150 env FASTCL_TEST_TOKENIZER_DIR="${FASTCL_TEST_TOKENIZER_DIR:-.gpu_carry/smollm2_tokenizer}" \
    $PYTEST tests/test_learner_gpu.py -v -ra --tb=short -p no:cacheprovider --junitxml="$OUT/tests_learner_gpu.xml"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/run.log" | tail -8

# Each tuned Triton config alone, one process per (kernel, config, dtype): a config that faults
# cannot hide the others (tests/test_triton.py's every-config test stops at the first).
step sweep 120 $PY bench/triton_config_sweep.py --workers 12 --json "$OUT/triton_sweep.json"
grep -E "^(WRONG|FAULT)|cases," "$OUT/run.log" | tail -40

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 12"
TIMEOUT=""
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout 120"
# -v streams one line per test, so a step stopped at its limit still says what passed. One
# pytest per backend: a kernel that breaks its process's CUDA context fails every later test
# in that process, and that must not spill into the other backend's results.
for suite in triton cuda_backend; do
    step "tests_$suite" 300 $PYTEST "tests/test_$suite.py" -v -ra --tb=short \
        -p no:cacheprovider $XDIST $TIMEOUT --durations=10 --junitxml="$OUT/tests_$suite.xml"
done
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/run.log" | tail -25

step e2e_smollm 200 $PY bench/gpu_end_to_end.py --model SmolLM2-135M --batch 8 --seq 512 --full-step \
    --json "$OUT/e2e_smollm2.json"
sed -n '/^SmolLM2-135M shapes/,/^Backends not run\|^=== /p' "$OUT/run.log" | head -40

# Where observe() spends its time on the GPU (the PyTorch backend: what auto picks there).
step profile 60 $PY bench/profile_observe.py --device cuda --batch 8 --seq 512 --backend torch --rows 20
sed -n '/^=== profile/,$p' "$OUT/run.log" | grep -v "^=== " | tail -30
# The same with the loss gradient's old 2 MB chunks, to measure what the 256 MB GPU chunks gained.
step profile_2mb 60 $PY bench/profile_observe.py --device cuda --batch 8 --seq 512 --backend torch --rows 5 \
    --loss-chunk-mb 2
sed -n '/^=== profile_2mb/,$p' "$OUT/run.log" | grep -v "^=== " | tail -16

# Op level, bf16, r = 16: prefill (the Llama-3-8B projections at M = 2048 and 8192) and decode
# (M = 1 and 16), PEFT LoRA and nn.Linear beside the three backends. Two runs, two JSON files:
# pytest-benchmark writes its JSON only at the end of a run.
ops() {
    local rows=$1
    $PY - "$rows" <<'EOF'
import sys
rows = sys.argv[1].split(",")
shapes = ["4096x4096", "4096x1024", "4096x14336", "14336x4096", "576x1536", "1536x576"]
for mode in ("fwd", "fwd_bwd"):
    for shape in shapes:
        for M in rows:
            for provider in ("linear", "peft", "fastcl_torch", "fastcl_triton", "fastcl_cuda"):
                print(f"bench/test_bench_lowrank_linear.py::test_lowrank_linear[{mode}-{shape}-16-{M}-{provider}]")
EOF
}
BENCH_OPTS="-q -p no:cacheprovider --benchmark-max-time=0.05 --benchmark-min-rounds=20 --benchmark-warmup=on"
step op_prefill 110 $PYTEST $(ops 2048,8192) $BENCH_OPTS --benchmark-json="$OUT/op_prefill.json"
step op_decode 70 $PYTEST $(ops 1,16) $BENCH_OPTS --benchmark-json="$OUT/op_decode.json"

# Memory check of the CUDA kernels: no caching allocator, so an overrun cannot hide in a pooled block.
if command -v compute-sanitizer >/dev/null; then
    step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        $PYTEST tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "matches_reference and not graph"
fi
grep -E "ERROR SUMMARY|passed|failed" "$OUT/run.log" | tail -4
echo "--- summary"
cat "$OUT/summary.txt"
