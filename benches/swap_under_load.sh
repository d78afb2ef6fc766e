#!/usr/bin/env bash
# Zero-downtime check with numbers: 12 s of HTTP JSON batch-1 load at 16 connections against the
# example MLP in explicit control mode; with "swap", version 2 appears and is loaded at 3 s (v1 is
# drained and unloaded) and v2 is reloaded with a config override at 6 s. Compare the printed
# requests/errors/latencies of `swap` and `steady` runs taken one after the other.
#   cargo build --release -p fastserve-loadgen && benches/swap_under_load.sh steady && benches/swap_under_load.sh swap
set -euo pipefail
mode=${1:?usage: swap_under_load.sh steady|swap}
root=$(cd "$(dirname "$0")/.." && pwd)
loadgen=${CARGO_TARGET_DIR:-$root/target}/release/fastserve-loadgen
port=${PORT:-18200}
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
cp -r "$root/examples/models/mlp" "$repo/"
python -m fastserve serve --model-repository "$repo" --model-control-mode explicit --load-model mlp \
    --http-port "$port" --grpc-port 0 --no-metrics --log-level warning &
server=$!
for _ in $(seq 100); do curl -sf "localhost:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
"$loadgen" --url "http://127.0.0.1:$port" --protocol http --concurrency 16 --duration-s 12 --warmup-s 0 --json \
    >"$repo/result.json" &
load=$!
if [ "$mode" = swap ]; then
    sleep 3
    cp -r "$repo/mlp/1" "$repo/mlp/2"
    curl -sf -o /dev/null -w "load v2 (v1 unloads): %{http_code} in %{time_total}s\n" -X POST \
        "localhost:$port/v2/repository/models/mlp/load"
    sleep 3
    curl -sf -o /dev/null -w "reload v2 with an override: %{http_code} in %{time_total}s\n" -X POST \
        "localhost:$port/v2/repository/models/mlp/load" -d '{"parameters": {"config": "{\"max_batch_size\": 32}"}}'
fi
wait "$load"
kill -TERM "$server"
wait "$server"
python - "$mode" "$repo/result.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
lat = d["latency_us"]
print(f"{sys.argv[1]}: {d['requests']} requests, {d['errors']} errors, {d['requests_per_s']:.0f} req/s, "
      f"p50 {lat['p50']} us, p99 {lat['p99']} us, max {lat['max']} us")
PY
