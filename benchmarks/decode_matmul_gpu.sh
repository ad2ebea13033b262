#!/usr/bin/env bash
# The small-batch decode matmuls on the GPU, in one call: decode_probe with and without them (345M fp16,
# batch sizes $BATCHES, default 1,2,4,8, the first profiled; implementations $IMPLS, default
# pallas,xla), then the kernels against XLA per product at megatron-345m's shapes at $ROWS rows
# (default 1,8; SWEEP=1: and a sweep of block sizes and splits) and, with BIG=1 (the default), gpt3-6.7b's.
# Lines go to $OUT/decode_matmul.jsonl.
#   OUT=/tmp/out bash benchmarks/decode_matmul_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
log() { tee -a "$OUT/decode_matmul.jsonl"; }
timeout "${T_PROBE:-240}" python3 -m benchmarks.decode_probe --model megatron-345m --dtype float16 \
  --batch "${BATCHES:-1,2,4,8}" --decode-matmuls "${IMPLS:-pallas,xla}" --profile /tmp/decode-trace 2>>"$OUT/decode_matmul.log" | log
timeout "${T_BENCH:-100}" python3 -m benchmarks.decode_matmul_bench --model megatron-345m --dtype float16 \
  --rows "${ROWS:-1,8}" ${SWEEP:+--sweep} 2>>"$OUT/decode_matmul.log" | log
[ -z "${BIG-1}" ] || timeout 90 python3 -m benchmarks.decode_matmul_bench --model gpt3-6.7b --dtype bfloat16 \
  --rows 1 2>>"$OUT/decode_matmul.log" | log
rm -rf /tmp/decode-trace
