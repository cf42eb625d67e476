# Shared by fuzz/smoke.sh and fuzz/run-long.sh (sourced, not run). Installs what fuzzing
# needs (a nightly toolchain, cargo-fuzz), seeds the corpora, builds every target once.
#
# Build flags: `-s none` (no AddressSanitizer: the crate denies `unsafe`, and ASan costs 2-3x
# executions) and `-a` (debug assertions, hence overflow checks, in the optimised build).
# FUZZ_SANITIZER=address puts ASan back.

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$FUZZ_DIR")"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
FUZZ_BUILD_FLAGS=(-s "$FUZZ_SANITIZER" -a)
# Every target, in the order they run.
FUZZ_TARGETS=(
  frame_decode
  codec_ascii1987
  codec_cup_pos
  codec_iso87b
  json_view
  spec_load
  config_parse
  merchants_parse
  journal_record
  snapshot_restore
  ledger_event
  saf_reader
  admin_http
)
# libFuzzer options for every run. No -jobs/-workers: libFuzzer then fuzzes in its own single
# process (the machines are shared; -jobs=1 would fork a worker logging to fuzz-0.log). An
# input slower than 10 s is a failure (a slow scan is a bug too); RSS is bounded.
FUZZ_LIBFUZZER_FLAGS=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)

fuzz_setup() {
  if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "(installing the nightly toolchain for cargo-fuzz)"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "(installing cargo-fuzz)"
    cargo install --locked cargo-fuzz
  fi
  if command -v python3 >/dev/null 2>&1; then
    python3 "$FUZZ_DIR/seed-corpus.py" --shared "$REPO_DIR/../shared" >/dev/null
  else
    echo "(python3 missing: targets start from empty corpora)"
  fi
  for t in "${FUZZ_TARGETS[@]}"; do mkdir -p "$FUZZ_DIR/corpus/$t"; done
  (cd "$FUZZ_DIR" && cargo +nightly fuzz build "${FUZZ_BUILD_FLAGS[@]}")
}

# fuzz_one TARGET LOG [libFuzzer options...]: runs one target; returns its exit status.
fuzz_one() {
  local target="$1" log="$2"
  shift 2
  (cd "$FUZZ_DIR" && cargo +nightly fuzz run "${FUZZ_BUILD_FLAGS[@]}" "$target" -- \
    "${FUZZ_LIBFUZZER_FLAGS[@]}" "$@") >"$log" 2>&1
}

# fuzz_execs LOG: the executions a finished run reports ("Done N runs" or the final stats).
fuzz_execs() {
  local n
  n=$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$1" | grep -Eo '[0-9]+$' | tail -1 || true)
  if [ -z "$n" ]; then
    n=$(grep -Eo '^Done [0-9]+ runs' "$1" | grep -Eo '[0-9]+' | head -1 || true)
  fi
  echo "${n:-0}"
}
