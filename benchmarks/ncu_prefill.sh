#!/usr/bin/env bash
# Nsight Compute's counters for one prefill attention call of each implementation (benchmarks/ncu_prefill.py),
# each report's details as CSV in $OUT (KEEP_REPORTS=1: the .ncu-rep files too): where the head_dim-128
# kernels' time goes, side by side.
#   IMPLS='hopper,cudnn,attention_mgpu(128)' SHAPE=2x4096x32x128 DTYPE=float16 bash benchmarks/ncu_prefill.sh
# The clocks are left alone (--clock-control none, as the device's METHOD.md asks): the counters are read at
# the clock the kernel meets, as its timings are.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 1; }
IFS=, read -ra impls <<< "${IMPLS:-hopper,cudnn,attention_mgpu(128)}"  # names hold spaces: comma-separated
for impl in "${impls[@]}"; do
  name=$(echo "$impl" | tr -c 'A-Za-z0-9\n' '_')
  timeout "${T_NCU:-150}" "$NCU" --profile-from-start off --clock-control none --set "${NCU_SET:-full}" -f \
    -o "$OUT/ncu-$name" python3 -m benchmarks.ncu_prefill --impl "$impl" --shape "${SHAPE:-2x4096x32x128}" \
    --dtype "${DTYPE:-float16}" > "$OUT/ncu-$name.log" 2>&1
  "$NCU" --import "$OUT/ncu-$name.ncu-rep" --csv --page details > "$OUT/ncu-$name.csv" 2>> "$OUT/ncu-$name.log"
  [ -n "${KEEP_REPORTS:-}" ] || rm -f "$OUT/ncu-$name.ncu-rep"  # binary, and the CSV holds its numbers
done
