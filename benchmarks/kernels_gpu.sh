#!/usr/bin/env bash
# The kernel runs behind RESULTS.md's attention section, on one GPU. Logs and rows go to $OUT (default ./out).
#   bash benchmarks/kernels_gpu.sh [floors] [prefill] [decode-sweep] [decode] [engine]   (all by default)
# floors: benchmarks.floors with PyTorch's copy_ beside it. prefill: the Mosaic GPU kernel's correctness
# check, then every prefill kernel and peer (bf16 and fp16). decode-sweep: the launch-parameter sweep, its
# table written to $OUT/decode_table.py (copy it to gptjax/kernels/ to use it). decode: the decode table of
# benchmarks.kernels with the table in use. engine: greedy tokens with --attention pallas (on the decode
# matmul kernels, and on XLA's with the K/V-storing attention kernel) and xla (into env.txt, with the versions
# and the floors).
# Time limits (seconds, per process): T_PEERS (each of the two prefill peer runs), T_PREFILL (the Mosaic GPU
# kernel's checks and its variants), T_SWEEP and T_SWEEP_SHAPES (no new sweep shape after; SWEEP_HEADS,
# SWEEP_SEQS, SWEEP_BATCHES and SWEEP_RAGGED=1 pass decode_sweep's options), T_DECODE,
# T_ENGINE. OURS: which of our prefill kernels to time (`--only`, default 'hopper*'). The benchmarks.kernels
# runs stop starting timings LIMIT_MARGIN (default 20) seconds before their limit, so their JSON is written;
# every timed row has the host clock's time and, from a profiler trace, the device's kernel time (gpu_us /
# gpu_ms). The prefill and decode-sweep parts fit in ~400 s with
#   T_PEERS=60 T_PREFILL=180 T_SWEEP=140 T_SWEEP_SHAPES=105
# (the Mosaic GPU kernel's 28 checks compile for ~110 s before its timings start: at T_PREFILL=130 none did,
# RESULTS run 15)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
parts=${*:-floors prefill decode-sweep decode engine}
has() { [[ " $parts " == *" $1 "* ]]; }
limit() { echo $(( $1 > ${LIMIT_MARGIN:-20} + 10 ? $1 - ${LIMIT_MARGIN:-20} : $1 / 2 )); }
T_PEERS=${T_PEERS:-150} T_PREFILL=${T_PREFILL:-200} T_DECODE=${T_DECODE:-200}
{ nvidia-smi -L; python3 -c 'import jax, jaxlib, sys; print(sys.version, jax.__version__, jaxlib.__version__, jax.devices()[0].device_kind, getattr(jax.devices()[0], "compute_capability", "?"))'; } >> "$OUT/env.txt" 2>&1
has floors && timeout 120 python3 -m benchmarks.floors --json >> "$OUT/env.txt" 2>&1
# the peers first, in a process of their own: a kernel of ours that hangs can't take their rows with it
has prefill && timeout "$T_PEERS" python3 -m benchmarks.kernels --skip-decode --checks none \
  --prefill-dtypes bfloat16 --only xla,cudnn,pallas --time-limit "$(limit "$T_PEERS")" \
  --json "$OUT/prefill-peers.json" > "$OUT/prefill.log" 2>&1
has prefill && timeout "$T_PEERS" python3 -m benchmarks.kernels --skip-decode --checks none \
  --prefill-dtypes float16 --only 'cudnn,attention_mgpu*' --time-limit "$(limit "$T_PEERS")" \
  --json "$OUT/prefill-peers16.json" >> "$OUT/prefill.log" 2>&1
# ours: the ragged checks of the default and the variants' code paths, then the default and its variants
# (benchmarks/kernels.py HOPPER_SWEEP: the next key block's wait inside PV, the softmax fence, 192/256-key
# blocks at head_dim 64) at the four shapes, bf16 then fp16
has prefill && timeout "$T_PREFILL" python3 -m benchmarks.kernels --skip-decode --checks hopper \
  --prefill-dtypes bfloat16,float16 --only "${OURS:-hopper*}" --time-limit "$(limit "$T_PREFILL")" \
  --json "$OUT/prefill.json" >> "$OUT/prefill.log" 2>&1
has decode-sweep && timeout "${T_SWEEP:-240}" python3 -m benchmarks.decode_sweep --jsonl "$OUT/decode_sweep.jsonl" \
  --table "$OUT/decode_table.py" --time-limit "${T_SWEEP_SHAPES:-200}" ${SWEEP_HEADS:+--heads $SWEEP_HEADS} ${SWEEP_SEQS:+--seqs $SWEEP_SEQS} \
  ${SWEEP_BATCHES:+--batches $SWEEP_BATCHES} ${SWEEP_RAGGED:+--ragged} \
  > "$OUT/decode_sweep.log" 2>&1
has decode && timeout "$T_DECODE" python3 -m benchmarks.kernels --skip-prefill --checks none \
  --time-limit "$(limit "$T_DECODE")" --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
[ -f "$OUT/decode_table.py" ] && cp "$OUT/decode_table.py" gptjax/kernels/decode_table.py  # the engine uses it
if has engine; then  # gpt2-124m: 12 heads x 64, so prefill takes the Hopper kernel on sm_90; fp16, since in
  # bf16 its random-weight logits hold near ties that rounding decides (the 3-token prompt, RESULTS run 6)
  # pallas: 3 rows decode on the matmul kernels; pallas-append: on XLA's matmuls, the attention kernel storing
  # each step's K/V (decode_attention_append); xla: the references
  for run in "pallas pallas" "pallas-append pallas --decode-matmuls=xla" "xla xla"; do
    set -- $run  # name, attention, flags
    timeout "${T_ENGINE:-150}" python3 -m gptjax generate --model gpt2-124m --dtype float16 --greedy --max-new-tokens 24 --json \
      --attention "$2" ${3:-} --prompt-ids 5,17,99 --prompt-ids "$(seq -s, 1 300)" \
      --prompt-ids "$(seq -s, 7 3 500)" > "/tmp/engine-$1.jsonl" 2>> "$OUT/env.txt"
  done
  python3 - >> "$OUT/env.txt" 2>&1 <<'PY'
import json
rows = {i: [json.loads(l)["output_ids"] for l in open(f"/tmp/engine-{i}.jsonl")] for i in ("pallas", "pallas-append", "xla")}
for i in ("pallas", "pallas-append"):
    print(f"engine greedy tokens {i} == xla:", bool(rows[i]) and rows[i] == rows["xla"], rows[i])
print("xla:", rows["xla"])
PY
fi
exit 0
