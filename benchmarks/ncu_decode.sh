#!/usr/bin/env bash
# Nsight Compute's counters for a decode step's kernels (benchmarks/ncu_decode.py), one launch form a process,
# summarised into $OUT/ncu_decode.jsonl (one line per launch; KEEP_REPORTS=1 keeps the .ncu-rep files, CSVs are
# always kept): the batch-256 step's attention (the table's launch, the engine's append form, longer and shorter
# blocks, whole rows a program), the (8, 512) step's attention (one chunk, eight, and whole rows a program in
# sixteen), and two batch-256 products.
#   bash benchmarks/ncu_decode.sh                          # every case below
#   CASES="att_b256 att_b8" NCU_SET=basic bash benchmarks/ncu_decode.sh
# Clocks left alone (--clock-control none), as for ncu_prefill.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 1; }
ROWS='"heads_per_program":16,"block_k":16,"num_warps":8,"num_stages":2'  # every head of a row a program
declare -A ARGS=(
  [att_b256]="attention --shape 256x136x192"
  [att_b256_append]="attention --shape 256x136x192 --append"
  [att_b256_block128]='attention --shape 256x136x192 --params {"block_k":128}'
  [att_b256_block32]='attention --shape 256x136x192 --params {"block_k":32,"num_warps":4,"num_stages":2,"num_splits":1}'
  [att_b256_rows]="attention --shape 256x136x192 --params {$ROWS}"
  [att_b8]="attention --shape 8x520x576"
  [att_b8_splits8]='attention --shape 8x520x576 --params {"num_splits":8}'
  [att_b8_rows]="attention --shape 8x520x576 --params {$ROWS,\"num_splits\":16}"
  [qkv_b256]="product --shape 256x1024x3072"
  [attn_out_b256]="product --shape 256x1024x1024"
)
cases=${CASES:-"att_b256 att_b256_append att_b8 att_b8_splits8 att_b8_rows qkv_b256 attn_out_b256 att_b256_block128
  att_b256_rows att_b256_block32"}
for name in $cases; do
  [ -n "${ARGS[$name]:-}" ] || { echo "unknown case $name; known: ${!ARGS[*]}" >&2; exit 2; }
  # attention's range also holds the append form's XLA gathers: only the kernel is read
  filter=(); [[ ${ARGS[$name]} == attention* ]] && filter=(-k regex:decode_attention)
  timeout "${T_NCU:-90}" "$NCU" --profile-from-start off --clock-control none --set "${NCU_SET:-full}" "${filter[@]}" \
    -f -o "$OUT/$name" python3 -m benchmarks.ncu_decode ${ARGS[$name]} > "$OUT/$name.log" 2>&1
  "$NCU" --import "$OUT/$name.ncu-rep" --csv --page details > "$OUT/$name.csv" 2>> "$OUT/$name.log"
  [ -n "${KEEP_REPORTS:-}" ] || rm -f "$OUT/$name.ncu-rep"
  python3 -m benchmarks.ncu_decode summary "$OUT/$name.csv" | tee -a "$OUT/ncu_decode.jsonl"
done
