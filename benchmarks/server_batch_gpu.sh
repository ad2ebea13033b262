#!/usr/bin/env bash
# A server's batch-64/256 decode step on the GPU, in one call: the decode attention sweep at 16 x 64 heads and
# 256-position caches with ragged rows (its table copied into gptjax/kernels/ for the rest of the call, so both
# matmul paths below use it), decode_probe at $BATCHES (default 256,64) on the decode matmul kernels and on
# XLA's in one process, then the kernels per product at $ROWS rows (default 64,256; their rel_err checks the
# scattered K/V store of the blocks over 16 rows). Lines go to $OUT/server_batch.jsonl.
#   T_SWEEP=200 T_PROBE=240 T_BENCH=120 bash benchmarks/server_batch_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
log() { tee -a "$OUT/server_batch.jsonl"; }
if [ -n "${T_SWEEP-200}" ]; then
  timeout "${T_SWEEP:-200}" python3 -m benchmarks.decode_sweep --heads 16x64 --seqs 256 --batches "${BATCHES:-256,64}" \
    --ragged --jsonl "$OUT/decode_sweep.jsonl" --table "$OUT/decode_table.py" \
    --time-limit "$(( ${T_SWEEP:-200} * 3 / 4 ))" > "$OUT/decode_sweep.log" 2>&1
  [ -f "$OUT/decode_table.py" ] && cp "$OUT/decode_table.py" gptjax/kernels/decode_table.py
fi
timeout "${T_PROBE:-240}" python3 -m benchmarks.decode_probe --model megatron-345m --dtype float16 \
  --batch "${BATCHES:-256,64}" --steps 32 --runs 5 --decode-matmuls pallas,xla 2>>"$OUT/err.log" | log
timeout "${T_BENCH:-120}" python3 -m benchmarks.decode_matmul_bench --model megatron-345m --dtype float16 \
  --rows "${ROWS:-64,256}" 2>>"$OUT/err.log" | log
