#!/usr/bin/env bash
# XLA's own levers on the decode step, one process per flag and the defaults first in the same call: for flags
# that must be set as the process starts. Processes differ by up to 11% (RESULTS run 26, where this script's
# apparent gains vanished when the same options were compiled side by side): read a line here as a lead, and
# weigh a lead in one process with `decode_probe --xla-options` (options any one program can take). From run
# 25: at batch 256, XLA splits three of a layer's four products over K and sums the float32 parts in the next
# kernel; at (8, 512) the GPU idles ~1.4 ms between a call's input copies and its first kernel.
# decode_probe at $MODEL $DTYPE (default megatron-345m float16), 128-token prompts, batches $BATCHES (default
# 1,8,256), 16 steps, median of 3; each line records its XLA_FLAGS and first row's tokens, so a flag that
# changes the greedy tokens shows. A flag this jaxlib does not know stops its process at once ("Unknown flag in
# XLA_FLAGS", in $OUT/flags.err). Lines go to $OUT/flags.jsonl; T: seconds per process (default 100).
#   bash benchmarks/xla_flags_gpu.sh                    # the defaults, then each flag of $FLAGS
#   FLAGS="--xla_gpu_experimental_force_split_k=1" bash benchmarks/xla_flags_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
default_flags="--xla_gpu_experimental_force_split_k=1
--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true
--xla_gpu_unsupported_enable_triton_multi_output_fusion=true
--xla_gpu_experimental_enable_fusion_block_level_rewriter=true
--xla_gpu_command_buffer_update_mode=SKIP_TEMP
--xla_gpu_command_buffer_unroll_loops=true"
probe() {
  XLA_FLAGS="$1" timeout "${T:-100}" python3 -m benchmarks.decode_probe --model "${MODEL:-megatron-345m}" \
    --dtype "${DTYPE:-float16}" \
    --batch "${BATCHES:-1,8,256}" --steps 16 --runs 3 >> "$OUT/flags.jsonl" 2>> "$OUT/flags.err"
  echo "XLA_FLAGS='$1': exit $?" | tee -a "$OUT/flags.err"
}
probe ""
while IFS= read -r flag; do
  [ -n "$flag" ] && probe "$flag"
done <<< "${FLAGS:-$default_flags}"
exit 0
