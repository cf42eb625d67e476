#!/usr/bin/env bash
# End-to-end figures: the gateway read as ratios of `ceiling serve`, measured in one session on
# this machine with the same load generator (../shared/bench/ceiling/README.md).
#
#   benches/e2e.sh                 # from the project root or anywhere
#
# Shapes: 256 connections x 1 in flight (closed loop), 64 x 8 (closed loop), then 64 x 8 in open
# loop at 5 % of the ceiling's 64x8 figure (latency from the intended send time).
# The ceiling is driven with fixtures/replay/ceiling-echo.toml (a plain sale: it approves
# everything and cannot answer refunds with an RRN); the gateway with mixed-day-ascii1987.toml.
#
# Environment (all optional):
#   DURATION=5                seconds per run
#   CEILING_PORT=18583        GATEWAY_PORT=18584
#   GATEWAY_SCENARIO=fixtures/replay/mixed-day-ascii1987.toml
#   ADMIN_PORT=18585          the gateway's admin HTTP port
#   GATEWAY=target/release/refundgate   the gateway binary to measure
#   GATEWAY_LOG=warn          the gateway's log filter during the runs
#   GATEWAY_CA=FILE           verify the gateway's certificate (default: --insecure-skip-verify;
#                             the gateway makes a self-signed certificate at start)
# The gateway runs `refundgate serve --config` with a configuration written here: one ascii1987
# listener, the embedded merchant set, journal.durability "fdatasync" then "unsafe_no_fsync".
# Its runs are chained with --stan-start so no STAN repeats within the gateway's duplicate window.
#   PERF=0                    skip perf even when it is installed
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
CEILING_PORT=${CEILING_PORT:-18583}
GATEWAY_PORT=${GATEWAY_PORT:-18584}
ADMIN_PORT=${ADMIN_PORT:-18585}
GATEWAY_LOG=${GATEWAY_LOG:-warn}
STAN_NEXT=1
GATEWAY_SCENARIO=${GATEWAY_SCENARIO:-fixtures/replay/mixed-day-ascii1987.toml}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/refundgate-e2e.XXXXXX")
JOURNAL=$(mktemp -d "${TMPDIR:-/tmp}/refundgate-journal.XXXXXX")
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$JOURNAL"
}
trap cleanup EXIT

say() { printf '== %s\n' "$*" >&2; }

wait_port() { # port pid
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { say "process $2 exited before listening on $1"; return 1; }
        sleep 0.1
    done
    say "nothing listens on $1 after 10 s"
    return 1
}

