#!/usr/bin/env bash
# Issue 5's peer rows for KV-cache quantization: llama-perplexity on the default model with its KV cache
# in f16 / q8_0 / q4_0 (-ctk/-ctv, flash attention on, as llama.cpp requires for a quantized V cache),
# at the same context as ember's KIVI rows. llama-perplexity scores the second half of each window and
# runs each window as one batch, so compare the relative change against its own f16 row.
#   usage: bash benchmarks/llamacpp_kv_rows.sh EVAL.txt [CTX] [CHUNKS]
set -euo pipefail
EVAL=$1; CTX=${2:-2048}; CHUNKS=${3:-5}
PEER=${PEER:-../shared/tools/peer-llamacpp}
MODEL=$(python -c "from ember.loading.registry import pull; print(pull(progress=False))")
for t in f16 q8_0 q4_0; do
  ppl=$("$PEER" llama-perplexity -m "$MODEL" -f "$EVAL" -c "$CTX" --chunks "$CHUNKS" -t 2 -fa on -ctk $t -ctv $t 2>&1 \
        | grep -o "Final estimate: PPL = [0-9.]*" | grep -o "[0-9.]*$")
  echo "{\"kv_cache\": \"$t\", \"llama_perplexity\": $ppl, \"ctx\": $CTX, \"chunks\": $CHUNKS}"
done
