#!/usr/bin/env bash
# CI's fuzz smoke pass: every target for FUZZ_SMOKE_SECS (default 8) seconds, one at a time,
# from the seed corpora. Fails (exit 1) when any target crashes, panics, times out or runs out
# of memory; the reproducer is in fuzz/artifacts/<target>/. Prints executions per target.
# libFuzzer seed 1 (FUZZ_SEED) so a CI failure repeats; fuzz/run-long.sh explores.
set -euo pipefail
source "$(dirname "$0")/common.sh"

secs="${FUZZ_SMOKE_SECS:-8}"
fuzz_setup
logs="$FUZZ_DIR/target/smoke-logs"
mkdir -p "$logs"
failed=()
total=0
start=$SECONDS
for t in "${FUZZ_TARGETS[@]}"; do
  if fuzz_one "$t" "$logs/$t.log" -max_total_time="$secs" -seed="${FUZZ_SEED:-1}"; then status=ok; else status=FAILED; failed+=("$t"); fi
  n=$(fuzz_execs "$logs/$t.log")
  total=$((total + n))
  printf '%-18s %10s execs  %s\n' "$t" "$n" "$status"
  if [ "$status" = FAILED ]; then
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" -A2 "$logs/$t.log" | head -20 || true
  fi
done
printf '%-18s %10s execs  in %ss\n' total "$total" "$((SECONDS - start))"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz smoke FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
