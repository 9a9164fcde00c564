#!/usr/bin/env bash
# Two checkouts of ember (e.g. `git worktree add /tmp/old <commit>`), measured alternately in one session on the
# default model, ROUNDS times: single-stream tg128 / pp512 (`bench latency`), 16 concurrent streams
# (`bench serve` against `ember serve`, 250-token prompts, 128 tokens out), and the mixed workload (8 streams
# while 8 prompts of 1500 tokens arrive; SplitFuse with --itl-target auto). JSON per run lands in OUT.
#   usage: bash benchmarks/ab_trees.sh OLD_TREE NEW_TREE [OUT_DIR] [ROUNDS]
set -euo pipefail
OLD=$1 NEW=$2 OUT=${3:-ab-results} ROUNDS=${4:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=2
wait_up() { for _ in $(seq 1 240); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }
run_ember() { local tree=$1; shift; (cd "$tree" && exec python -c "from ember.cli import main; main()" "$@"); }
serve_bg() {  # TREE LOG FLAGS...: start `ember serve` on port 8090 in the background; PID names the server itself
  local tree=$1 log=$2; shift 2
  (cd "$tree" && exec python -c "from ember.cli import main; main()" serve --port 8090 "$@") > "$log" 2>&1 &
  PID=$!
}

measure() {  # TREE NAME ROUND
  local tree=$1 name=$2 r=$3
  echo "== $name round $r: bench latency"
  run_ember "$tree" bench latency --threads 2 --pp 512 --tg 128 -r 2 --json > "$OUT/latency-$name-$r.json"
  echo "== $name round $r: 16 streams"
  serve_bg "$tree" "$OUT/serve-$name-$r.log"; wait_up http://127.0.0.1:8090
  run_ember "$tree" bench serve --url http://127.0.0.1:8090 --num-prompts 16 --input-len 250 --output-len 128 \
    --json > "$OUT/serve16-$name-$r.json"
  kill -TERM $PID; wait $PID || true
  echo "== $name round $r: mixed"
  serve_bg "$tree" "$OUT/mixed-$name-$r.log" --max-num-batched-tokens 2048 --itl-target auto
  wait_up http://127.0.0.1:8090
  run_ember "$tree" bench mixed --url http://127.0.0.1:8090 --streams 8 --stream-output 128 --long-prompts 8 \
    --long-prompt-len 1500 --interval 2 --json > "$OUT/mixed-$name-$r.json"
  kill -TERM $PID; wait $PID || true
}

for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then measure "$OLD" old "$r"; measure "$NEW" new "$r"
  else measure "$NEW" new "$r"; measure "$OLD" old "$r"; fi
done
echo "done: $OUT"
