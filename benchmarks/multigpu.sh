#!/usr/bin/env bash
# Several GPUs of one host: greedy tokens equal across layouts, one process and one process per GPU, and
# the seed's benchmark shapes on 1 GPU against all of them. Rows go to $OUT (default ./out).
#   bash benchmarks/multigpu.sh [MODEL ...]        (default: gpt2-tiny gpt3-6.7b)
# NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L | wc -l)
models=("$@")
[[ ${#models[@]} -eq 0 ]] && models=(gpt2-tiny gpt3-6.7b)
prompt=(--prompt-ids 464,2068,7586,21831,18045,625,262 --prompt-ids 15496,995 --max-new-tokens 16 --greedy --no-stop --json)

for model in "${models[@]}"; do
  dtype=bfloat16
  CUDA_VISIBLE_DEVICES=0 python -m gptjax generate --model "$model" --dtype $dtype "${prompt[@]}" > "$OUT/$model.1gpu.jsonl"
  for mesh in "tensor=$gpus" "stage=$gpus"; do
    python -m gptjax generate --model "$model" --dtype $dtype --mesh "$mesh" "${prompt[@]}" > "$OUT/$model.$mesh.jsonl"
    cmp -s "$OUT/$model.1gpu.jsonl" "$OUT/$model.$mesh.jsonl" && echo "$model $mesh: tokens equal" \
      || echo "$model $mesh: TOKENS DIFFER"
  done
  # one process per GPU, srun's environment on localhost
  pids=()
  for ((r = 0; r < gpus; r++)); do
    SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=$gpus SLURM_PROCID=$r SLURM_LOCALID=$r \
      CUDA_VISIBLE_DEVICES=$r python -m gptjax generate --model "$model" --dtype $dtype --mesh "tensor=$gpus" \
      "${prompt[@]}" > "$OUT/$model.procs.$r.jsonl" &
    pids+=($!)
  done
  wait "${pids[@]}"
  cmp -s "$OUT/$model.1gpu.jsonl" "$OUT/$model.procs.0.jsonl" && echo "$model $gpus processes: tokens equal" \
    || echo "$model $gpus processes: TOKENS DIFFER"
done

for model in gpt3-6.7b gpt3-13b; do
  CUDA_VISIBLE_DEVICES=0 python -m gptjax bench --model $model --dtype bfloat16 --shapes 8,512,16 1,128,128 -n 3 \
    --json | tee -a "$OUT/multigpu.jsonl"
  for mesh in "tensor=$gpus" "stage=$gpus"; do
    python -m gptjax bench --model $model --dtype bfloat16 --mesh "$mesh" --shapes 8,512,16 1,128,128 -n 3 \
      --json | tee -a "$OUT/multigpu.jsonl"
  done
done
