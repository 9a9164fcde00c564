#!/usr/bin/env bash
# Issue 5's peer rows: llama.cpp's own Q8_0 / Q4_0 / Q4_K_M, made by llama-quantize from a float32
# GGUF of the same weights ember runs, scored by ember's protocol (`ember eval ppl`: every token of
# each window but the first) and by llama-perplexity's own (second half of each window), plus
# llama-bench tg128 and the size on disk.
#   usage: bash benchmarks/llamacpp_quant_rows.sh EVAL.txt [OUT_DIR] [WINDOWS]
set -euo pipefail
EVAL=$1; OUT=${2:-bench-results/peer-quant}; WINDOWS=${3:-20}
PEER=${PEER:-../shared/tools/peer-llamacpp}
mkdir -p "$OUT"
MODEL=$(python -c "from ember.loading.registry import pull; print(pull(progress=False))")
[ -f "$OUT/smollm2-f32.gguf" ] || python benchmarks/gguf_to_float.py "$MODEL" "$OUT/smollm2-f32.gguf"
for q in Q8_0 Q4_0 Q4_K_M; do
  [ -f "$OUT/smollm2-$q.gguf" ] || "$PEER" llama-quantize "$OUT/smollm2-f32.gguf" "$OUT/smollm2-$q.gguf" $q > "$OUT/quant-$q.log" 2>&1
done
for f in "$MODEL" "$OUT"/smollm2-f32.gguf "$OUT"/smollm2-Q8_0.gguf "$OUT"/smollm2-Q4_0.gguf "$OUT"/smollm2-Q4_K_M.gguf; do
  name=$(basename "$f" .gguf)
  ember_ppl=$(ember eval ppl "$f" --text "$EVAL" --ctx 512 --windows "$WINDOWS" --json | python -c "import json,sys; print(round(json.load(sys.stdin)['ppl'], 3))")
  peer_ppl=$("$PEER" llama-perplexity -m "$f" -f "$EVAL" -c 512 --chunks "$WINDOWS" -t 2 2>&1 | grep -o "Final estimate: PPL = [0-9.]*" | grep -o "[0-9.]*$")
  tg=$("$PEER" llama-bench -m "$f" -t 2 -p 0 -n 128 -o json | python -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'], 1))")
  mib=$(python -c "import os; print(round(os.path.getsize('$f') / 2**20, 1))")
  echo "{\"file\": \"$name\", \"ember_ppl\": $ember_ppl, \"llama_perplexity\": $peer_ppl, \"llama_bench_tg128\": $tg, \"disk_mib\": $mib}" | tee -a "$OUT/rows.jsonl"
done
