#!/usr/bin/env bash
# The GPU run behind benchmarks/RESULTS.md: the seed's benchmark shapes for megatron-345m (fp16, beside the
# Hugging Face peer in the same process) and gpt3-6.7b (bf16), in-process and through the server, then the
# plot. Rows go to $OUT (default ./out) as JSON lines.
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench() { local t=$1; shift; timeout "$t" python -m gptjax bench "$@" --json | tee -a "$OUT/bench.jsonl"; }

bench 230 --model megatron-345m --dtype float16 --shapes 8,512,16 1,128,128 64,128,128 256,128,128 -n 3 --peer hf
bench 170 --model gpt3-6.7b --dtype bfloat16 --shapes 1,128,128 8,512,16 64,128,128 -n 3

cfg=$(mktemp --suffix .toml)
printf '[engine]\nmax_slots = 8\nmax_seq_len = 640\ndecode_steps_per_call = 8\n' > "$cfg"
python -m gptjax serve --model megatron-345m --dtype float16 --config "$cfg" --port 8011 > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 150); do
  python -m gptjax client --server 127.0.0.1:8011 --prompt-ids 1,2 --max-new-tokens 1 >/dev/null 2>&1 && break
  sleep 1
done
bench 120 --model megatron-345m --dtype float16 --server 127.0.0.1:8011 --shapes 8,512,16 1,128,128 -n 3
kill -TERM $server; wait $server
python benchmarks/plot.py "$OUT/bench.jsonl" "$OUT/bench.png"
