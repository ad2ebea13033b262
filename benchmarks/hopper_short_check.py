"""The Hopper prefill kernel on short and ragged prompts (3 of 300 tokens, a lone 3-token prompt, length 1)
against float64: the shapes the engine check prefills; then a server's burst (32 ragged prompts of 64-192 tokens
in a 256 bucket: each persistent program takes several tiles, some where one consumer's rows end before the
other's). python -m benchmarks.hopper_short_check (GPU)."""
import jax.numpy as jnp, numpy as np
from benchmarks.kernels import prefill_reference64, rel_err
from gptjax.kernels import hopper_flash_attention
rng = np.random.default_rng()
for dt in (jnp.bfloat16, jnp.float16):
    for b, s, L in [(3, 300, [3, 300, 165]), (1, 3, [3]), (2, 16, [3, 16]), (4, 1, [1, 1, 1, 1])]:
        q, k, v = (jnp.asarray(rng.standard_normal((b, s, 12, 64)), dt) for _ in range(3))
        n = np.array(L, np.int32)
        out = np.asarray(hopper_flash_attention(q, k, v, lengths=jnp.asarray(n)), np.float64)
        ref = prefill_reference64(q, k, v, n)
        print(jnp.dtype(dt).name, (b, s), L, [round(rel_err(out[i, :m], ref[i, :m]), 5) for i, m in enumerate(L)],
              flush=True)

for dt in (jnp.bfloat16, jnp.float16):
    b, s, h = 32, 256, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, 64)), dt) for _ in range(3))
    n = rng.integers(64, 193, b).astype(np.int32)
    out = np.asarray(hopper_flash_attention(q, k, v, lengths=jnp.asarray(n)), np.float64)
    ref = prefill_reference64(q, k, v, n)
    print(jnp.dtype(dt).name, "burst", (b, s, h), "worst rel err",
          max(rel_err(out[i, :m], ref[i, :m]) for i, m in enumerate(n)), flush=True)