stop() { # pid
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# --- build ------------------------------------------------------------------------------------
say "building refundgate (release)"
cargo build --release --locked --bins
say "building ceiling (release)"
CARGO_TARGET_DIR=target/ceiling cargo build --release --locked --manifest-path ../shared/bench/ceiling/Cargo.toml
CEILING=target/ceiling/release/ceiling
SELF=target/release/refundgate
GATEWAY=${GATEWAY:-$SELF}
LOAD=("$SELF" load)

# run NAME TARGET_PORT SCENARIO CONNECTIONS IN_FLIGHT [extra load args...]
# Writes $OUT/NAME.json; a non-clean run is reported, not fatal.
run() {
    local name=$1 port=$2 scenario=$3 conns=$4 depth=$5
    shift 5
    say "$name: $conns x $depth $*"
    local rc=0
    "${LOAD[@]}" --target "127.0.0.1:$port" --scenario "$scenario" --connections "$conns" \
        --in-flight "$depth" --duration "$DURATION" --json --quiet "$@" >"$OUT/$name.json" || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "$name: exit $rc (1 = mismatches, 2 = errors); see $OUT/$name.json"
    fi
    jq -r '"   \(.throughput_per_s|floor)/s  p50 \(.latency_us.p50) us  p99 \(.latency_us.p99) us  mismatches \(.mismatches)  errors \(.errors.connect + .errors.io + .errors.timeouts + .errors.lost)"' \
        "$OUT/$name.json" >&2 || true
}

# run_gw: run, continuing the STAN sequence of the previous gateway run.
run_gw() {
    run "$@" --stan-start "$STAN_NEXT"
    STAN_NEXT=$(jq -r '.stan_next // 1' "$OUT/$1.json" 2>/dev/null || echo 1)
}

tput_of() { jq -r '.throughput_per_s' "$OUT/$1.json" 2>/dev/null || echo 0; }
p99_of() { jq -r '.latency_us.p99' "$OUT/$1.json" 2>/dev/null || echo -; }

# --- ceiling ----------------------------------------------------------------------------------
say "starting ceiling serve on 127.0.0.1:$CEILING_PORT"
"$CEILING" serve --addr "127.0.0.1:$CEILING_PORT" 2>"$OUT/ceiling.log" &
CEILING_PID=$!
PIDS+=("$CEILING_PID")
wait_port "$CEILING_PORT" "$CEILING_PID"
run ceiling-256x1 "$CEILING_PORT" fixtures/replay/ceiling-echo.toml 256 1 --closed --insecure-skip-verify
run ceiling-64x8 "$CEILING_PORT" fixtures/replay/ceiling-echo.toml 64 8 --closed --insecure-skip-verify
RATE=$(jq -r '(.throughput_per_s * 0.05) | floor | if . < 1 then 1 else . end' "$OUT/ceiling-64x8.json")
run ceiling-open "$CEILING_PORT" fixtures/replay/ceiling-echo.toml 64 8 --rate "$RATE" --insecure-skip-verify
stop "$CEILING_PID"

# --- gateway ----------------------------------------------------------------------------------
HAVE_SERVE=0
if "$GATEWAY" serve --help >/dev/null 2>&1; then
    HAVE_SERVE=1
else
    say "refundgate serve does not exist yet: gateway runs skipped"
fi

TLS_ARGS=(--insecure-skip-verify)
[ -n "${GATEWAY_CA:-}" ] && TLS_ARGS=(--ca "$GATEWAY_CA" --server-name localhost)

gateway_runs() { # label journal-dir durability
    local label=$1 dir=$2 durability=$3
    mkdir -p "$dir"
    cat >"$OUT/gateway-$label.toml" <<EOF
[admin]
addr = "127.0.0.1:$ADMIN_PORT"
[journal]
dir = "$dir"
durability = "$durability"
[log]
filter = "$GATEWAY_LOG"
[[listeners]]
addr = "127.0.0.1:$GATEWAY_PORT"
dialect = "ascii1987"
framing = "binary2"
EOF
    say "starting refundgate serve ($label): journal $dir, durability $durability"
    "$GATEWAY" serve --config "$OUT/gateway-$label.toml" >"$OUT/gateway-$label.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$GATEWAY_PORT" "$pid" || { say "gateway ($label) did not start; see $OUT/gateway-$label.log"; return 0; }
    run_gw "gw-$label-256x1" "$GATEWAY_PORT" "$GATEWAY_SCENARIO" 256 1 --closed "${TLS_ARGS[@]}"
    if [ "${PERF:-1}" != 0 ] && command -v perf >/dev/null 2>&1; then
        say "perf stat + perf record on the gateway during the 64x8 run ($label)"
        perf stat -p "$pid" -o "$OUT/perf-stat-$label.txt" -- sleep "$DURATION" 2>/dev/null &
        local stat_pid=$!
        perf record -g -p "$pid" -o "$OUT/perf-$label.data" -- sleep "$DURATION" >/dev/null 2>&1 &
        local rec_pid=$!
        run_gw "gw-$label-64x8" "$GATEWAY_PORT" "$GATEWAY_SCENARIO" 64 8 --closed "${TLS_ARGS[@]}"
        wait "$stat_pid" 2>/dev/null || say "perf stat failed (permissions? kernel.perf_event_paranoid)"
        wait "$rec_pid" 2>/dev/null || say "perf record failed (permissions? kernel.perf_event_paranoid)"
        [ -s "$OUT/perf-stat-$label.txt" ] && cat "$OUT/perf-stat-$label.txt" >&2
        [ -s "$OUT/perf-$label.data" ] && say "perf report -i $OUT/perf-$label.data"
    else
        if [ "${PERF:-1}" != 0 ]; then say "perf is not installed: no profile of the gateway"; fi
        run_gw "gw-$label-64x8" "$GATEWAY_PORT" "$GATEWAY_SCENARIO" 64 8 --closed "${TLS_ARGS[@]}"
    fi
    run_gw "gw-$label-open" "$GATEWAY_PORT" "$GATEWAY_SCENARIO" 64 8 --rate "$RATE" "${TLS_ARGS[@]}"
    stop "$pid"
}

if [ "$HAVE_SERVE" = 1 ]; then
    gateway_runs durable "$JOURNAL" fdatasync
    gateway_runs volatile "$JOURNAL/volatile" unsafe_no_fsync
fi

# --- table ------------------------------------------------------------------------------------
ratio() { # gateway ceiling
    if [ -f "$OUT/$1.json" ]; then
        awk -v g="$(tput_of "$1")" -v c="$(tput_of "$2")" 'BEGIN { if (c > 0) printf "%.0f/s = %.2f", g, g / c; else print "-" }'
    else
        printf 'skipped'
    fi
}
echo
echo "refundgate e2e, $(date -u +%FT%TZ), $(nproc) cores, ${DURATION} s per run; results in $OUT"
printf '%-28s %-16s %-26s %-26s\n' "shape" "ceiling" "gateway durable / ceiling" "gateway volatile / ceiling"
for shape in 256x1 64x8; do
    printf '%-28s %-16s %-26s %-26s\n' "$shape closed" "$(printf '%.0f/s' "$(tput_of "ceiling-$shape")")" \
        "$(ratio "gw-durable-$shape" "ceiling-$shape")" "$(ratio "gw-volatile-$shape" "ceiling-$shape")"
done
p99_or_skip() { [ -f "$OUT/$1.json" ] && echo "p99 $(p99_of "$1") us" || echo skipped; }
printf '%-28s %-16s %-26s %-26s\n' "64x8 open at ${RATE}/s" "p99 $(p99_of ceiling-open) us" \
    "$(p99_or_skip gw-durable-open)" "$(p99_or_skip gw-volatile-open)"
echo "(ceiling driven with ceiling-echo.toml; gateway with $(basename "$GATEWAY_SCENARIO"))"

# --- durable-write ceiling ----------------------------------------------------------------------
echo
say "ceiling fsync --dir $JOURNAL (the gateway's journal directory in this run)"
"$CEILING" fsync --dir "$JOURNAL"
