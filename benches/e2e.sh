#!/usr/bin/env bash
# End-to-end figures, each read as a ratio against ../shared/bench/ceiling measured in the same
# run on this machine (../shared/bench/ceiling/README.md). Runnable by hand; not run in CI.
#
#   benches/e2e.sh                 # from the project root or anywhere; needs jq, bash, cargo
#
# Per round (ROUNDS, default 3; the table shows medians, then every round):
#   1. `ceiling serve`, driven by `refundgate load` with fixtures/replay/ceiling-echo.toml:
#      256 x 1 closed, 64 x 8 closed, open loop at RATE/s (default 5,000) over 64 connections;
#      `ceiling load` 64 x 8 against the same server right before and right after the 64 x 8
#      run: the generator check (refundgate load / mean of the two ceiling load runs).
#   2. the gateway, release, on its embedded defaults (info logging, fdatasync journal; only
#      the ports and the journal directory moved so it cannot clash with a running gateway),
#      driven by the same client with the same traffic and shapes, a fresh gateway and
#      journal for each run (runs chained on one gateway would, on a fast machine, pass the
#      999,999-STAN space and be answered partly from stored answers). A run that alone used
#      more than 999,999 STANs is named under the table: lower DURATION.
# Then `ceiling fsync --batch 1` on the gateway's journal directory (same file system as the
# default data/journal: it lives under target/). Per round it also prints how many of the
# gateway's journal syncs during its open-loop run took over 2.5 ms and over 10 ms (its
# refundgate_journal_sync_seconds, scraped before and after): each holds every answer decided
# meanwhile, and a few of them decide that run's p99.
#
# Each run also reads the server's CPU time (user + system, /proc/PID/stat) before and after,
# and prints the CPU per answer of the gateway and of the ceiling: steadier than throughput on
# a shared machine, and it shows what a ratio would need (the client shares the cores).
#
# Targets (issue 15): 256x1 >= 0.85, 64x8 >= 0.45 of ceiling serve; open-loop p99 <= ceiling
# p99 + 2 x fsync batch-1 p99; generator >= 0.80 of ceiling load; 0 mismatches in every run.
#
# Environment (all optional):
#   ROUNDS=3  DURATION=3 (seconds per run: the gateway's 64 x 8 runs reach ~280k/s here, and a
#             run must stay under 999,999 STANs)  RATE=5000 (open loop, requests/s in total)
#   CEILING_PORT=18583  GATEWAY_PORT=18584  ADMIN_PORT=18585   (GATEWAY_PORT+10: cup_pos)
#   GATEWAY=target/release/refundgate   the gateway binary to measure
#   GATEWAY_LOG=info                    its log filter (the default of the product)
#   DURABILITY=fdatasync                or unsafe_no_fsync
#   SCENARIO=fixtures/replay/ceiling-echo.toml   the traffic for both servers
#   MIXED=0                   1: also drive the gateway 64 x 8 with mixed-day-ascii1987.toml
#                             (informational: the ceiling cannot answer refunds)
#   PERF=0                    1: perf stat + record the gateway during its first 64 x 8 run
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3}
RATE=${RATE:-5000}
CEILING_PORT=${CEILING_PORT:-18583}
GATEWAY_PORT=${GATEWAY_PORT:-18584}
ADMIN_PORT=${ADMIN_PORT:-18585}
GATEWAY_LOG=${GATEWAY_LOG:-info}
DURABILITY=${DURABILITY:-fdatasync}
SCENARIO=${SCENARIO:-fixtures/replay/ceiling-echo.toml}
mkdir -p target
OUT=$(mktemp -d "${TMPDIR:-/tmp}/refundgate-e2e.XXXXXX")
JOURNAL_ROOT=$(mktemp -d "$PWD/target/e2e-journal.XXXXXX")
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$JOURNAL_ROOT"
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

