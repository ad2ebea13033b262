#!/usr/bin/env bash
# The small-batch decode matmuls on the GPU, in one call: the kernels against XLA at megatron-345m's and
# gpt3-6.7b's shapes (SWEEP=1: and a sweep of block sizes and splits), after decode_probe with and without
# them (345M fp16 batch 1 and 8; BIG=1, the default: 6.7B bf16 batch 1) and a profile of the 345M step.
# Lines go to $OUT/decode_matmul.jsonl.
#   OUT=/tmp/out bash benchmarks/decode_matmul_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
log() { tee -a "$OUT/decode_matmul.jsonl"; }
probe() { timeout "${T_PROBE:-120}" python3 -m benchmarks.decode_probe "$@" 2>>"$OUT/decode_matmul.log" | log; }
probe --model megatron-345m --dtype float16 --batch 1 --decode-matmuls pallas --profile "$OUT/trace"
probe --model megatron-345m --dtype float16 --batch 1 --decode-matmuls xla
probe --model megatron-345m --dtype float16 --batch 8 --decode-matmuls pallas
probe --model megatron-345m --dtype float16 --batch 8 --decode-matmuls xla
timeout "${T_BENCH:-100}" python3 -m benchmarks.decode_matmul_bench --model megatron-345m --dtype float16 \
  --rows 1,8 ${SWEEP:+--sweep} 2>>"$OUT/decode_matmul.log" | log
[ -z "${BIG-1}" ] || timeout 90 python3 -m benchmarks.decode_matmul_bench --model gpt3-6.7b --dtype bfloat16 \
  --rows 1 2>>"$OUT/decode_matmul.log" | log
[ -z "${BIG-1}" ] || probe --model gpt3-6.7b --dtype bfloat16 --batch 1 --decode-matmuls pallas --steps 32 --runs 3
[ -z "${BIG-1}" ] || probe --model gpt3-6.7b --dtype bfloat16 --batch 1 --decode-matmuls xla --steps 32 --runs 3
rm -rf "$OUT/trace"
