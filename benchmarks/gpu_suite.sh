#!/usr/bin/env bash
# The GPU run behind benchmarks/RESULTS.md: the seed's four shapes for one model, gptjax beside the Hugging
# Face peers in the same process, then through the server. Rows are appended to $OUT/bench.jsonl (default
# ./out) as each shape finishes; plot them with `python benchmarks/plot.py out/bench.png out/bench.jsonl`.
#   bash benchmarks/gpu_suite.sh 345m [inproc|server]    # megatron-345m fp16, peers hf and hf-compiled
#   bash benchmarks/gpu_suite.sh 6.7b [inproc|server]    # gpt3-6.7b bf16, peer hf
# (both parts by default; the server part measures both client APIs of `gptjax bench --server-api`, and
# SERVER_APIS narrows them). `hf-compiled` runs the two shapes its static cache compiles for in reasonable
# time (COMPILED_SHAPES; at batch 64 and 256 its compiles ran past a 10-minute call on the H100). The
# processes of one suite share a JAX compilation cache, so the second peer's process does not compile gptjax
# again. The 6.7B server holds 256 slots on a GPU of more than 100 GB (one wave at batch 256), else 128.
# On one H200 (run 5, one client API) the 345M suite took 6 minutes, the 6.7B one 9 (in-process 6, server 3).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gptjax-jax-cache}
gpu_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
all_shapes="8,512,16 1,128,128 64,128,128 256,128,128"
case "${1:-345m}" in
  345m) model="--model megatron-345m --dtype float16"; peers="hf hf-compiled"; slots=256; seq=640; t_in=270 ;;
  6.7b) model="--model gpt3-6.7b --dtype bfloat16"; peers="hf"; seq=528; t_in=420
        slots=$([ "${gpu_mb:-0}" -gt 100000 ] && echo 256 || echo 128) ;;
  *) echo "usage: $0 345m|6.7b" >&2; exit 2 ;;
esac
bench() { local t=$1; shift; timeout "$t" python -m gptjax bench $model "$@" --json | tee -a "$OUT/bench.jsonl"; }

part=${2:-all}
SHAPES=${SHAPES:-$all_shapes}  # the environment may narrow the shapes, peers and time (a run cut short)
peers=${PEERS:-$peers}
t_in=${T_IN:-$t_in}  # seconds for each in-process run
compiled_shapes=${COMPILED_SHAPES:-"8,512,16 1,128,128"}
slots=${SLOTS:-$slots}
if [ "$part" != server ]; then
  for peer in $peers; do  # one process per peer: a slow torch.compile can't take the other's rows with it
    shapes=$SHAPES
    [ "$peer" = hf-compiled ] && shapes=$(for s in $SHAPES; do [[ " $compiled_shapes " == *" $s "* ]] && echo "$s"; done)
    [ -n "$shapes" ] && bench "$t_in" --shapes $shapes -n 3 --peer "$peer"
  done
fi
[ "$part" = inproc ] && exit 0

cfg=$(mktemp --suffix .toml)
printf '[engine]\nmax_slots = %d\nmax_seq_len = %d\n[server]\nmax_batch_size = %d\n[scheduler]\ndecode_steps_per_call = 8\n' \
  "$slots" "$seq" "$slots" > "$cfg"
# 0.85 of the GPU: the 6.7B model's cache (128 slots: 35 GB; 256: 71 GB) and a prefill beside the weights;
# the client's rate measurement takes 4 GB more
XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 python -m gptjax serve $model --config "$cfg" --port 8011 > "$OUT/server-$1.log" 2>&1 &
server=$!
for _ in $(seq 400); do  # loading compiles a prefill per row count and a decode per row bucket
  python -m gptjax client --server 127.0.0.1:8011 --prompt-ids 1,2 --max-new-tokens 1 >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "the server exited: see $OUT/server-$1.log" >&2; exit 1; }
  sleep 1
done
# the batch as the seed's client sends it (one KServe request), then as independent native calls
for api in ${SERVER_APIS:-triton native}; do
  bench 300 --server 127.0.0.1:8011 --server-api "$api" --shapes $SHAPES -n 3
done
kill -TERM $server; wait $server
