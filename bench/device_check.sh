#!/usr/bin/env bash
# Everything a GPU machine should answer, in one call on a fresh H100, within BUDGET_S (420 s) of
# wall time: the stages below, most valuable first, each under its own `timeout`, so a hang costs
# only its own stage and the others still report. A stage's limit is its cap, cut to what is left
# of the budget (minus RESERVE_S for the summary); a stage left under MIN_STAGE_S (10 s) is skipped.
#
#   stage      cap   what
#   build      150   pip install -e . : fusedclip._C for sm_90 only, 16 jobs; ptxas report kept
#   tests       80   GPU tests (-m "gpu and not slow": every backend's CUDA leg, the public-API
#                    parity suite on CUDA tensors included), xdist when it is there
#   check       25   python -m fusedclip check
#   bench       90   cpp and triton against torch (foreach) and the measured copy floor:
#                    llama-1b bf16+fp32 (clip, noclip, amp, amp-fold); gpt2-small, small-5000 and
#                    one 256M tensor in bf16 (clip, noclip)
#   ncu         60   Nsight Compute on pass 1 and pass 2 (llama-1b bf16/fp32, small-5000 bf16):
#                    DRAM % of peak, achieved occupancy, L2 hit rate, top stall reasons
#   sanitizer   60   compute-sanitizer memcheck, racecheck, synccheck on a small GPU subset
#   variants    60   bench/variant_sweep.py: every FUSEDCLIP_CUDA_PASS1 variant per set; then
#                    bench/triton_variants.py: FUSEDCLIP_TRITON_VARIANT's variants (into bench.log)
#   slowtests   40   the GPU tests marked slow, with what time is left
#
# At most 8 files land in $OUT: summary.txt (the table printed last), ptxas.txt, tests.log,
# bench.log, bench.json, variants.json, ncu.txt, sanitizer.log. CPU-only tests do not run here.
#
#   bash bench/device_check.sh                       # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/dc bash bench/device_check.sh  # on any machine: the control flow, with every
#                                                    # GPU command replaced by a stub
# DRY_RUN_HANG=STAGE makes that stage's stub hang (its timeout must end it); CAP_<STAGE>=N
# overrides a cap (e.g. CAP_TESTS=2); BUDGET_S, RESERVE_S and MIN_STAGE_S override the budget.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
SELF="$HERE/device_check.sh"
export OUT="${OUT:-/tmp/fusedclip-device}"
export DRY_RUN="${DRY_RUN:-0}"
export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
STAGES=(build tests check bench ncu sanitizer variants slowtests)
declare -A CAP=([build]=150 [tests]=80 [check]=25 [bench]=90 [ncu]=60 [sanitizer]=60
                [variants]=60 [slowtests]=40)

# gpu CMD...: a command that needs the GPU machine (or its build). Under DRY_RUN it only says what
# it would run, and hangs when DRY_RUN_HANG names the current stage.
gpu() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "[dry-run] $*"
    if [ "${DRY_RUN_HANG:-}" = "$STAGE" ]; then sleep 100000; fi
    return 0
  fi
  "$@"
}

# fake STAGE: under DRY_RUN, the files the real commands of STAGE would have left in $W.
fake() { [ "$DRY_RUN" != 1 ] || "$PY" bench/device_report.py stub "$1" "$W"; }

# share N: 1/N of the seconds left to this stage, at least 10 (for stages that run several tools).
share() { local left=$((STAGE_END - SECONDS)); echo $((left / $1 > 10 ? left / $1 : 10)); }

stage_build() {
  export FUSEDCLIP_BUILD_EXT=cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  gpu "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$W/build.log" 2>&1
  local rc=$?
  fake build
  "$PY" bench/device_report.py ptxas "$W/build.log" >"$OUT/ptxas.txt"
  if [ "$rc" -ne 0 ]; then
    { echo "== build failed (rc=$rc); the log's last 60 lines"; tail -60 "$W/build.log"; } \
      >>"$OUT/ptxas.txt"
  fi
  gpu "$PY" -c "import fusedclip._C as C; assert C.CUDA_KERNELS, 'no CUDA kernels'" || return 1
  return "$rc"
}

