#!/usr/bin/env bash
# Speculative decoding side by side: ember serve without speculation and with each proposer, llama-server
# without and with its own speculation, each under `ember bench spec` on the same two prompt sets, one stream
# and 16 streams. Outputs of every ember run are compared with ember's run without speculation.
#   usage: benchmarks/spec_side_by_side.sh TEXT OUT [N]
#     TEXT: a public-domain text for the prompt sets (e.g. ../shared/data/austen/emma.txt); N prompts per set
#   env: M (the GGUF, default: the default model), LLAMA (the peer's runner, default ../shared/tools/peer-llamacpp),
#        CONFIGS (which runs, default: every one below; base-int8 is the reference of the -int8 runs)
set -u
TEXT=$1; OUT=$2; N=${3:-16}
M=${M:-$(python -c 'from ember.loading.registry import pull; print(pull(progress=False))')}
LLAMA=${LLAMA:-../shared/tools/peer-llamacpp}
CONFIGS=${CONFIGS:-"base ngram swift base-int8 ngram-int8 draft-int8 llama llama-ngram-simple llama-ngram-mod llama-draft"}
PORT=8123
mkdir -p "$OUT"
python benchmarks/spec_prompts.py --text "$TEXT" --out "$OUT/prompts" --n "$N" >/dev/null

wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

measure() {  # name
  for set in input_grounded open_ended; do
    for streams in 1 16; do
      ref=()
      base=base; case $1 in *-int8) base=base-int8 ;; esac
      [ "$1" != $base ] && [ -f "$OUT/$base-$set-$streams.json" ] && ref=(--reference "$OUT/$base-$set-$streams.json")
      ember bench spec --url "http://127.0.0.1:$PORT" --prompts "$OUT/prompts/$set.jsonl" --streams "$streams" \
        --json --save-outputs "$OUT/$1-$set-$streams.json" "${ref[@]}" > "$OUT/$1-$set-$streams.summary.json" \
        || echo "bench failed: $1 $set $streams" >&2
    done
  done
}

NGRAM='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}'
for name in $CONFIGS; do
  args=()
  case $name in  # ember: -int8 runs re-quantize the weights to int8 (per channel), whose extra rows cost less
    ngram|ngram-int8) args=(--speculative-config "$NGRAM") ;;
    draft-int8) args=(--speculative-config "{\"method\": \"draft\", \"model\": \"$M\", \"quantization\": \"int4\"}") ;;
    swift) args=(--speculative-config '{"method": "swift"}') ;;
  esac
  case $name in *-int8) args+=(-q int8) ;; esac
  srv=("$LLAMA" llama-server -m "$M" -t 2 -c 8192 --parallel 16 --host 127.0.0.1 --port $PORT)
  case $name in
    llama) "${srv[@]}" >"$OUT/$name.log" 2>&1 & ;;
    llama-ngram-simple|llama-ngram-mod|llama-ngram-cache) "${srv[@]}" --spec-type "${name#llama-}" >"$OUT/$name.log" 2>&1 & ;;
    llama-draft) "${srv[@]}" -md "$M" --spec-type draft-simple >"$OUT/$name.log" 2>&1 & ;;
    *) ember serve "$M" --port $PORT --max-num-seqs 16 "${args[@]}" >"$OUT/$name.log" 2>&1 & ;;
  esac
  pid=$!
  if wait_up; then measure "$name"; else echo "$name did not start (see $OUT/$name.log)" >&2; fi
  kill "$pid"; wait "$pid" 2>/dev/null
done
python - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| run | set | streams | output tok/s | decode tok/s (mean per request) | acceptance | identical to base |")
print("|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.summary.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        continue
    name = f.name.split("-input_grounded")[0].split("-open_ended")[0]
    acc = r.get("acceptance_rate")
    same = f"{r['identical_outputs']}/{r['compared_outputs']}" if "identical_outputs" in r else "-"
    print(f"| {name} | {pathlib.Path(r['prompts']).stem} | {r['streams']} | {r['output_throughput']:.1f} | "
          f"{r['decode_tok_s_mean']:.1f} | {'-' if acc is None else f'{acc:.2f}'} | {same} |")
print()
print("One stream, decode tok/s (mean per request) by kind of prompt:")
for f in sorted(out.glob("*-1.summary.json")):
    r = json.loads(f.read_text())
    kinds = r.get("decode_tok_s_by_kind") or {}
    if len(kinds) > 1:
        print(f"- {f.name.removesuffix('-1.summary.json')}: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()))
EOF
