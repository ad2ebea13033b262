#!/usr/bin/env bash
# The engine's greedy tokens with each attention implementation on the GPU, one line each into $OUT/engine.txt:
#   bash benchmarks/engine_check.sh "float16:pallas float16:xla bfloat16:cudnn"
# gpt2-124m (12 heads x 64: prefill takes the Hopper kernel on sm_90), random weights, prompts of 3, 300 and
# 165 tokens, 24 new tokens; then whether the rows agree with the xla row of the same dtype.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
for run in ${1:-float16:pallas float16:xla}; do
  dtype=${run%%:*} impl=${run##*:}
  ids=$(timeout "${T_ENGINE:-90}" python3 -m gptjax generate --model gpt2-124m --dtype "$dtype" --greedy \
    --max-new-tokens 24 --json --attention "$impl" --prompt-ids 5,17,99 --prompt-ids "$(seq -s, 1 300)" \
    --prompt-ids "$(seq -s, 7 3 500)" 2>>"$OUT/engine.log" | python3 -c 'import json, sys; print(json.dumps([json.loads(l)["output_ids"] for l in sys.stdin]))')
  echo "$dtype $impl $ids" >> "$OUT/engine.txt"
done
python3 - "$OUT/engine.txt" <<'PY'
import json, sys
rows = [line.split(" ", 2) for line in open(sys.argv[1])]
xla = {d: json.loads(ids) for d, i, ids in rows if i == "xla"}
for d, impl, ids in rows:
    got = json.loads(ids)
    if d in xla and impl != "xla":
        print(d, impl, "rows equal to xla:", [a == b for a, b in zip(got, xla[d])])
PY