# deadline S: the wall clock S seconds before this stage's limit, for FUSEDCLIP_TEST_DEADLINE
# (tests/conftest.py skips the tests that would start after it, so pytest still prints its counts).
deadline() { echo $(($(date +%s) + STAGE_END - SECONDS - $1)); }

pytest_args() {  # xdist where it is installed: 8 workers share the GPU and compile Triton kernels
  if "$PY" -c "import xdist" 2>/dev/null; then echo "-n 8"; fi
}

stage_tests() {
  export FUSEDCLIP_REQUIRE_EXTENSION=1
  echo "== GPU tests: pytest -m 'gpu and not slow' tests" >>"$OUT/tests.log"
  # shellcheck disable=SC2046
  FUSEDCLIP_TEST_DEADLINE=$(deadline 15) \
    gpu "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" $(pytest_args) tests \
    >>"$OUT/tests.log" 2>&1
}

stage_check() {
  echo "== python -m fusedclip check" >>"$OUT/tests.log"
  gpu "$PY" -m fusedclip check --seconds 10 >>"$OUT/tests.log" 2>&1
}

stage_slowtests() {
  export FUSEDCLIP_REQUIRE_EXTENSION=1
  echo "== GPU tests marked slow" >>"$OUT/tests.log"
  FUSEDCLIP_TEST_DEADLINE=$(deadline 10) \
    gpu "$PY" -m pytest -q -p no:cacheprovider -m "gpu and slow" tests >>"$OUT/tests.log" 2>&1
}

stage_bench() {
  # The headline sets, and one tensor of 2^28 elements (the built-in "huge" is 2^29).
  cat >"$W/sets.toml" <<'EOF'
[huge-256m]
kind = "one_huge"
numel = 268435456
description = "one 256M"
EOF
  local common=(--sets-file "$W/sets.toml" --no-progress --train-steps 0) rc=0
  gpu "$PY" -m fusedclip bench "${common[@]}" --sets llama-1b --dtype bf16,fp32 \
    --scenario clip,noclip,amp,amp-fold --out "$W/bench-llama" >>"$OUT/bench.log" 2>&1 || rc=$?
  gpu "$PY" -m fusedclip bench "${common[@]}" --sets gpt2-small,small-5000,huge-256m \
    --dtype bf16 --scenario clip,noclip --out "$W/bench-bf16" >>"$OUT/bench.log" 2>&1 || rc=$?
  fake bench
  "$PY" bench/device_report.py merge-bench "$OUT/bench.json" "$W"/bench-*/results.json || rc=$?
  return "$rc"
}

stage_ncu() {
  # The sections hold the stall reasons (smsp__average_warps_issue_stalled_*); the named metrics
  # are the table's columns. If ncu refuses a metric, the sections alone, once more.
  local rc args=(--target-processes all --profile-from-start off --clock-control none
    --kernel-name 'regex:norm_kernel|scale_kernel' --launch-count 40 --section SpeedOfLight
    --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats --csv
    --page raw)
  local metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct
  metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum
  gpu ncu "${args[@]}" --metrics "$metrics" --log-file "$W/ncu.csv" "$PY" bench/ncu_cases.py \
    >"$W/ncu-cases.log" 2>&1
  rc=$?
  if [ "$DRY_RUN" != 1 ] && ! grep -q '"ID"' "$W/ncu.csv" 2>/dev/null; then
    { echo "== first try (rc=$rc)"; cat "$W/ncu.csv" "$W/ncu-cases.log"; } >"$W/ncu-first.log" 2>&1
    gpu ncu "${args[@]}" --log-file "$W/ncu.csv" "$PY" bench/ncu_cases.py >"$W/ncu-cases.log" 2>&1
    rc=$?
  fi
  fake ncu
  {
    "$PY" bench/device_report.py ncu-table "$W/ncu.csv" "$W/ncu-cases.log"
    echo; echo "== cases (bench/ncu_cases.py, rc=$rc)"; cat "$W/ncu-cases.log"
    [ ! -f "$W/ncu-first.log" ] || { echo; tail -40 "$W/ncu-first.log"; }
    echo; echo "== ncu --csv --page raw"; cat "$W/ncu.csv"
  } >"$OUT/ncu.txt" 2>&1
  return "$rc"
}

