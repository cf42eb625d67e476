#!/usr/bin/env bash
# The long fuzz run: rounds over every target (ROUND_SECS each, one process at a time) until
# the executions of all targets together reach TOTAL_EXECS (default 10^8) or MAX_HOURS pass.
# The corpora in fuzz/corpus/ grow across rounds (and across runs). After every round it
# prints executions per target and the total. A target that crashes, panics, times out or runs
# out of memory is named (reproducer in fuzz/artifacts/<target>/) and left out of later
# rounds; the others go on, and the script exits 1 at the end.
#
#   fuzz/run-long.sh                                  # towards 10^8 executions
#   TOTAL_EXECS=1000000 ROUND_SECS=30 fuzz/run-long.sh
#   TARGETS="frame_decode codec_cup_pos" fuzz/run-long.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"

TOTAL_EXECS="${TOTAL_EXECS:-100000000}"
ROUND_SECS="${ROUND_SECS:-300}"
MAX_HOURS="${MAX_HOURS:-24}"
if [ -n "${TARGETS:-}" ]; then read -r -a FUZZ_TARGETS <<<"$TARGETS"; fi

fuzz_setup
logs="$FUZZ_DIR/target/long-logs"
mkdir -p "$logs"
declare -A execs secs failed
nfailed=0
for t in "${FUZZ_TARGETS[@]}"; do execs[$t]=0; secs[$t]=0; done
total=0
round=0
start=$SECONDS
report() {
  local r rate
  echo "-- after round $round ($(((SECONDS - start) / 60)) min)"
  for r in "${FUZZ_TARGETS[@]}"; do
    rate=0
    if [ "${secs[$r]}" -gt 0 ]; then rate=$((execs[$r] / secs[$r])); fi
    printf '%-18s %12s execs  %7s/s\n' "$r" "${execs[$r]}" "$rate"
  done
  printf '%-18s %12s execs\n' total "$total"
}
while [ "$total" -lt "$TOTAL_EXECS" ] && [ $((SECONDS - start)) -lt $((MAX_HOURS * 3600)) ] \
  && [ "$nfailed" -lt "${#FUZZ_TARGETS[@]}" ]; do
  round=$((round + 1))
  for t in "${FUZZ_TARGETS[@]}"; do
    log="$logs/$t.round$round.log"
    t0=$SECONDS
    if [ -n "${failed[$t]:-}" ]; then continue; fi
    if ! fuzz_one "$t" "$log" -max_total_time="$ROUND_SECS"; then
      failed[$t]="$log"
      nfailed=$((nfailed + 1))
      echo "FAILED: $t (log $log)"
      grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" -A2 "$log" | head -20 || true
    fi
    n=$(fuzz_execs "$log")
    execs[$t]=$((execs[$t] + n))
    secs[$t]=$((secs[$t] + SECONDS - t0))
    total=$((total + n))
  done
  report
done
if [ "$nfailed" -gt 0 ]; then
  echo "FAILED: ${!failed[*]} (reproducers in fuzz/artifacts/<target>/)"
  exit 1
fi
echo "done: $total executions, 0 crashes"
