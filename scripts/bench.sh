#!/usr/bin/env bash
# Load tests for docs/benchmarks.md (never run by the test suite). Builds release, pins each
# server to core $SERVER_CORE and the load generator to core $LOAD_CORE.
#
# Servers are compared in interleaved rounds: round 1 runs roam, nginx, lighttpd one after the
# other, round 2 again (in a rotated order), and so on, RUNS rounds. Each table gives the
# median of every server's runs and, for each other server, the median of the per-round
# ratios roam/other (with their range): a drift of the machine during the run hits every
# server of a round alike, so the ratio is steadier than the raw figures.
#
#   scripts/bench.sh small        # 1 KiB (64 conns), 100 KiB (16 and 64 conns): roam, nginx, lighttpd
#   scripts/bench.sh large        # one 256 MiB file downloaded 4 times on one connection: GB/s, CPU s/GB
#   scripts/bench.sh conns        # 10,000 concurrent connections: req/s, errors, RSS per connection
#   scripts/bench.sh tls          # HTTPS against nginx: 1 KiB, 100 KiB, 256 MiB, handshakes/s
#   scripts/bench.sh accounting   # roam with acknowledged vs written accounting
#   scripts/bench.sh store        # roam with --store disk vs memory (1 KiB, 100 KiB)
#   scripts/bench.sh mptcp        # roam's Multipath TCP listener vs TCP only, for TCP clients
#   scripts/bench.sh cold         # 1 KiB latency while 16 cold large files stream (page cache dropped)
#   OTHER_ROAM=path scripts/bench.sh versus   # this roam against another build (before/after)
#   (sendfile against read-and-write on MPTCP sockets: scripts/mptcp-sendfile.py)
#   scripts/bench.sh runtime      # roam multi-thread vs per-core runtime (1 KiB, 100 KiB)
#   scripts/bench.sh answers      # roam: minting IDs (GET /), repeated requests for finished files (416)
#   scripts/bench.sh redis        # memory vs Redis session store, interleaved (needs redis-server)
#   scripts/bench.sh idle         # memory per idle keep-alive connection (roam, nginx, lighttpd)
#   scripts/bench.sh metrics      # the ops layer's cost: roam against OTHER_ROAM built without it
#   scripts/bench.sh instructions # the same in instructions per request (valgrind), load-independent
#   scripts/bench.sh all
#
# Knobs (environment): DURATION (5s), RUNS (5 rounds), IDS (2000), STORE (disk: roam's default),
# SERVER_CORE (0), LOAD_CORE (1), OTHER_ROAM (another roam binary, compared as "other-roam"
# where a case supports it), ROAM_BIN (the roam to measure instead of building
# target/release/roam). BENCH_DEBUG=1 shows wrk's output.
# Needs: wrk, nginx, lighttpd, curl, openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
RUNS=${RUNS:-5}
IDS=${IDS:-2000}
STORE=${STORE:-disk}
SERVER_CORE=${SERVER_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"

for tool in wrk curl taskset nginx lighttpd openssl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ -n "${ROAM_BIN:-}" ] || cargo build --release --locked --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
mkdir -p "$root"
# nginx and lighttpd workers drop root privileges: everything they serve must be world-readable.
chmod 755 "$work"
head -c 1024 /dev/urandom >"$root/f1k"
head -c 102400 /dev/urandom >"$root/f100k"
chmod 644 "$root"/*
head -c 32 /dev/urandom >"$work/secret"

# TLS material for `tls`: a CA and an ECDSA P-256 leaf for 127.0.0.1, the same for every server.
make_certs() {
  [ -s "$work/tls/leaf.pem" ] && return 0
  mkdir -p "$work/tls"
  (
    cd "$work/tls"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.pem 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out leaf.key.ec 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -in leaf.key.ec -out leaf.key
    openssl req -new -key leaf.key -subj /CN=127.0.0.1 -out leaf.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile ext -out leaf.pem 2>/dev/null
    chmod 600 leaf.key ca.key
    chmod 644 leaf.pem ca.pem
  )
}

# ---- servers: each start_* sets ADDR and PID; SCHEME is http or https -------------------------

SCHEME=http

wait_port() { # wait until $1 (host:port) accepts connections
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server at $1 did not start" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_roam() {
  local tls=()
  [ "$SCHEME" = https ] && tls=(--tls-cert "$work/tls/leaf.pem" --tls-key "$work/tls/leaf.key")
  rm -rf "$work/state"
  local bin=${ROAM_BIN:-target/release/roam} store=()
  # Builds from before the durable store (for before/after runs) have no --store.
  if "$bin" serve --help | grep -q -- '--store'; then
    store=(--state-dir "$work/state")
    # A spec that names its own store (`roam:--store memory`) overrides $STORE.
    [[ " $* " == *" --store "* ]] || store+=(--store "$STORE")
  fi
  taskset -c "$SERVER_CORE" "$bin" serve --root "$root" --listen 127.0.0.1:0 \
    --id-secret-file "$work/secret" --max-connections 20000 "${store[@]}" \
    "${tls[@]}" "$@" >"$work/roam.out" 2>"$work/roam.err" &
  PID=$!
  pids+=("$PID")
  ADDR=""
  for _ in $(seq 400); do
    ADDR=$(sed -n "s|roam listening on $SCHEME://||p" "$work/roam.out")
    [ -n "$ADDR" ] && break
    sleep 0.05
  done
  [ -n "$ADDR" ] || { echo "roam did not start: $(cat "$work/roam.err")" >&2; exit 1; }
}

start_nginx() {
  local port listen="" ssl=""
  port=$(free_port)
  mkdir -p "$work/nginx"
  if [ "$SCHEME" = https ]; then
    listen=" ssl"
    # TLS 1.3 only, as roam's clients here negotiate; no kernel TLS on this machine, so nginx
    # reads and encrypts in user space like roam (sendfile is not used through OpenSSL).
    ssl="ssl_certificate $work/tls/leaf.pem; ssl_certificate_key $work/tls/leaf.key;
    ssl_protocols TLSv1.3; ssl_session_cache shared:SSL:10m;"
  fi
  cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 1;
# One process, so its CPU time and memory are what /proc/PID shows.
master_process off;
worker_rlimit_nofile 65536;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  open_file_cache max=1000 inactive=60s;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port$listen backlog=4096;
    $ssl
    root $root;
    # The same URLs as roam's /{id}/{file}.
    location / { rewrite ^/[^/]+/(.*)\$ /\$1 break; }
  }
}
CONF
  taskset -c "$SERVER_CORE" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
  PID=$!
  pids+=("$PID")
  ADDR="127.0.0.1:$port"
  wait_port "$ADDR"
}

start_lighttpd() {
  local port
  port=$(free_port)
  mkdir -p "$work/lighttpd"
  cat >"$work/lighttpd/lighttpd.conf" <<CONF
server.document-root = "$root"
server.bind = "127.0.0.1"
server.port = $port
server.modules = ( "mod_rewrite" )
server.max-fds = 65536
server.max-connections = 20000
server.max-keep-alive-requests = 1000000
server.max-keep-alive-idle = 60
server.errorlog = "$work/lighttpd/error.log"
server.listen-backlog = 4096
url.rewrite-once = ( "^/[^/]+/(.*)\$" => "/\$1" )
CONF
  taskset -c "$SERVER_CORE" lighttpd -D -f "$work/lighttpd/lighttpd.conf" &
  PID=$!
  pids+=("$PID")
  ADDR="127.0.0.1:$port"
  wait_port "$ADDR"
}

stop_server() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
}

# A server spec is a name, optionally with roam flags after a colon: "roam:--runtime per-core".
start_server() {
  local spec=$1 name flags=()
  name=${spec%%:*}
  SERVER_NAME=$name
  [ "$spec" != "$name" ] && read -r -a flags <<<"${spec#*:}"
  case $name in
    roam) start_roam "${flags[@]}" ;;
    # Another build of roam, for before/after comparisons: OTHER_ROAM=path/to/roam.
    other-roam) ROAM_BIN=${OTHER_ROAM:?set OTHER_ROAM to a roam binary} start_roam "${flags[@]}" ;;
    nginx) start_nginx ;;
    lighttpd) start_lighttpd ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
}

# Mints $IDS client IDs over one keep-alive connection into $work/ids (the secret is shared, so
# they stay valid across restarts). Other servers get the same URLs (their rewrite drops the ID).
mint_ids() {
  [ -s "$work/ids" ] && return 0
  local scheme=$SCHEME
  SCHEME=http
  start_roam
  local urls=()
  for _ in $(seq "$IDS"); do urls+=("http://$ADDR/"); done
  { curl -s "${urls[@]}" | fold -w 36; echo; } | grep -E '^[0-9a-f-]{36}$' >"$work/ids"
  stop_server
  SCHEME=$scheme
  [ "$(wc -l <"$work/ids")" -ge "$IDS" ] || { echo "minting failed" >&2; exit 1; }
}

# ---- interleaving -----------------------------------------------------------------------------

# interleave CASE MEASURE SPEC...: RUNS rounds; in each round every server (the order rotated by
# one each round) is started, measured with MEASURE (which prints a line of numbers) and stopped.
# Lines go to $work/res/CASE/<spec>, one per round.
interleave() {
  local case=$1 measure=$2
  shift 2
  local specs=("$@") n=$# round i
  mkdir -p "$work/res/$case"
  rm -f "$work/res/$case"/*
  for round in $(seq 0 $((RUNS - 1))); do
    for i in $(seq 0 $((n - 1))); do
      local spec=${specs[$(((i + round) % n))]}
      start_server "$spec"
      local line
      line=$("$measure")
      stop_server
      echo "$line" >>"$work/res/$case/$(printf '%s' "$spec" | tr ' /:' '_~,')"
      [ -n "${BENCH_DEBUG:-}" ] && echo "  $case round $round $spec: $line" >&2
    done
  done
  true
}

# report CASE "COLUMN NAMES" SPEC...: a markdown table of each server's medians, then for the
# first column the median (and range) of the per-round ratios first-spec/other.
report() {
  local case=$1 columns=$2
  shift 2
  python3 - "$work/res/$case" "$columns" "$@" <<'PY'
import os, statistics, sys
d, columns, specs = sys.argv[1], sys.argv[2].split("|"), sys.argv[3:]
def load(spec):
    f = os.path.join(d, spec.replace(" ", "_").replace("/", "~").replace(":", ","))
    return [l.split() for l in open(f) if l.strip()]
rows = {s: load(s) for s in specs}
def num(x):
    try: return float(x)
    except ValueError: return None
def fmt(v):
    return f"{v:,.0f}" if v >= 1000 else (f"{v:.3f}" if v < 10 else f"{v:.1f}")
print("| server | " + " | ".join(columns) + " | rounds (first column) |")
print("|---|" + "---|" * (len(columns) + 1))
for s in specs:
    cells = []
    for c in range(len(columns)):
        vals = [r[c] for r in rows[s] if len(r) > c]
        nums = [num(v) for v in vals]
        if vals and all(n is not None for n in nums):
            cells.append(fmt(statistics.median(nums)))
        else:
            cells.append("/".join(vals))
    firsts = ", ".join(r[0] for r in rows[s])
    print(f"| {s} | " + " | ".join(cells) + f" | {firsts} |")
print()
base = specs[0]
for s in specs[1:]:
    ratios = [float(a[0]) / float(b[0]) for a, b in zip(rows[base], rows[s]) if float(b[0]) > 0]
    if ratios:
        print(f"- {base} / {s} ({columns[0]}): median of {len(ratios)} per-round ratios "
              f"**{statistics.median(ratios):.2f}** (range {min(ratios):.2f}–{max(ratios):.2f})")
print()
PY
}

# ---- measurements: each prints one line of numbers ---------------------------------------------

WRK_FILE=f1k
WRK_CONNS=64
WRK_EXTRA=()

# wrk against ADDR: "req/s p50 p99 errors".
wrk_once() {
  taskset -c "$LOAD_CORE" wrk -t1 -c"$WRK_CONNS" -d"$DURATION" --latency --timeout 10s \
    "${WRK_EXTRA[@]}" -s scripts/wrk-sessions.lua "$SCHEME://$ADDR" -- "$WRK_FILE" "$work/ids" \
    >"$work/wrk.txt" 2>&1 || true
  [ -n "${BENCH_DEBUG:-}" ] && cat "$work/wrk.txt" >&2
  if grep -q "Non-2xx" "$work/wrk.txt"; then
    echo "wrk saw responses that are not 2xx: the comparison would be meaningless" >&2
    cat "$work/wrk.txt" >&2
    exit 1
  fi
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  # Latencies in milliseconds, whatever unit wrk chose.
  local to_ms='function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }'
  p50=$(awk "$to_ms"' $1 == "50%" {printf "%.3f", ms($2)}' "$work/wrk.txt")
  p99=$(awk "$to_ms"' $1 == "99%" {printf "%.3f", ms($2)}' "$work/wrk.txt")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10; found=1} END {if (!found) print 0}' "$work/wrk.txt")
  echo "${rps:-0} ${p50:-0} ${p99:-0} ${errors:-0}"
}

cpu_seconds() { # utime+stime of PID in seconds
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# The 256 MiB file four times on one connection (curl reuses it), to /dev/null: "GB/s CPU-s/GB".
large_once() {
  local id before after secs cacert=()
  id=$(head -n1 "$work/ids")
  [ "$SCHEME" = https ] && cacert=(--cacert "$work/tls/ca.pem")
  local url="$SCHEME://$ADDR/$id/f256m"
  # Warm-up, not measured: one download, and for roam its Repr-Digest (SHA-256 of the file,
  # computed once per file version in the background: each round starts a fresh server, and
  # hashing 256 MiB is about a tenth of a CPU-second that serving does not cost).
  taskset -c "$LOAD_CORE" curl -s "${cacert[@]}" -o /dev/null "$url"
  if [ "$SERVER_NAME" = roam ] || [ "$SERVER_NAME" = other-roam ]; then
    for _ in $(seq 600); do
      curl -s "${cacert[@]}" -I "$url" | grep -qi '^repr-digest:' && break
      sleep 0.1
    done
  fi
  before=$(cpu_seconds "$PID")
  secs=$(taskset -c "$LOAD_CORE" curl -s "${cacert[@]}" -H "Range: bytes=0-" \
    -o /dev/null -o /dev/null -o /dev/null -o /dev/null -w '%{time_total}\n' \
    "$url" "$url" "$url" "$url" | awk '{t += $1} END {print t}')
  after=$(cpu_seconds "$PID")
  awk -v s="$secs" -v c="$(awk -v a="$after" -v b="$before" 'BEGIN{print a-b}')" \
    'BEGIN { gb = 4 * 268435456 / 1e9; printf "%.2f %.3f\n", gb / s, c / gb }'
}

# ---- cases ------------------------------------------------------------------------------------

small_case() { # title file conns specs...
  local title=$1
  WRK_FILE=$2 WRK_CONNS=$3
  shift 3
  echo "#### $title"
  echo
  interleave "$WRK_FILE-$WRK_CONNS" wrk_once "$@"
  report "$WRK_FILE-$WRK_CONNS" "req/s|p50|p99|errors" "$@"
}

bench_small() {
  mint_ids
  echo "### Small files through /{id}/{file} (wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 connections (p50 and p99 in ms)" f1k 64 roam nginx lighttpd
  small_case "100 KiB, 16 connections" f100k 16 roam nginx lighttpd
  small_case "100 KiB, 64 connections" f100k 64 roam nginx lighttpd
}

bench_large() {
  mint_ids
  head -c $((256 << 20)) /dev/urandom >"$root/f256m"
  chmod 644 "$root/f256m"
  echo "### One 256 MiB file downloaded 4 times on one connection (curl to /dev/null on core $LOAD_CORE, $RUNS interleaved rounds)"
  echo
  # roam also without TCP_NOTSENT_LOWAT: what keeping "written" near "acknowledged" costs.
  interleave large large_once roam nginx lighttpd "roam:--notsent-lowat 0"
  report large "GB/s|server CPU s/GB" roam nginx lighttpd "roam:--notsent-lowat 0"
  rm -f "$root/f256m"
}

conns_once() {
  local n=10000 base peak=0 now
  base=$(rss_kb "$PID")
  taskset -c "$LOAD_CORE" wrk -t1 -c"$n" -d"$DURATION" --timeout 10s \
    -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" >"$work/wrk.txt" 2>&1 &
  local wrk_pid=$!
  while kill -0 "$wrk_pid" 2>/dev/null; do
    now=$(rss_kb "$PID" 2>/dev/null || echo 0)
    [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.2
  done
  wait "$wrk_pid" || true
  local rps errors
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10; found=1} END {if (!found) print 0}' "$work/wrk.txt")
  awk -v n="$n" -v b="$base" -v p="$peak" -v r="${rps:-0}" -v e="$errors" \
    'BEGIN { printf "%s %s %.1f %.2f\n", r, e, (p - b) / 1024, (p - b) / n }'
}

bench_conns() {
  mint_ids
  echo "### 10,000 concurrent connections (wrk -c10000, 1 KiB file, $DURATION, $RUNS interleaved rounds)"
  echo
  local specs=(roam nginx lighttpd)
  [ -n "${OTHER_ROAM:-}" ] && specs+=(other-roam)
  interleave conns conns_once "${specs[@]}"
  report conns "req/s|errors|RSS growth MB|RSS per connection KB" "${specs[@]}"
}

# Memory per idle connection: 10,000 connections each make one 1 KiB request, read the answer and
# stay open and silent (scripts/idle-conns.py); RSS once all are idle, minus RSS before (read
# after the sessions exist). With IDLE_BARE=1 the connections send nothing.
idle_once() {
  local n=10000 base after ids="$work/ids"
  [ -n "${IDLE_BARE:-}" ] && ids=-
  # Every client's session exists before the base is read (a second of wrk over 64
  # connections), so that the growth is the connections' own, not the sessions'.
  taskset -c "$LOAD_CORE" wrk -t1 -c64 -d1s -s scripts/wrk-sessions.lua "http://$ADDR" -- \
    f1k "$work/ids" >/dev/null 2>&1 || true
  base=$(rss_kb "$PID")
  coproc HOLD { taskset -c "$LOAD_CORE" python3 scripts/idle-conns.py "$ADDR" "$n" "$ids"; }
  local line=""
  read -r line <&"${HOLD[0]}" || true
  [ "$line" = ready ] || { echo "idle-conns.py did not get its answers" >&2; exit 1; }
  after=$(rss_kb "$PID")
  kill "$HOLD_PID" 2>/dev/null
  wait "$HOLD_PID" 2>/dev/null || true
  awk -v n="$n" -v b="$base" -v a="$after" 'BEGIN { printf "%.1f %.0f\n", (a - b) / 1024, (a - b) * 1024 / n }'
}

bench_idle() {
  mint_ids
  echo "### Memory per idle connection (10,000 connections, one 1 KiB request each, then silent; $RUNS interleaved rounds)"
  echo
  local specs=(roam nginx lighttpd)
  [ -n "${OTHER_ROAM:-}" ] && specs+=(other-roam)
  interleave idle idle_once "${specs[@]}"
  report idle "RSS growth MB|bytes per connection" "${specs[@]}"
}

handshake_once() { # a new connection (a full handshake) for every request
  WRK_EXTRA=(-H "Connection: close")
  wrk_once
  WRK_EXTRA=()
}

bench_tls() {
  mint_ids
  make_certs
  SCHEME=https
  echo "### HTTPS: roam against nginx, same ECDSA P-256 certificate, TLS 1.3 ($DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 keep-alive connections" f1k 64 roam nginx
  small_case "100 KiB, 16 keep-alive connections" f100k 16 roam nginx
  echo "#### Full handshakes: a new connection per 1 KiB request, 64 connections"
  echo
  WRK_FILE=f1k WRK_CONNS=64
  interleave handshakes handshake_once roam nginx
  report handshakes "req/s|p50|p99|errors" roam nginx
  head -c $((256 << 20)) /dev/urandom >"$root/f256m"
  chmod 644 "$root/f256m"
  echo "#### One 256 MiB file 4 times on one connection"
  echo
  interleave tls-large large_once roam nginx
  report tls-large "GB/s|server CPU s/GB" roam nginx
  rm -f "$root/f256m"
  SCHEME=http
}

bench_accounting() {
  mint_ids
  echo "### Cost of acknowledged-byte accounting (roam, wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 connections" f1k 64 "roam:--accounting acknowledged" "roam:--accounting written"
  small_case "100 KiB, 16 connections" f100k 16 "roam:--accounting acknowledged" "roam:--accounting written"
}

bench_store() {
  mint_ids
  echo "### Session store: disk (the default) against memory (wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 connections" f1k 64 "roam:--store disk" "roam:--store memory"
  small_case "100 KiB, 16 connections" f100k 16 "roam:--store disk" "roam:--store memory"
}

bench_mptcp() {
  mint_ids
  echo "### Multipath TCP listener (the default) against TCP only, TCP clients (wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 connections" f1k 64 "roam:--mptcp on" "roam:--mptcp off"
  small_case "100 KiB, 16 connections" f100k 16 "roam:--mptcp on" "roam:--mptcp off"
  WRK_FILE=f1k WRK_CONNS=64
  echo "#### New connection per 1 KiB request, 64 connections"
  echo
  interleave mptcp-accept handshake_once "roam:--mptcp on" "roam:--mptcp off"
  report mptcp-accept "req/s|p50|p99|errors" "roam:--mptcp on" "roam:--mptcp off"
}

# Evicts the cold files from the page cache (only them: POSIX_FADV_DONTNEED after a sync).
evict_cold() {
  sync
  python3 - "$root" <<'PY'
import glob, os, sys
for path in glob.glob(os.path.join(sys.argv[1], "cold*")):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}

# 16 downloads of cold 128 MiB files stream while wrk asks for 1 KiB: "p99 p50 req/s" of the
# 1 KiB requests (p99 first: the figure compared).
cold_once() {
  local id curls=() i
  id=$(head -n1 "$work/ids")
  for i in $(seq 1 16); do
    taskset -c "$LOAD_CORE" curl -s -o /dev/null -H "Range: bytes=0-" "http://$ADDR/$id/cold$i" &
    curls+=($!)
  done
  sleep 0.5
  WRK_FILE=f1k WRK_CONNS=16
  read -r r p50 p99 _ < <(wrk_once)
  kill "${curls[@]}" 2>/dev/null || true
  wait "${curls[@]}" 2>/dev/null || true
  echo "$p99 $p50 $r"
}

bench_cold() {
  mint_ids
  local i
  for i in $(seq 1 16); do
    head -c $((128 << 20)) /dev/urandom >"$root/cold$i"
    chmod 644 "$root/cold$i"
  done
  echo "### Cold files: 1 KiB requests (wrk, 16 connections, $DURATION) while 16 downloads of cold 128 MiB files stream ($RUNS interleaved rounds; page cache of those files dropped before each run)"
  echo
  interleave_cold() {
    local round spec
    mkdir -p "$work/res/cold"
    rm -f "$work/res/cold"/*
    for round in $(seq 0 $((RUNS - 1))); do
      for spec in "${cold_specs[@]}"; do
        evict_cold
        start_server "$spec"
        cold_once >>"$work/res/cold/$spec"
        stop_server
      done
    done
  }
  cold_specs=(roam nginx lighttpd)
  [ -n "${OTHER_ROAM:-}" ] && cold_specs+=(other-roam)
  interleave_cold
  report cold "1 KiB p99 ms|p50 ms|req/s" "${cold_specs[@]}"
  rm -f "$root"/cold*
}

bench_versus() {
  mint_ids
  echo "### roam against another build of roam ($OTHER_ROAM), wrk, $DURATION per run, $RUNS interleaved rounds"
  echo
  small_case "1 KiB, 64 connections" f1k 64 roam other-roam
  small_case "100 KiB, 16 connections" f100k 16 roam other-roam
}

bench_runtime() {
  mint_ids
  echo "### roam runtime shape on one core (wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  small_case "1 KiB, 64 connections" f1k 64 "roam:--runtime multi-thread" "roam:--runtime per-core"
  small_case "100 KiB, 16 connections" f100k 16 "roam:--runtime multi-thread" "roam:--runtime per-core"
}

# Memory store against the fleet's Redis store (a redis-server of its own, on the load core:
# this machine has two), runs interleaved (memory, redis, memory, redis, ...); reports the median
# of each and the median of the per-pair ratios, and Redis commands per request (INFO
# commandstats over the run, divided by wrk's request count), and the node's own CPU per request
# (what one node serves when Redis has a machine of its own).
bench_redis() {
  command -v redis-server >/dev/null || { echo "redis-server is required" >&2; exit 1; }
  mint_ids
  local rport
  rport=$(free_port)
  taskset -c "$LOAD_CORE" redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --daemonize no --logfile "$work/redis.log" &
  pids+=("$!")
  until redis-cli -p "$rport" ping 2>/dev/null | grep -q PONG; do sleep 0.05; done
  echo "### Session stores: memory vs Redis (wrk, $CONNECTIONS connections, $DURATION, $RUNS interleaved pairs)"
  echo
  echo "| file | requests | store | req/s (median) | p50 | p99 | Redis per request: scripts/reads/writes/other | redis/memory req/s (median of pairs) | node CPU µs per request (median) | memory/redis CPU per request (median of pairs) |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for file in f1k f100k; do
    for mode in range norange; do
      local mem=() red=() ratios=() cmds=() lat_m="" lat_r="" cpu_m=() cpu_r=() cpu_ratios=() cpu0
      for _ in $(seq "$RUNS"); do
        for store in memory redis; do
          local flag=memory
          [ "$store" = redis ] && flag="redis://127.0.0.1:$rport/"
          redis-cli -p "$rport" flushall >/dev/null
          redis-cli -p "$rport" config resetstat >/dev/null
          STORE="$flag" start_roam
          local args=("$file")
          if [ "$mode" = norange ]; then
            # Without Range every request is a resume decided by the store: first downloads,
            # then (sessions finished) 416s. Complete the sessions first, as in bench_answers.
            taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d2s -s scripts/wrk-sessions.lua \
              "http://$ADDR" -- "$file" "$work/ids" norange >/dev/null 2>&1 || true
            redis-cli -p "$rport" config resetstat >/dev/null
            cpu0=$(cpu_seconds "$PID")
            taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency --timeout 10s \
              -s scripts/wrk-sessions.lua "http://$ADDR" -- "$file" "$work/ids" norange >"$work/wrk.txt" 2>&1 || true
            local r p50 p99
            r=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
            p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
            p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
          else
            cpu0=$(cpu_seconds "$PID")
            read -r r p50 p99 _ < <(WRK_FILE="$file" WRK_CONNS="$CONNECTIONS" wrk_once)
          fi
          local n us
          n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
          # The node's own CPU per request: what one node can serve when Redis has a machine of
          # its own (here Redis shares the load generator's core, which lowers req/s).
          us=$(awk -v a="$cpu0" -v b="$(cpu_seconds "$PID")" -v n="$n" 'BEGIN { if (n > 0) printf "%.1f", (b - a) * 1e6 / n; else print 0 }')
          stop_server
          if [ "$store" = memory ]; then
            mem+=("$r"); lat_m="$p50 $p99"; cpu_m+=("$us")
          else
            red+=("$r"); lat_r="$p50 $p99"; cpu_r+=("$us")
            cpu_ratios+=("$(awk -v a="$us" -v b="${cpu_m[-1]}" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }')")
            local c
            # What the node asked of Redis: script calls (EVALSHA; one call carries many
            # sessions when written behind), records read (HMGET: one per session a script
            # handles, plus plain reads), records written (HSET) and other commands (PUBLISH,
            # EXISTS), each per request.
            c=$(redis-cli -p "$rport" info commandstats | tr -d '\r' |
              awk -F'[:=,]' '$1 == "cmdstat_evalsha" {e = $3} $1 == "cmdstat_hmget" {h = $3}
                $1 == "cmdstat_hset" {w = $3}
                $1 == "cmdstat_publish" || $1 == "cmdstat_exists" {o += $3}
                END {print e + 0, h + 0, w + 0, o + 0}')
            cmds+=("$(awk -v c="$c" -v n="$n" 'BEGIN { split(c, x, " "); if (n > 0) printf "%.2f/%.2f/%.2f/%.2f", x[1] / n, x[2] / n, x[3] / n, x[4] / n; else print "n/a" }')")
            ratios+=("$(awk -v a="$r" -v b="${mem[-1]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')")
          fi
        done
      done
      med() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }
      read -r p50 p99 <<<"$lat_m"
      echo "| $file | $mode | memory | $(med "${mem[@]}") | $p50 | $p99 | | | $(med "${cpu_m[@]}") | |"
      read -r p50 p99 <<<"$lat_r"
      echo "| $file | $mode | redis | $(med "${red[@]}") | $p50 | $p99 | $(med "${cmds[@]}") | $(med "${ratios[@]}") | $(med "${cpu_r[@]}") | $(med "${cpu_ratios[@]}") |"
    done
  done
  echo
}

bench_answers() {
  mint_ids
  echo "### roam's cheap answers (wrk, $CONNECTIONS connections, $DURATION, median of $RUNS)"
  echo
  echo "| request | req/s | p50 | p99 |"
  echo "|---|---|---|---|"
  start_roam
  answers_once() { # wrk arguments...
    taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$@" >"$work/wrk.txt" 2>&1 || true
    awk '/Requests\/sec/ {r=$2} $1 == "50%" {p=$2} $1 == "99%" {q=$2} END {print r, p, q}' "$work/wrk.txt"
  }
  median_of_runs() {
    local lines=()
    for _ in $(seq "$RUNS"); do lines+=("$("$@")"); done
    printf '%s\n' "${lines[@]}" | sort -g -k1,1 | sed -n "$(((RUNS + 1) / 2))p"
  }
  read -r r p50 p99 < <(median_of_runs answers_once "http://$ADDR/")
  echo "| GET / (mint an ID) | $r | $p50 | $p99 |"
  # Complete every session once, then every request is a repeat for a finished file.
  taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d2s -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" norange >/dev/null 2>&1 || true
  read -r r p50 p99 < <(median_of_runs answers_once -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" norange)
  echo "| GET /{id}/f1k, finished (416) | $r | $p50 | $p99 |"
  stop_server
  echo
}

echo "<!-- $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), roam $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+changes'), STORE=$STORE DURATION=$DURATION RUNS=$RUNS -->"
# The cost of the ops layer (issue 17: metrics counted on every response and body, the admin
# listener on, the access log off as by default) on the 1 KiB load test: this roam against
# OTHER_ROAM, a build from the commit before the ops layer. Interleaved rounds; per round the
# throughput and the server's CPU time per request (utime + stime over the run, divided by the
# requests wrk completed), which other load on the machine disturbs less than throughput. The
# measured server's /metrics must show the responses counted.
metrics_once() {
  local before after line reqs admin
  before=$(cpu_seconds "$PID")
  line=$(wrk_once)
  after=$(cpu_seconds "$PID")
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  admin=$(sed -n 's|roam admin listening on http://||p' "$work/roam.out")
  if [ -n "$admin" ]; then
    local text
    text=$(curl -sf "http://$admin/metrics")
    grep -q '^roam_responses_total{status="206"} [1-9]' <<<"$text" ||
      { echo "the measured server did not count its responses" >&2; cat "$work/wrk.txt" >&2; exit 1; }
  fi
  read -r rps p50 p99 _ <<<"$line"
  awk -v r="$rps" -v a="$after" -v b="$before" -v n="$reqs" -v p="$p50" -v q="$p99" \
    'BEGIN { printf "%s %.3f %s %s\n", r, (a - b) * 1e6 / n, p, q }'
}

bench_metrics() {
  [ -n "${OTHER_ROAM:-}" ] || { echo "metrics needs OTHER_ROAM: a roam built without the ops layer" >&2; exit 1; }
  mint_ids
  echo "### Cost of the ops layer: 1 KiB, 64 connections (wrk, $DURATION per run, $RUNS interleaved rounds)"
  echo
  WRK_FILE=f1k WRK_CONNS=64
  local ops="roam:--admin-listen 127.0.0.1:0"
  interleave metrics metrics_once "$ops" other-roam
  report metrics "req/s|CPU µs/req|p50 ms|p99 ms" "$ops" other-roam
  # The same rounds, ratios of CPU per request.
  mkdir -p "$work/res/metrics-cpu"
  local f
  for f in "$work/res/metrics"/*; do
    awk '{print $2, $1}' "$f" >"$work/res/metrics-cpu/$(basename "$f")"
  done
  report metrics-cpu "CPU µs/req|req/s" "$ops" other-roam
}

# The same comparison in instructions, which other load on the machine does not change:
# valgrind (cachegrind, no cache simulation) counts the instructions the server executes while
# curl fetches the 1 KiB file N times over one keep-alive connection (`Range: bytes=0-`, one ID:
# each request begins a new epoch of one session), for N = 2,000 and 20,000; the difference
# divided by 18,000 is one request's cost, start-up and shutdown cancelled out. RUNS interleaved
# pairs; the median of the per-pair ratios.
instructions_once() { # bin n -> instructions executed by the server
  local bin=$1 n=$2 out="$work/vg.out" err="$work/vg.err" pid addr id
  valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$bin" serve \
    --root "$root" --listen 127.0.0.1:0 --id-secret-file "$work/secret" --store memory \
    --workers 1 >"$out" 2>"$err" &
  pid=$!
  addr=""
  for _ in $(seq 600); do
    addr=$(sed -n 's|roam listening on http://||p' "$out")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "roam under valgrind did not start: $(cat "$err")" >&2; exit 1; }
  id=$(curl -s "http://$addr/")
  seq "$n" | sed "s|.*|url = \"http://$addr/$id/f1k\"|" >"$work/urls"
  [ "$(curl -s -H "Range: bytes=0-" -K "$work/urls" | wc -c)" -eq $((n * 1024)) ] ||
    { echo "curl did not get every body" >&2; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/I *refs/ {gsub(",", "", $4); print $4}' "$err"
}

bench_instructions() {
  [ -n "${OTHER_ROAM:-}" ] || { echo "instructions needs OTHER_ROAM: a roam built without the ops layer" >&2; exit 1; }
  command -v valgrind >/dev/null || { echo "valgrind is required" >&2; exit 1; }
  local bin=${ROAM_BIN:-target/release/roam}
  echo "### Cost of the ops layer in instructions per 1 KiB request (valgrind, $RUNS interleaved pairs)"
  echo
  echo "| pair | other-roam instructions/request | roam | ratio |"
  echo "|---|---|---|---|"
  local ratios=() i
  for i in $(seq "$RUNS"); do
    local b1 b2 o1 o2 base ops r
    b1=$(instructions_once "$OTHER_ROAM" 2000)
    o1=$(instructions_once "$bin" 2000)
    o2=$(instructions_once "$bin" 20000)
    b2=$(instructions_once "$OTHER_ROAM" 20000)
    base=$(((b2 - b1) / 18000))
    ops=$(((o2 - o1) / 18000))
    r=$(awk -v a="$ops" -v b="$base" 'BEGIN { printf "%.4f", a / b }')
    ratios+=("$r")
    echo "| $i | $base | $ops | $r |"
  done
  echo
  printf '%s\n' "${ratios[@]}" | sort -g |
    awk '{a[NR] = $1} END {m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "- roam / other-roam, instructions per request: median %.4f\n", m}'
  echo
}

case "${1:-all}" in
  small) bench_small ;;
  large) bench_large ;;
  conns) bench_conns ;;
  tls) bench_tls ;;
  accounting) bench_accounting ;;
  store) bench_store ;;
  mptcp) bench_mptcp ;;
  cold) bench_cold ;;
  versus) bench_versus ;;
  runtime) bench_runtime ;;
  answers) bench_answers ;;
  redis) bench_redis ;;
  idle) bench_idle ;;
  metrics) bench_metrics ;;
  instructions) bench_instructions ;;
  all) bench_small; bench_large; bench_conns; bench_idle; bench_tls; bench_accounting; bench_store; bench_mptcp; bench_cold; bench_runtime; bench_answers; bench_redis ;;
  *) echo "usage: $0 small|large|conns|idle|tls|accounting|store|mptcp|cold|versus|runtime|answers|redis|metrics|instructions|all" >&2; exit 2 ;;
esac