# sync_buckets FILE: the gateway's journal sync histogram now, one "le count" line per bucket
sync_buckets() {
    curl -s "127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null \
        | sed -n 's/^refundgate_journal_sync_seconds_bucket{le="\([^"]*\)"} \([0-9.e+]*\)$/\1 \2/p' >"$1" || true
}

# slow_syncs BEFORE AFTER: the syncs between two sync_buckets, and how many took over 2.5 ms
# and over 10 ms (each such sync holds every answer decided while it runs)
slow_syncs() {
    awk 'NR == FNR { b[$1] = $2; next } { d[$1] = $2 - b[$1] }
         END { printf "%d syncs, %d over 2.5 ms, %d over 10 ms", d["+Inf"], d["+Inf"] - d["0.0025"], d["+Inf"] - d["0.01"] }' "$1" "$2" 2>/dev/null \
        || echo "no journal histogram"
}

# --- build ------------------------------------------------------------------------------------
say "building refundgate (release)"
cargo build --release --locked --bins
say "building ceiling (release)"
CARGO_TARGET_DIR=target/ceiling cargo build --release --locked --manifest-path ../shared/bench/ceiling/Cargo.toml
CEILING=target/ceiling/release/ceiling
SELF=target/release/refundgate
GATEWAY=${GATEWAY:-$SELF}
STAN_NEXT=1

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# The process serving the current run (ceiling serve or the gateway): its CPU time is read
# before and after each run from /proc (user + system, all threads).
SERVER_PID=
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run NAME PORT SCENARIO CONNECTIONS IN_FLIGHT [extra load args...]: refundgate load, report
# in $OUT/NAME.json, the server's CPU per answer (us) in $OUT/NAME.cpu; a run that is not
# clean is reported, not fatal. STANs continue from the previous run so none repeats within
# the gateway's duplicate window.
run() {
    local name=$1 port=$2 scenario=$3 conns=$4 depth=$5
    shift 5
    local rc=0 t0
    t0=$(cpu_ticks "$SERVER_PID")
    "$SELF" load --target "127.0.0.1:$port" --scenario "$scenario" --connections "$conns" \
        --in-flight "$depth" --duration "$DURATION" --json --quiet --insecure-skip-verify \
        --stan-start "$STAN_NEXT" "$@" >"$OUT/$name.json" || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "$name: exit $rc (1 = mismatches, 2 = errors); see $OUT/$name.json"
    fi
    awk -v a="$t0" -v b="$(cpu_ticks "$SERVER_PID")" -v hz="$CLK_TCK" \
        -v n="$(jq -r '.answered // 0' "$OUT/$name.json" 2>/dev/null || echo 0)" \
        'BEGIN { printf "%.2f\n", (n > 0 ? (b - a) * 1e6 / hz / n : 0) }' >"$OUT/$name.cpu"
    STAN_NEXT=$(jq -r '.stan_next // 1' "$OUT/$name.json" 2>/dev/null || echo 1)
    jq -r --arg n "$name" --arg cpu "$(cat "$OUT/$name.cpu")" '"   \($n): \(.throughput_per_s|floor)/s  p50 \(.latency_us.p50) us  p99 \(.latency_us.p99) us  mismatches \(.mismatches)  errors \(.errors.connect + .errors.io + .errors.timeouts + .errors.lost)  server CPU \($cpu) us/answer"' \
        "$OUT/$name.json" >&2 || true
}

# ceiling_load NAME PORT CONNECTIONS IN_FLIGHT: the trivial client; answers/s in $OUT/NAME.txt
ceiling_load() {
    local name=$1 port=$2 conns=$3 depth=$4 rc=0
    "$CEILING" load --target "127.0.0.1:$port" --connections "$conns" --in-flight "$depth" \
        --secs "$DURATION" >"$OUT/$name.log" 2>&1 || rc=$?
    sed -n 's/.*: \([0-9.]*\) answers\/s verified.*/\1/p' "$OUT/$name.log" | head -1 >"$OUT/$name.txt"
    [ "$rc" -eq 0 ] || say "$name: ceiling load exit $rc; see $OUT/$name.log"
    say "   $name: $(cat "$OUT/$name.txt")/s (ceiling load)"
}

gateway_config() { # dir -> config path; the embedded defaults, ports and journal moved
    local dir=$1
    cat >"$OUT/gateway.toml" <<EOF
# refundgate's embedded defaults (Config::documented_defaults) with other ports and journal.
[admin]
addr = "127.0.0.1:$ADMIN_PORT"
[journal]
dir = "$dir"
durability = "$DURABILITY"
[log]
format = "plain"
filter = "$GATEWAY_LOG"
[[listeners]]
addr = "127.0.0.1:$GATEWAY_PORT"
dialect = "ascii1987"
framing = "binary2"
[[listeners]]
addr = "127.0.0.1:$((GATEWAY_PORT + 10))"
dialect = "cup_pos"
framing = "binary2"
EOF
    echo "$OUT/gateway.toml"
}

# --- rounds -----------------------------------------------------------------------------------
for r in $(seq "$ROUNDS"); do
    say "round $r/$ROUNDS: ceiling serve on 127.0.0.1:$CEILING_PORT"
    "$CEILING" serve --addr "127.0.0.1:$CEILING_PORT" 2>"$OUT/ceiling.log" &
    cpid=$!
    PIDS+=("$cpid")
    SERVER_PID=$cpid
    wait_port "$CEILING_PORT" "$cpid"
    run "r$r-ceiling-256x1" "$CEILING_PORT" "$SCENARIO" 256 1 --closed
    # The generator check brackets refundgate load with ceiling load, so a machine whose load
    # drifts during the round biases neither side: the ceiling is the mean of the two.
    ceiling_load "r$r-ceilingload-64x8-before" "$CEILING_PORT" 64 8
    run "r$r-ceiling-64x8" "$CEILING_PORT" "$SCENARIO" 64 8 --closed
    ceiling_load "r$r-ceilingload-64x8-after" "$CEILING_PORT" 64 8
    awk '{ s += $1; n++ } END { print (n ? s / n : 0) }' "$OUT/r$r-ceilingload-64x8-before.txt" \
        "$OUT/r$r-ceilingload-64x8-after.txt" >"$OUT/r$r-ceilingload-64x8.txt"
    run "r$r-ceiling-open" "$CEILING_PORT" "$SCENARIO" 64 8 --rate "$RATE"
    stop "$cpid"

    # Each gateway run on a fresh gateway and journal: the duplicate key is terminal + STAN +
    # date (DOMAIN §6) and the STAN space is 999,999, so runs chained on one gateway would, on
    # a fast machine, be answered partly from stored answers (no decision, no sync) and flatter
    # the figures. A run that still used more than 999,999 STANs says so in the table.
    for run_spec in "256x1:256:1:--closed" "64x8:64:8:--closed" "open:64:8:--rate:$RATE"; do
        IFS=: read -r what conns depth a1 a2 <<<"$run_spec"
        STAN_NEXT=1
        jdir="$JOURNAL_ROOT/r$r-$what"
        # serve creates the journal directory itself (0700, DOMAIN §10)
        say "round $r/$ROUNDS: refundgate serve for $what (log $GATEWAY_LOG, journal $DURABILITY in $jdir)"
        "$GATEWAY" serve --config "$(gateway_config "$jdir")" >"$OUT/r$r-gateway-$what.log" 2>&1 &
        gpid=$!
        PIDS+=("$gpid")
        SERVER_PID=$gpid
        if ! wait_port "$GATEWAY_PORT" "$gpid"; then
            say "the gateway did not start; see $OUT/r$r-gateway-$what.log"
            continue
        fi
        sync_buckets "$OUT/r$r-sync-before-$what.txt"
        if [ "${PERF:-0}" = 1 ] && [ "$r" = 1 ] && [ "$what" = 64x8 ] && command -v perf >/dev/null 2>&1; then
            perf record -g -p "$gpid" -o "$OUT/perf-gateway.data" -- sleep "$DURATION" >/dev/null 2>&1 &
            perf_pid=$!
            run "r$r-gw-$what" "$GATEWAY_PORT" "$SCENARIO" "$conns" "$depth" $a1 $a2
            wait "$perf_pid" 2>/dev/null || say "perf record failed (kernel.perf_event_paranoid?)"
            say "perf report -i $OUT/perf-gateway.data"
        else
            run "r$r-gw-$what" "$GATEWAY_PORT" "$SCENARIO" "$conns" "$depth" $a1 $a2
        fi
        sync_buckets "$OUT/r$r-sync-after-$what.txt"
        slow_syncs "$OUT/r$r-sync-before-$what.txt" "$OUT/r$r-sync-after-$what.txt" >"$OUT/r$r-$what-syncs.txt"
        say "   r$r-gw-$what journal: $(cat "$OUT/r$r-$what-syncs.txt")"
        if [ "$(jq -r '.stan_reused // false' "$OUT/r$r-gw-$what.json" 2>/dev/null)" = true ]; then
            say "   r$r-gw-$what: more than 999,999 requests, STANs reused: part of this run was answered from stored answers (lower DURATION)"
            echo "r$r-gw-$what" >>"$OUT/stan-reused.txt"
        fi
        if [ "$what" = 64x8 ] && [ "${MIXED:-0}" = 1 ]; then
            run "r$r-gw-mixed-64x8" "$GATEWAY_PORT" fixtures/replay/mixed-day-ascii1987.toml 64 8 --closed
        fi
        curl -s "127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null \
            | sed -n 's/^refundgate_log_lines_dropped_total \(.*\)/\1/p' >>"$OUT/r$r-dropped.txt" || true
        stop "$gpid"
    done
done

say "ceiling fsync --batch 1 on $JOURNAL_ROOT (the gateway's journal file system)"
"$CEILING" fsync --dir "$JOURNAL_ROOT" --batch 1 --secs 3 | tee "$OUT/fsync.txt" >&2
FSYNC_P99=$(sed -n 's/^batch *1:.*p99 *\([0-9.]*\) us.*/\1/p' "$OUT/fsync.txt" | head -1)
FSYNC_P99=${FSYNC_P99:-0}

# --- table ------------------------------------------------------------------------------------
tput_of() { jq -r '.throughput_per_s // 0' "$OUT/$1.json" 2>/dev/null || echo 0; }
p99_of() { jq -r '.latency_us.p99 // 0' "$OUT/$1.json" 2>/dev/null || echo 0; }
lag99_of() { jq -r '.send_lag_us.p99 // 0' "$OUT/$1.json" 2>/dev/null || echo 0; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
per_round() { # fn name-suffix -> one value per round
    for r in $(seq "$ROUNDS"); do "$1" "r$r-$2"; done
}
ratio_rounds() { # gateway-suffix ceiling-suffix -> one ratio per round
    for r in $(seq "$ROUNDS"); do
        awk -v g="$(tput_of "r$r-$1")" -v c="$(tput_of "r$r-$2")" 'BEGIN { print (c > 0 ? g / c : 0) }'
    done
}
gen_rounds() {
    for r in $(seq "$ROUNDS"); do
        awk -v g="$(tput_of "r$r-ceiling-64x8")" -v c="$(cat "$OUT/r$r-ceilingload-64x8.txt" 2>/dev/null || echo 0)" \
            'BEGIN { print (c > 0 ? g / c : 0) }'
    done
}
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "met" : "MISSED" }'; }

G256=$(per_round tput_of gw-256x1 | median); C256=$(per_round tput_of ceiling-256x1 | median)
G64=$(per_round tput_of gw-64x8 | median); C64=$(per_round tput_of ceiling-64x8 | median)
R256=$(ratio_rounds gw-256x1 ceiling-256x1 | median); R64=$(ratio_rounds gw-64x8 ceiling-64x8 | median)
GP99=$(per_round p99_of gw-open | median); CP99=$(per_round p99_of ceiling-open | median)
BUDGET=$(awk -v c="$CP99" -v f="$FSYNC_P99" 'BEGIN { print c + 2 * f }')
CL64=$(for r in $(seq "$ROUNDS"); do cat "$OUT/r$r-ceilingload-64x8.txt" 2>/dev/null || echo 0; done | median)
RGEN=$(gen_rounds | median)
MISMATCHES=$(cat "$OUT"/r*.json 2>/dev/null | jq -s 'map(.mismatches) | add // 0')
ERRORS=$(cat "$OUT"/r*.json 2>/dev/null | jq -s 'map(.errors.connect + .errors.io + .errors.timeouts + .errors.lost) | add // 0')

echo
echo "refundgate e2e, $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$ROUNDS rounds x ${DURATION} s per run; medians; same client (refundgate load, $(basename "$SCENARIO")) for both servers;"
echo "gateway: $GATEWAY serve on the embedded defaults, log $GATEWAY_LOG, journal $DURABILITY; results in $OUT"
printf '%-44s %-14s %-40s %-7s %s\n' "what" "figure" "ceiling" "ratio" "target"
printf '%-44s %-14s %-40s %-7s %s\n' "gateway 256 x 1 closed" "$(printf '%.0f/s' "$G256")" \
    "$(printf '%.0f/s ceiling serve' "$C256")" "$(printf '%.2f' "$R256")" ">= 0.85 $(verdict "$R256" 0.85 '>=')"
printf '%-44s %-14s %-40s %-7s %s\n' "gateway 64 x 8 closed" "$(printf '%.0f/s' "$G64")" \
    "$(printf '%.0f/s ceiling serve' "$C64")" "$(printf '%.2f' "$R64")" ">= 0.45 $(verdict "$R64" 0.45 '>=')"
printf '%-44s %-14s %-40s %-7s %s\n' "gateway open ${RATE}/s, 64 conns, p99" "$(printf '%.0f us' "$GP99")" \
    "$(printf '%.0f + 2 x %.0f (fsync) = %.0f us' "$CP99" "$FSYNC_P99" "$BUDGET")" \
    "$(awk -v g="$GP99" -v b="$BUDGET" 'BEGIN { printf "%.2f", (b > 0 ? g / b : 0) }')" "<= 1 $(verdict "$GP99" "$BUDGET" '<=')"
printf '%-44s %-14s %-40s %-7s %s\n' "generator: refundgate load 64 x 8 -> ceiling" "$(printf '%.0f/s' "$(per_round tput_of ceiling-64x8 | median)")" \
    "$(printf '%.0f/s ceiling load' "$CL64")" "$(printf '%.2f' "$RGEN")" ">= 0.80 $(verdict "$RGEN" 0.80 '>=')"
printf '%-44s %-14s %-40s %-7s %s\n' "mismatches / errors, all load runs" "$MISMATCHES / $ERRORS" "" "" "0 $( [ "$MISMATCHES" = 0 ] && echo met || echo MISSED)"
cpu_of() { cat "$OUT/$1.cpu" 2>/dev/null || echo 0; }
for shape in 256x1 64x8; do
    GC=$(per_round cpu_of "gw-$shape" | median); CC=$(per_round cpu_of "ceiling-$shape" | median)
    printf '%-44s %-14s %-40s %-7s %s\n' "server CPU per answer, $shape" "$(printf '%.2f us' "$GC")" \
        "$(printf '%.2f us ceiling serve' "$CC")" "$(awk -v g="$GC" -v c="$CC" 'BEGIN { printf "%.2f", (c > 0 ? g / c : 0) }')" "(informational)"
done
printf '%-44s %-14s %-40s %-7s %s\n' "generator send lag p99, open loop" \
    "$(printf '%.0f us' "$(per_round lag99_of gw-open | median)")" \
    "$(printf '%.0f us against ceiling serve' "$(per_round lag99_of ceiling-open | median)")" "" "(informational: part of both p99s)"
echo "log lines dropped by the gateway per round: $(cat "$OUT"/r*-dropped.txt 2>/dev/null | tr '\n' ' ')"
echo
echo "per round (ratio 256x1, ratio 64x8, gateway p99 / ceiling p99 us, generator ratio; the"
echo "gateway's journal syncs during its open-loop run, from refundgate_journal_sync_seconds):"
for r in $(seq "$ROUNDS"); do
    printf '  round %s: %s  %s  %s / %s  %s  (%s)\n' "$r" \
        "$(ratio_rounds gw-256x1 ceiling-256x1 | sed -n "${r}p" | xargs printf '%.2f')" \
        "$(ratio_rounds gw-64x8 ceiling-64x8 | sed -n "${r}p" | xargs printf '%.2f')" \
        "$(p99_of "r$r-gw-open")" "$(p99_of "r$r-ceiling-open")" \
        "$(gen_rounds | sed -n "${r}p" | xargs printf '%.2f')" \
        "$(cat "$OUT/r$r-open-syncs.txt" 2>/dev/null || echo "no journal histogram")"
done
if [ -s "$OUT/stan-reused.txt" ]; then
    echo "WARNING: these gateway runs used more than 999,999 STANs, so part of each was answered"
    echo "from stored answers (no decision, no sync); their figures flatter the gateway: lower"
    echo "DURATION. $(tr '\n' ' ' <"$OUT/stan-reused.txt")"
fi
if [ "${MIXED:-0}" = 1 ]; then
    echo "gateway 64 x 8 mixed-day (informational): $(per_round tput_of gw-mixed-64x8 | median | xargs printf '%.0f')/s"
fi