stage_sanitizer() {
  # A small subset, so that each tool ends (and prints its ERROR SUMMARY) inside its share: the
  # compiled engine's CUDA legs of the oracle, determinism, finish, stream and per-tensor tests.
  local rc=0 n=3 tool limit
  local pick="cpp and not graph and (clip_matches_oracle or deterministic or partials_then_finish"
  pick+=" or two_streams or per_tensor_norms or nonfinite_norm)"
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.log"
    limit=$(share $n)
    FUSEDCLIP_TEST_DEADLINE=$(($(date +%s) + limit - 10)) \
      gpu timeout -k 5 "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -m gpu -k "$pick" \
      tests/engine/test_ops.py >>"$OUT/sanitizer.log" 2>&1 || rc=$?
    n=$((n - 1))
  done
  return "$rc"
}

stage_variants() {
  gpu timeout -k 5 "$(share 2)" "$PY" bench/variant_sweep.py --out "$OUT/variants.json" \
    >>"$OUT/bench.log" 2>&1
  local rc=$?
  # The Triton backend's variants (FUSEDCLIP_TRITON_VARIANT): printed into bench.log.
  gpu timeout -k 5 "$(share 1)" "$PY" bench/triton_variants.py --numel 1e8 --iters 10 \
    >>"$OUT/bench.log" 2>&1 || rc=$?
  fake variants
  [ "$DRY_RUN" != 1 ] || cp "$W/variants.json" "$OUT/variants.json"
  return "$rc"
}

# --- one stage, run by the main flow below under `timeout` ---------------------------------------
if [ "${1:-}" = "__stage" ]; then
  STAGE=$2 STAGE_END=$((SECONDS + $3)) W=$4
  "stage_$STAGE"
  exit $?
fi

# --- the main flow ------------------------------------------------------------------------------
BUDGET_S="${BUDGET_S:-420}"
RESERVE_S="${RESERVE_S:-10}"
MIN_STAGE_S="${MIN_STAGE_S:-10}"
mkdir -p "$OUT"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
start=$SECONDS
: >"$W/stages.tsv"
built=1
for stage in "${STAGES[@]}"; do
  upper=${stage^^}
  cap_var="CAP_$upper"
  cap=${!cap_var:-${CAP[$stage]}}
  left=$((BUDGET_S - RESERVE_S - (SECONDS - start)))
  limit=$((cap < left ? cap : left))
  if [ "$built" = 0 ] && [ "$stage" != build ]; then
    printf '%s\tskipped\t0\t%s\tthe build failed\n' "$stage" "$cap" >>"$W/stages.tsv"
    continue
  fi
  if [ "$limit" -lt "$MIN_STAGE_S" ]; then
    printf '%s\tskipped\t0\t%s\tno time left (%ss)\n' "$stage" "$cap" "$left" >>"$W/stages.tsv"
    continue
  fi
  echo "=== stage $stage (limit ${limit}s, ${left}s of the budget left)"
  t0=$SECONDS
  timeout -k 5 "$limit" bash "$SELF" __stage "$stage" "$limit" "$W"
  rc=$?
  took=$((SECONDS - t0))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t\n' "$stage" "$status" "$took" "$limit" >>"$W/stages.tsv"
  if [ "$stage" = build ] && [ "$rc" -ne 0 ]; then
    built=0
    if ! grep -q "build failed" "$OUT/ptxas.txt" 2>/dev/null; then  # killed by its timeout
      { echo "== build: $status after ${took}s; the log's last 60 lines"; tail -60 "$W/build.log"; } \
        >>"$OUT/ptxas.txt" 2>&1
    fi
  fi
done
"$PY" bench/device_report.py summary "$W/stages.tsv" "$OUT" "$((SECONDS - start))" \
  >"$W/summary.txt" 2>&1
cp "$W/summary.txt" "$OUT/summary.txt"
n_files=$(find "$OUT" -type f | wc -l)
[ "$n_files" -le 8 ] || echo "WARNING: $n_files files in $OUT (at most 8 come back)"
cat "$OUT/summary.txt"
! grep -qE $'\t(failed|timeout)' "$W/stages.tsv"
