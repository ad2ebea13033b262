"""benchmarks.floors on the CPU: each ceiling is a positive rate in the units its docstring gives, and the
floor's rate is the larger of the copy and read rates (so no result can pass it by only reading)."""

from __future__ import annotations

import math

import pytest

from benchmarks import floors


def test_rates_are_positive_and_memory_bandwidth_is_the_larger(monkeypatch):
    monkeypatch.setattr(floors, "REPS", 2)
    monkeypatch.setattr(floors, "WARMUP", 1)
    n = 8 << 20
    copy, read = floors.copy_bandwidth(n_bytes=n), floors.read_bandwidth(n_bytes=n)
    assert copy > 0 and read > 0 and math.isfinite(copy) and math.isfinite(read)
    monkeypatch.setattr(floors, "copy_bandwidth", lambda *a, **k: 2.0)
    monkeypatch.setattr(floors, "read_bandwidth", lambda *a, **k: 3.0)
    assert floors.memory_bandwidth() == 3.0
    assert floors.matmul_rate("float32", m=128) > 0


def test_copy_and_read_rates_name_each_method():
    assert set(floors.copy_rates(n_bytes=1 << 20)) == {"xla"}  # PyTorch's copy runs on a GPU only
    reads = floors.read_rates(n_bytes=(1 << 20) + 12)  # not whole rows: cut to them
    assert set(reads) == {"xla_sum", "xla_rows"} and min(reads.values()) > 0
    assert floors.torch_copy_bandwidth() is None and floors.torch_read_bandwidth() is None  # no CUDA here


def test_pallas_read_kernels_sum_every_byte():
    """The read kernels (in the Pallas interpreter here) add up the whole buffer, times the carried scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x2d = jax.random.normal(jax.random.key(3), (4 * 64, floors.READ_ROW // 16), jnp.float32).astype(jnp.bfloat16)
    want = float(np.asarray(x2d, np.float64).sum())
    for config in floors.PALLAS_READS:
        got = floors._pallas_read(x2d, jnp.float32([2.0]), tile_rows=config[0], num_warps=config[1],
                                  num_stages=config[2], use_dot=config[3], programs=4, interpret=True)
        assert float(got.sum()) == pytest.approx(2 * want, rel=1e-4, abs=1e-2), config
