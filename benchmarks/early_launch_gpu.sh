#!/usr/bin/env bash
# The decode kernels' early launch (gptjax/kernels/early_launch.py) on one GPU: the kernels' outputs with and
# without the trigger, the decode step timed with and without it (megatron-345m fp16; batch 1 and 8 on the
# decode matmul kernels, 256 on XLA's matmuls with the K/V-storing attention kernel), the engine's greedy
# tokens with it against XLA's, and a profile of the batch-1 step with it. Rows and logs go to $OUT.
# PLACE: where the trigger goes (end, the engine's default, or start); BIG= and PROFILE= leave out the batch-256 probes
# and the profile. AB=N runs only the batch-1/8 probe, N rounds of the two (trigger at PLACE, none) in turns, each
# in its own process (order alternating from round to round), so that drift between processes shows.
#   bash benchmarks/early_launch_gpu.sh          # ~8 minutes on an H200, most of it compiles
#   PLACE=start BIG= PROFILE= bash benchmarks/early_launch_gpu.sh
#   AB=2 bash benchmarks/early_launch_gpu.sh   # ~3 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
probe() {  # name, time limit, command...: one probe's rows into probe.log, its stderr into err.log
  local name=$1 t=$2; shift 2
  echo "== $name: $*" >> "$OUT/probe.log"; echo "== $name" >> "$OUT/err.log"
  timeout -k 10 "$t" "$@" >> "$OUT/probe.log" 2>> "$OUT/err.log"; echo "rc=$? at ${SECONDS}s" >> "$OUT/probe.log"
}
{ nvidia-smi -L; python3 -c 'import jax, jaxlib, sys; print(sys.version, jax.__version__, jaxlib.__version__)'; } \
  >> "$OUT/env.txt" 2>&1  # appended: a script run before it in the same call keeps its lines
export PLACE=${PLACE:-end}
P="python3 -m benchmarks.decode_probe --model megatron-345m --dtype float16"
if [ -n "${AB-}" ]; then
  for i in $(seq "$AB"); do
    order=("--early-launch $PLACE" "--early-launch off"); (( i % 2 )) || order=("--early-launch off" "--early-launch $PLACE")
    for e in "${order[@]}"; do probe "round$i" 100 $P --batch 1,8 --steps 32 --runs 7 $e; done
  done
  exit 0
fi
probe check 90 python3 - <<'PY'
import os
import jax, jax.numpy as jnp, numpy as np
from gptjax.kernels import decode_attention_append, early_launch
from gptjax.kernels.decode_matmul import decode_matmul, decode_matmul_reference

place = os.environ["PLACE"]
print("early launch available:", bool(early_launch.resolve(place, interpret=False)) and jax.default_backend() == "gpu",
      "placed at", place, jax.devices()[0].compute_capability, flush=True)
rng = np.random.default_rng()
for k, n, rows in ((1024, 3072, 1), (1024, 1024, 8), (1024, 4096, 3), (4096, 1024, 1)):
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.float16)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n,)) * 0.1, jnp.float16)
    ref = np.asarray(decode_matmul_reference(w, x, bias=b, activation="gelu_new"), np.float64)
    out = {e: np.asarray(decode_matmul(w, x, bias=b, activation="gelu_new", early_launch=e), np.float64)
           for e in (place, False)}
    print(f"decode_matmul {k}x{n}, {rows} rows: rel err with / without",
          [f"{np.linalg.norm(o - ref) / np.linalg.norm(ref):.1e}" for o in out.values()],
          "bitwise equal:", np.array_equal(out[place], out[False]), flush=True)
qkv = jnp.asarray(rng.standard_normal((8, 3, 16, 64)), jnp.float16)
cache = jnp.asarray(rng.standard_normal((8, 256, 16, 64)), jnp.float16)
pos = jnp.asarray(rng.integers(1, 255, 8), jnp.int32)
for kw in ({"heads_per_program": 1}, {"heads_per_program": 2, "block_k": 64, "num_splits": 2}):
    a, b = (decode_attention_append(qkv, cache, cache, pos, early_launch=e, **kw) for e in (place, False))
    print("decode_attention_append", kw, "bitwise equal:", all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b)))
PY
probe small 120 $P --batch 1,8 --steps 32 --runs 5 --early-launch "$PLACE"
probe small 120 $P --batch 1,8 --steps 32 --runs 5 --early-launch off
if [ -n "${BIG-1}" ]; then
  probe batch256 60 $P --batch 256 --steps 32 --runs 5 --early-launch "$PLACE"
  probe batch256 60 $P --batch 256 --steps 32 --runs 5 --early-launch off
fi
GPTJAX_EARLY_LAUNCH=$PLACE T_ENGINE=60 bash benchmarks/kernels_gpu.sh engine > "$OUT/engine.log" 2>&1
echo "engine (early launch) rc=$? at ${SECONDS}s" >> "$OUT/probe.log"
[ -z "${PROFILE-1}" ] || probe profile 80 $P --batch 1 --steps 16 --runs 5 --early-launch "$PLACE" \
  --profile /tmp/early-launch-profile
