#!/usr/bin/env bash
# A server's batch-64/256 decode step on the GPU (RESULTS, run 23). Parts (all by default, in this order):
#   sweep: the decode attention sweep at 16 x 64 heads and 256-position caches with ragged rows, its table
#          written to $OUT/decode_table.py and copied into gptjax/kernels/ for the parts after it;
#   probe: decode_probe at $BATCHES (default 256,64) with --decode-matmuls pallas,xla, one process (a step of more
#          slots than the kernels take runs XLA's matmuls either way);
#   bench: the decode matmul kernels per product against XLA's at $ROWS rows (default 16,64: the most they take).
# Lines go to $OUT/server_batch.jsonl. Time limits: T_SWEEP, T_PROBE, T_BENCH (seconds).
#   bash benchmarks/server_batch_gpu.sh [sweep] [probe] [bench]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
parts=${*:-sweep probe bench}
has() { [[ " $parts " == *" $1 "* ]]; }
log() { tee -a "$OUT/server_batch.jsonl"; }
T_SWEEP=${T_SWEEP:-200}
if has sweep; then
  timeout "$T_SWEEP" python3 -m benchmarks.decode_sweep --heads 16x64 --seqs 256 --batches "${BATCHES:-256,64}" \
    --ragged --jsonl "$OUT/decode_sweep.jsonl" --table "$OUT/decode_table.py" \
    --time-limit "$(( T_SWEEP * 3 / 4 ))" > "$OUT/decode_sweep.log" 2>&1
  [ -f "$OUT/decode_table.py" ] && cp "$OUT/decode_table.py" gptjax/kernels/decode_table.py
fi
has probe && timeout "${T_PROBE:-240}" python3 -m benchmarks.decode_probe --model megatron-345m --dtype float16 \
  --batch "${BATCHES:-256,64}" --steps 32 --runs 5 --decode-matmuls pallas,xla 2>>"$OUT/err.log" | log
has bench && timeout "${T_BENCH:-120}" python3 -m benchmarks.decode_matmul_bench --model megatron-345m \
  --dtype float16 --rows "${ROWS:-16,64}" 2>>"$OUT/err.log" | log
exit 0
