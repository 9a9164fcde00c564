#!/usr/bin/env bash
# Generation past the context, side by side: llama-server's context shift (--context-shift --keep 4: the first
# 4 tokens kept, the oldest half of the rest dropped when the cache is full, keys re-rotated: "technically"
# StreamingLLM, says ggerganov) against `ember serve --long-context streaming` with the same cache of CTX
# tokens (4 sinks + a window of CTX - 4). One request, a short prompt, OUT tokens with EOS ignored, greedy;
# decode tok/s from each server's own timings, then each server's resident memory.
#   usage: bash benchmarks/long_generation_vs_llamacpp.sh [CTX] [OUT]
set -euo pipefail
CTX=${1:-512}; OUT=${2:-4096}
PEER=${PEER:-../shared/tools/peer-llamacpp}
MODEL=$(python -c "from ember.loading.registry import pull; print(pull(progress=False))")
PROMPT="Write a very long story about a lighthouse keeper and the ships she watches over."

"$PEER" llama-server -m "$MODEL" -c "$CTX" -t 2 --context-shift --keep 4 --port 8291 >/tmp/peer_long.log 2>&1 &
PEER_PID=$!
ember serve --long-context streaming --attention-sinks 4 --attention-window $((CTX - 4)) --max-num-seqs 1 \
  --port 8292 >/tmp/ember_long.log 2>&1 &
EMBER_PID=$!
trap 'kill $PEER_PID $EMBER_PID 2>/dev/null || true' EXIT
for port in 8291 8292; do
  for _ in $(seq 120); do curl -sf localhost:$port/health >/dev/null && break; sleep 1; done
done

peer=$(curl -s localhost:8291/completion -d "{\"prompt\": \"$PROMPT\", \"n_predict\": $OUT, \"ignore_eos\": true,
  \"temperature\": 0, \"cache_prompt\": false}" | python -c "import json,sys; t=json.load(sys.stdin)['timings'];
print(f\"{t['predicted_n']} tokens, {t['predicted_per_second']:.1f} tok/s\")")
echo "llama.cpp context shift (-c $CTX --keep 4): $peer, RSS $(ps -o rss= -p $(pgrep -f 'port 8291' | head -1)) KiB"

ember=$(python - "$OUT" "$PROMPT" <<'EOF'
import sys, time, openai
out, prompt = int(sys.argv[1]), sys.argv[2]
c = openai.OpenAI(base_url="http://127.0.0.1:8292/v1", api_key="x")
model = c.models.list().data[0].id
first, n = None, 0
for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=out, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True}, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].text and first is None:
        first = time.perf_counter()
    if chunk.usage:
        n = chunk.usage.completion_tokens
print(f"{n} tokens, {(n - 1) / (time.perf_counter() - first):.1f} tok/s")
EOF
)
echo "ember --long-context streaming (4 sinks + window $((CTX - 4))): $ember, RSS $(ps -o rss= -p $EMBER_PID) KiB"
