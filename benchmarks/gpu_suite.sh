#!/usr/bin/env bash
# The GPU run behind benchmarks/RESULTS.md: every shape of the seed's benchmark for megatron-345m (fp16) and
# gpt3-6.7b (bf16), gptjax beside the Hugging Face peers in one process per model, then through the server,
# then the plot. Results go to $OUT (default ./out) as JSON lines.
#   bash benchmarks/gpu_suite.sh [inprocess|server|plot|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
part=${1:-all}
bench() { timeout "${BENCH_TIMEOUT:-400}" python -m gptjax bench "$@" --json | tee -a "$OUT/bench.jsonl"; }

if [[ $part == inprocess || $part == all ]]; then
  bench --model megatron-345m --dtype float16 --shapes 8,512,16 1,128,128 64,128,128 256,128,128 -n 5 --peer hf
  bench --model megatron-345m --dtype float16 --shapes 8,512,16 1,128,128 -n 5 --peer hf-compiled \
    | grep '"hf-compiled"' >> "$OUT/bench.jsonl"
  bench --model gpt3-6.7b --dtype bfloat16 --shapes 8,512,16 1,128,128 64,128,128 -n 3 --peer hf
  bench --model gpt3-6.7b --dtype bfloat16 --shapes 256,128,128 -n 3
fi

if [[ $part == server || $part == all ]]; then
  cfg=$(mktemp --suffix .toml)
  printf '[engine]\nmax_slots = 64\nmax_seq_len = 640\ndecode_steps_per_call = 8\nmax_queued_requests = 1024\n' > "$cfg"
  python -m gptjax serve --model megatron-345m --dtype float16 --config "$cfg" --port 8011 > "$OUT/server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do python -m gptjax client --server 127.0.0.1:8011 --prompt-ids 1,2 --max-new-tokens 1 \
      >/dev/null 2>&1 && break; sleep 1; done
  bench --model megatron-345m --dtype float16 --server 127.0.0.1:8011 --shapes 8,512,16 1,128,128 64,128,128 -n 5
  kill -TERM $server; wait $server
fi

if [[ $part == plot || $part == all ]]; then
  python benchmarks/plot.py "$OUT/bench.jsonl" "$OUT/bench.png"
fi
