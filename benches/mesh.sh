#!/usr/bin/env bash
# Mesh throughput: iperf3 TCP between two machines on two hosts (network
# namespaces on a veth underlay), through skein's own WireGuard device and through
# Debian's wireguard-go driven by the same skein agent (device = "uapi"), both with
# skein's eBPF guard and rewrite attached.
# Usage (root): benches/mesh.sh [seconds]   (the skein binary: target/release/skein)
# Needs iperf3 and wireguard-go (`cargo xtask bench mesh` installs them and runs this).
set -euo pipefail
T=${1:-10}
SKEIN=${SKEIN:-$(dirname "$0")/../target/release/skein}
SKEIN=$(realpath "$SKEIN")
W=$(mktemp -d)
NS="bm1 bm2 bmm1 bmm2"
cleanup() {
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in $NS; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

setup() {
  for n in $NS; do ip netns add "$n"; ip -n "$n" link set lo up; done
  ip link add ul0 netns bm1 type veth peer name ul0 netns bm2
  ip -n bm1 addr add fd00:99::1/64 dev ul0 nodad; ip -n bm1 link set ul0 up
  ip -n bm2 addr add fd00:99::2/64 dev ul0 nodad; ip -n bm2 link set ul0 up
  ip link add vm1 netns bm1 type veth peer name eth0 netns bmm1
  ip link add vm2 netns bm2 type veth peer name eth0 netns bmm2
  for i in 1 2; do
    # machines get the mesh MTU (the worker's job; see docs/architecture.md)
    ip -n bmm$i link set eth0 mtu 1420 up
    ip -n bm$i link set vm$i mtu 1420
    ip -n bmm$i addr add fdaa:0:18:0:$((i+1)):0:1:0/128 dev eth0 nodad
    ip -n bmm$i route add fdaa::/16 via fe80::1 dev eth0
  done
}

config() { # host device iface
  cat > "$W/h$1.toml" <<TOML
[host]
region = "ams"
name = "h$1"
[admin]
listen = "127.0.0.1:9400"
[state]
dir = "$W/h$1"
[catalog]
file = "$W/catalog.toml"
poll_interval = "100ms"
[proxy]
enabled = false
[dns]
enabled = false
[mesh]
enabled = true
device = "$2"
interface = "$3"
uapi_dir = "${4:-/var/run/wireguard}"
ebpf = ${EBPF:-true}
ebpf_stats = ${EBPF_STATS:-false}
[log]
format = "json"
level = "warn"
TOML
}

catalog() {
  cat > "$W/catalog.toml" <<TOML
[[regions]]
code = "ams"
name = "Amsterdam"
[[networks]]
id = "0:18"
name = "alpha"
[[apps]]
name = "a"
network = "alpha"
[[hosts]]
id = "0:2"
name = "h1"
region = "ams"
underlay = "fd00:99::1"
wireguard = { public_key = "$1" }
[[hosts]]
id = "0:3"
name = "h2"
region = "ams"
underlay = "fd00:99::2"
wireguard = { public_key = "$2" }
[[machines]]
id = "m1"
app = "a"
region = "ams"
host = "0:2"
state = "started"
address = "fdaa:0:18:0:2:0:1:0"
interface = "vm1"
[[machines]]
id = "m2"
app = "a"
region = "ams"
host = "0:3"
state = "started"
address = "fdaa:0:18:0:3:0:1:0"
interface = "vm2"
TOML
}

# CPU time all cores spent busy so far, in ms (USER_HZ 100).
cpu_busy_ms() { awk '/^cpu /{print ($2+$3+$4+$7+$8)*10}' /proc/stat; }
# Sum over both hosts of a metric from each daemon's /metrics.
metric_sum() {
  local t=0 v
  for i in 1 2; do
    v=$(ip netns exec bm$i curl -s http://127.0.0.1:9400/metrics | awk -v m="$1" '$1 ~ "^"m {s+=$2} END{printf "%d", s}')
    t=$((t + v))
  done
  echo "$t"
}

iperf() { # label name
  ip netns exec bmm2 iperf3 -s -1 -B fdaa:0:18:0:3:0:1:0 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  for _ in $(seq 20); do ip netns exec bmm1 ping -6 -c1 -W1 fdaa:0:18:0:3:0:1:0 >/dev/null 2>&1 && break; done
  ROUND_N=$((ROUND_N + 1))
  local json="$OUT/$2-$ROUND_N.json"
  local ns0 runs0 busy0
  if [ -n "${COST:-}" ]; then
    sleep 2.5 # the daemons publish their counters every 2 s
    ns0=$(metric_sum skein_ebpf_run_nanoseconds_total); runs0=$(metric_sum skein_ebpf_runs_total)
    busy0=$(cpu_busy_ms)
  fi
  ip netns exec bmm1 iperf3 -c fdaa:0:18:0:3:0:1:0 -t "$T" -J > "$json" || true
  if [ -n "${COST:-}" ]; then
    local busy=$(( $(cpu_busy_ms) - busy0 ))
    sleep 2.5
    local ns=$(( $(metric_sum skein_ebpf_run_nanoseconds_total) - ns0 ))
    local runs=$(( $(metric_sum skein_ebpf_runs_total) - runs0 ))
    # What the programs took against all the CPU the machine spent during the
    # transfer (both cores, every process and softirq): the programs' cost,
    # without comparing two noisy throughputs.
    python3 -c 'import sys; ns,runs,busy=map(int,sys.argv[1:]); print("eBPF programs: %d runs, %.0f ns per run, %.2f%% of the CPU the transfer used" % (runs, ns/max(runs,1), 100.0*ns/1e6/max(busy,1)))' "$ns" "$runs" "$busy"
  fi
  local g
  g=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$json" 2>/dev/null || echo failed)
  printf '%-44s %6s Gbit/s\n' "$1" "$g"
  RUNS+=("--run" "$2=$json")
  wait "$server" 2>/dev/null || true
}

run_mesh() { # device
  setup
  local dev=$1
  for i in 1 2; do
    if [ "$dev" = uapi ]; then
      config $i uapi "bmgo$i"
      ip netns exec bm$i wireguard-go -f "bmgo$i" >/dev/null 2>&1 &
    else
      config $i skein skein0 "$W/wg$i"
    fi
  done
  sleep 1
  catalog "$("$SKEIN" mesh-key -c "$W/h1.toml")" "$("$SKEIN" mesh-key -c "$W/h2.toml")"
  for i in 1 2; do ip netns exec bm$i "$SKEIN" run -c "$W/h$i.toml" 2>"$W/h$i.log" & done
  sleep 3
  iperf "machine->machine, $2" "$3"
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in $NS; do ip netns del "$n"; done
}

if [ "${DEBUG_HOLD:-}" ]; then
  setup; config 1 skein skein0 "$W/wg1"; config 2 skein skein0 "$W/wg2"
  catalog "$("$SKEIN" mesh-key -c "$W/h1.toml")" "$("$SKEIN" mesh-key -c "$W/h2.toml")"
  for i in 1 2; do ip netns exec bm$i "$SKEIN" run -c "$W/h$i.toml" 2>"$W/h$i.log" & done
  sleep "$DEBUG_HOLD"; exit 0
fi
# Rounds alternate the three paths, so drift on the machine hits them alike.
OUT=${OUT:-$W/out}
mkdir -p "$OUT"
RUNS=()
ROUND_N=0
for _ in $(seq "${REPEAT:-1}"); do
  run_mesh skein "skein device + eBPF" skein
  run_mesh uapi "wireguard-go + skein eBPF" wireguard-go
  EBPF=false run_mesh skein "skein device, no eBPF" skein-no-ebpf
done
# What the programs cost, timed by the kernel (a run of its own: the timing
# adds two clock reads per program run, so it is kept out of the comparison).
EBPF_STATS=true COST=1 run_mesh skein "skein device + eBPF, programs timed" skein-ebpf-timed
# Into the bench reports (table, page, history) when skein-bench is given.
if [ -n "${SKEIN_BENCH:-}" ]; then
  "$SKEIN_BENCH" import-iperf3 --scenario mesh-iperf3 "${RUNS[@]}" \
    --out "${REPORTS:-target/bench-report}" --label "${LABEL:-iperf3 ${T}s machine to machine, two hosts}"
fi

