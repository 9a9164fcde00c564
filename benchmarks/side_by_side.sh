#!/usr/bin/env bash
# Issue 4's side-by-side run: ember vs llama.cpp (built by ../shared/tools/peer-llamacpp) on the same
# GGUF, 2 threads, one after the other in the same session. Results land in $OUT (JSON + text).
#   usage: bash benchmarks/side_by_side.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-bench-results}
PEER=${PEER:-../shared/tools/peer-llamacpp}
mkdir -p "$OUT"
MODEL=$(python -c "from ember.loading.registry import pull; print(pull(progress=False))")
export OMP_NUM_THREADS=2

wait_up() { for _ in $(seq 1 240); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }

echo "== llama-bench (pp512, tg128)"
"$PEER" llama-bench -m "$MODEL" -t 2 -p 512 -n 128 -o json > "$OUT/llama-bench.json"

for q in none int8; do
  echo "== ember bench latency (quantization $q)"
  ember bench latency --threads 2 --quantization "$q" --pp 512 --tg 128 --json > "$OUT/ember-latency-$q.json"
done

echo "== llama-server --parallel 16 under 16 streams"
"$PEER" llama-server -m "$MODEL" -t 2 -c 8192 --parallel 16 --host 127.0.0.1 --port 8081 >"$OUT/llama-server.log" 2>&1 &
PID=$!; wait_up http://127.0.0.1:8081
ember bench serve --url http://127.0.0.1:8081 --num-prompts 16 --input-len 250 --output-len 128 --json > "$OUT/serve-llamacpp.json"
ember bench serve --url http://127.0.0.1:8081 --num-prompts 1 --input-len 250 --output-len 128 --json > "$OUT/serve1-llamacpp.json"
kill $PID; wait $PID 2>/dev/null || true

for q in none int8; do
  echo "== ember serve (quantization $q) under 16 streams"
  ember serve --quantization "$q" --port 8082 --max-num-batched-tokens 256 >"$OUT/ember-serve-$q.log" 2>&1 &
  PID=$!; wait_up http://127.0.0.1:8082
  ember bench serve --url http://127.0.0.1:8082 --num-prompts 16 --input-len 250 --output-len 128 --json > "$OUT/serve-ember-$q.json"
  ember bench serve --url http://127.0.0.1:8082 --num-prompts 1 --input-len 250 --output-len 128 --json > "$OUT/serve1-ember-$q.json"
  kill -TERM $PID; wait $PID || true
done

for policy in splitfuse prefill-first; do
  echo "== mixed workload, $policy"
  ember serve --scheduler "$policy" --port 8083 --max-num-batched-tokens 256 >"$OUT/ember-mixed-$policy.log" 2>&1 &
  PID=$!; wait_up http://127.0.0.1:8083
  ember bench mixed --url http://127.0.0.1:8083 --streams 8 --stream-output 256 --long-prompts 4 \
    --long-prompt-len 1500 --interval 2 --json > "$OUT/mixed-$policy.json"
  kill -TERM $PID; wait $PID || true
done
echo "done: $OUT"
