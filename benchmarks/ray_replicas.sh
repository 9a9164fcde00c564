#!/usr/bin/env bash
# Replicas on Ray Serve against one process, on the same cores, one server at a time, each measured by
# `ember bench serve`:
#   1. load: 1 process x 2 threads (no Ray) against `--replicas 2` (2 x 1 thread): throughput, TTFT, ITL;
#   2. shared prefixes (vLLM's prefix-repetition: NP prefixes of PL tokens, each request one of them + 20 tokens
#      of its own, 16 generated): prefix-cache hit rate and TTFT for one process and for 2 replicas under each
#      --router (prefix, ray-prefix, pow2, random);
#   3. Ray's overhead per request: 40 sequential 1-token requests on a 4-word prompt, one process against
#      `--replicas 2` (the difference of the mean end-to-end latencies).
#   usage: bash benchmarks/ray_replicas.sh [NP] [PL] [N]     (defaults 8 1000 64)
set -euo pipefail
NP=${1:-8}; PL=${2:-1000}; N=${3:-64}
PORT=8391
OUT=${OUT:-/tmp/ray_replicas}
mkdir -p "$OUT"
SERVER_PID=

start() {  # start NAME ARGS...: an `ember serve` on $PORT, waited for
  local name=$1; shift
  ember serve --port $PORT "$@" >"$OUT/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    curl -sf localhost:$PORT/v1/models >/dev/null 2>&1 && break
    kill -0 $SERVER_PID 2>/dev/null || { tail -20 "$OUT/$name.log"; exit 1; }
    sleep 1
  done
  sleep 3  # every replica up (the models endpoint answers once one is)
}
stop() { kill -TERM $SERVER_PID; wait $SERVER_PID || true; }
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT

bench() {  # bench NAME ARGS...: one `ember bench serve` run, JSON kept
  local name=$1; shift
  ember bench serve --url http://127.0.0.1:$PORT --json "$@" >"$OUT/$name.json"
}
load=(--num-prompts 32 --input-len 250 --output-len 128 --max-concurrency 16)
shared=(--dataset prefix-repetition --prefix-repetition-num-prefixes "$NP" --prefix-repetition-prefix-len "$PL"
        --input-len 20 --output-len 16 --num-prompts "$N" --max-concurrency 4)
tiny=(--num-prompts 40 --input-len 4 --output-len 1 --max-concurrency 1)

start one
bench one-load "${load[@]}"
bench one-shared "${shared[@]}"
bench one-tiny "${tiny[@]}"
stop
for router in prefix ray-prefix pow2 random; do
  start "ray-$router" --replicas 2 --router "$router"
  [ "$router" = prefix ] && bench ray-prefix-load "${load[@]}" && bench ray-prefix-tiny "${tiny[@]}"
  bench "ray-$router-shared" "${shared[@]}"
  stop
done

python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
r = lambda name: json.load(open(f"{out}/{name}.json"))
print(f"machine: {r('one-load')['machine']}")
print("\n| load (32 requests, 250 in / 128 out, 16 at once) | output tok/s | mean TTFT ms | median ITL ms |")
print("|---|---|---|---|")
for name, label in (("one-load", "1 process x 2 threads"), ("ray-prefix-load", "2 replicas x 1 thread")):
    x = r(name)
    print(f"| {label} | {x['output_throughput']:.1f} | {x['ttft_ms_mean']:.0f} | {x['itl_ms_p50']:.1f} |")
print("\n| shared prefixes | hit rate | mean TTFT ms | p99 TTFT ms | requests per replica |")
print("|---|---|---|---|---|")
for name, label in (("one-shared", "1 process"), ("ray-prefix-shared", "2 replicas, prefix (ember)"),
                    ("ray-ray-prefix-shared", "2 replicas, ray-prefix (Ray's PrefixCacheAffinityRouter)"),
                    ("ray-pow2-shared", "2 replicas, pow2 (Ray's default)"),
                    ("ray-random-shared", "2 replicas, random")):
    x = r(name)
    per = "/".join(str(v) for v in x.get("requests_per_replica", {}).values()) or "-"
    print(f"| {label} | {x.get('prefix_cache_hit_rate', float('nan')):.3f} | {x['ttft_ms_mean']:.0f} | "
          f"{x['ttft_ms_p99']:.0f} | {per} |")
one, ray = r("one-tiny"), r("ray-prefix-tiny")
print(f"\nRay overhead per request (40 sequential 1-token requests): one process {one['e2e_ms_mean']:.1f} ms, "
      f"2 replicas {ray['e2e_ms_mean']:.1f} ms: {ray['e2e_ms_mean'] - one['e2e_ms_mean']:.1f} ms")
EOF
