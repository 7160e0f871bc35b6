#!/usr/bin/env bash
# A local fleet in one command, for demos and experiments: one redis-server (or, with --cluster,
# a three-master Redis Cluster) and N roam nodes sharing it, all on free loopback ports, with
# one shared ID secret. Everything lives in a temporary folder and stops on Ctrl-C.
#
#   scripts/fleet.sh [--nodes N] [--cluster] [--root DIR] [-- extra roam serve flags]
#
# Prints each node's URL; mint an ID at any node (curl http://NODE/), download from any other.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=3
cluster=0
root=.
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --cluster) cluster=1; shift ;;
    --root) root=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--nodes N] [--cluster] [--root DIR] [-- roam serve flags]" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

cargo build --release --quiet
roam=target/release/roam
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Redis needs a port number: take a free one; a server that finds it taken exits, and is retried.
# Leaves the port in $d/port.
start_redis() { # dir, extra args...
  local d=$1; shift
  mkdir -p "$d"
  for _ in 1 2 3 4 5; do
    local port; port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --dir "$d" --save "" --appendonly yes \
      --daemonize no --logfile "$d/redis.log" "$@" </dev/null >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
      if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
        pids+=("$pid"); echo "$port" > "$d/port"; return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
  done
  echo "redis-server did not start (see $d/redis.log)" >&2
  return 1
}

if [ "$cluster" = 1 ]; then
  hosts=()
  for i in 1 2 3; do
    start_redis "$dir/redis$i" --cluster-enabled yes --cluster-port "$(free_port)" \
      --cluster-config-file "$dir/redis$i/nodes.conf" --cluster-node-timeout 2000
    hosts+=("127.0.0.1:$(cat "$dir/redis$i/port")")
  done
  redis-cli --cluster create "${hosts[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  until redis-cli -p "${hosts[0]#*:}" cluster info | grep -q cluster_state:ok; do sleep 0.05; done
  store="redis+cluster://$(IFS=,; echo "${hosts[*]}")"
else
  start_redis "$dir/redis"
  store="redis://127.0.0.1:$(cat "$dir/redis/port")/"
fi

head -c 32 /dev/urandom > "$dir/id-secret"
chmod 600 "$dir/id-secret"
echo "store: $store"
for i in $(seq "$nodes"); do
  "$roam" serve --root "$root" --listen 127.0.0.1:0 --store "$store" \
    --id-secret-file "$dir/id-secret" --state-dir "$dir/node$i" "$@" \
    > "$dir/node$i.out" 2> "$dir/node$i.log" &
  pids+=("$!")
  until grep -q "listening on" "$dir/node$i.out" 2>/dev/null; do
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$dir/node$i.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "node $i: $(sed 's/roam listening on //' "$dir/node$i.out")   (log: $dir/node$i.log)"
done
echo "Ctrl-C stops the fleet."
wait
