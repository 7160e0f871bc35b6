#!/usr/bin/env bash
# docs/questions.md (d): an interrupted curl (-m 2, --limit-rate 2m) asked again without Range,
# directly and through nginx (buffering on and off), then resumed with curl -C -. Needs curl and
# nginx; ports 18091-18092 on loopback; prints one line per run.
set -u
cd "$(dirname "$0")/.."
ROAM=${ROAM:-$PWD/target/release/roam}   # cargo build --release first
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf $W' EXIT
mkdir -p $W/root $W/ng/tmp $W/ng/logs; head -c 50000000 /dev/urandom > $W/root/big.bin
$ROAM serve --root $W/root --listen 127.0.0.1:0 > $W/roam.out 2>/dev/null &
for i in $(seq 100); do grep -q listening $W/roam.out && break; sleep 0.05; done
R=$(sed -n 's/.*http:\/\///p' $W/roam.out)
conf() { cat > $W/ng/nginx-$1.conf <<CONF
daemon off; master_process off; worker_processes 1; pid $W/ng/nginx-$1.pid;
error_log $W/ng/logs/error-$1.log; events {}
http { access_log off; client_body_temp_path $W/ng/tmp/b; proxy_temp_path $W/ng/tmp/p;
  fastcgi_temp_path $W/ng/tmp/f; uwsgi_temp_path $W/ng/tmp/u; scgi_temp_path $W/ng/tmp/s;
  upstream roam { server $R; keepalive 8; }
  server { listen 127.0.0.1:$2; location / { proxy_pass http://roam; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_buffering $1; } } }
CONF
}
conf off 18091; conf on 18092
/usr/sbin/nginx -p $W/ng -c $W/ng/nginx-off.conf & /usr/sbin/nginx -p $W/ng -c $W/ng/nginx-on.conf &
# nginx takes a moment to listen.
for port in 18091 18092; do
  for i in $(seq 100); do curl -s -o /dev/null 127.0.0.1:$port && break; sleep 0.05; done
done
for path in "direct http://$R" "nginx-buffering-off http://127.0.0.1:18091" "nginx-buffering-on http://127.0.0.1:18092"; do
  name=${path%% *}; P=${path#* }
  for run in 1 2 3; do
    ID=$(curl -s $P/); cd $W
    curl -s -m 2 --limit-rate 2m -o part $P/$ID/big.bin; HAD=$(stat -c %s part)
    sleep 0.3
    curl -s -D h -o rest $P/$ID/big.bin
    ST=$(head -1 h | tr -d '\r'); START=$(tr -d '\r' < h | sed -n 's/^content-range: bytes \([0-9]*\)-.*/\1/Ip')
    OFF=$(tr -d '\r' < h | sed -n 's/^roam-offset: //Ip')
    cp part part2; curl -s -C - -o part2 $P/$ID/big.bin; cmp -s part2 root/big.bin && C=exact || C=DIFFERS
    if [ -n "$START" ]; then D="start-had=$((START-HAD))"; else D="whole=$(cmp -s rest root/big.bin && echo exact || echo no)"; fi
    echo "$name run $run: had $HAD; resume without Range: $ST roam-offset=$OFF $D; curl -C -: $C"
  done
done
