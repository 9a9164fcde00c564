#!/usr/bin/env bash
# llama.cpp's cost of grammar-constrained decoding, the peer of benchmarks/structured_cost.py: llama-server (2
# threads, 1 slot) on the default model's GGUF answers structured_cost.py's request at 1 stream (a chat message,
# greedy, TOKENS tokens) plain (EOS ignored) and with its JSON schema as response_format, RUNS times each,
# alternating; decode ms/token from the server's own timings, medians. Then, the server stopped, ember's
# `python benchmarks/structured_cost.py --streams STREAMS` runs in the same session.
#   usage: bash benchmarks/structured_peer.sh [RUNS] [TOKENS] [STREAMS]    (defaults 5, 128, 1,16)
set -euo pipefail
RUNS=${1:-5}; TOKENS=${2:-128}; STREAMS=${3:-1,16}
PEER=${PEER:-../shared/tools/peer-llamacpp}
PORT=${PORT:-8391}
cd "$(dirname "$0")/.."
MODEL=$(python -c "from ember.loading.registry import pull; print(pull(progress=False))")

"$PEER" llama-server -m "$MODEL" -t 2 -c 4096 --parallel 1 --host 127.0.0.1 --port "$PORT" \
  >/tmp/structured_peer.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
echo "llama.cpp: $("$PEER" llama-server --version 2>&1 | grep -m1 version || true); load: $(uptime | sed 's/.*load/load/')"

python - "$PORT" "$RUNS" "$TOKENS" <<'EOF'
import json, statistics, sys, urllib.request
sys.path.insert(0, "benchmarks")
from structured_cost import SCHEMA  # the same schema and prompt as ember's figure

port, runs, tokens = (int(x) for x in sys.argv[1:4])
prompt = [{"role": "user", "content": "Write story number 0 about a lighthouse, as JSON."}]

def ask(constrained: bool) -> tuple[int, float, str]:
    body = {"messages": prompt, "max_tokens": tokens, "temperature": 0, "cache_prompt": False}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=900))
    t = out["timings"]
    return t["predicted_n"], t["predicted_per_token_ms"], out["choices"][0]["message"]["content"]

ask(False); ask(True)  # warm-up
rows = {False: [], True: []}
print("| run | 1-min load before | plain: tokens, ms/token | json schema: tokens, ms/token |\n|---|---|---|---|")
for r in range(runs):
    load = open("/proc/loadavg").read().split()[0]
    plain, json_ = ask(False), ask(True)
    rows[False].append(plain[1]); rows[True].append(json_[1])
    print(f"| {r + 1} | {load} | {plain[0]}, {plain[1]:.2f} | {json_[0]}, {json_[1]:.2f} |")
text = json_[2].lstrip()
shape = ("a complete object of the schema" if text.endswith("}") and sorted(json.loads(text)) == sorted(SCHEMA["required"])
         else "the schema's object, cut at max_tokens" if text.startswith("{") and text[1:].lstrip().startswith('"title"')
         else "NOT the schema's object: is the constraint applied?")
p, j = statistics.median(rows[False]), statistics.median(rows[True])
d = [b - a for a, b in zip(rows[False], rows[True])]
print(f"\nllama.cpp, 1 stream, medians of {runs}: plain {p:.2f} ms/token ({1000 / p:.1f} tok/s), json schema "
      f"{j:.2f} ms/token ({1000 / j:.1f} tok/s): the constraint costs {j - p:+.2f} ms/token ({100 * (j - p) / p:+.1f}%)"
      f"; paired (each run's json minus plain), median {statistics.median(d):+.2f} ms/token"
      f"; the constrained reply is {shape}")
EOF
kill $SERVER 2>/dev/null || true
wait $SERVER 2>/dev/null || true
echo
echo "ember (load: $(uptime | sed 's/.*load/load/')):"
python benchmarks/structured_cost.py --streams "$STREAMS" --tokens "$TOKENS"
