"""Decode attention's launch parameters by shape, as the sweep measured them (`benchmarks/decode_sweep.py`
writes this file; edit the sweep, not the table). Last swept on NVIDIA H100 80GB HBM3, 2026-12-07;
a run replaces only the shapes it swept, and RESULTS.md says which run measured each.

(heads, head_dim, batch, max_seq) -> (heads_per_program, block_k, num_splits, num_warps, num_stages, use_dot)
"""

DEVICE = 'NVIDIA H100 80GB HBM3'
TABLE: dict[tuple[int, int, int, int], tuple[int, int, int, int, int, bool]] = {
    (16, 64, 1, 512): (1, 256, 1, 8, 2, True),
    (16, 64, 1, 1024): (1, 64, 8, 2, 1, True),
    (16, 64, 1, 2048): (1, 64, 16, 4, 2, True),
    (16, 64, 8, 512): (1, 64, 4, 4, 2, True),
    (16, 64, 8, 1024): (1, 128, 4, 4, 2, True),
    (16, 64, 8, 2048): (1, 128, 8, 4, 2, True),
    (16, 64, 32, 512): (1, 128, 2, 4, 2, True),
    (16, 64, 32, 1024): (1, 128, 4, 4, 2, True),
    (16, 64, 32, 2048): (1, 64, 8, 4, 2, True),
    (16, 64, 64, 256): (1, 128, 1, 4, 2, True),
    (16, 64, 64, 512): (1, 128, 2, 4, 2, True),
    (16, 64, 64, 2048): (1, 128, 2, 4, 3, True),
    (16, 64, 128, 256): (1, 128, 1, 4, 2, True),
    (16, 64, 128, 512): (1, 128, 1, 4, 3, True),
    (16, 64, 128, 2048): (1, 128, 1, 4, 3, True),
    (16, 64, 256, 256): (1, 64, 1, 4, 2, True),
    (16, 64, 256, 512): (1, 128, 1, 4, 2, True),
    (16, 64, 256, 2048): (1, 128, 1, 4, 2, True),
    (32, 128, 2, 256): (1, 128, 1, 4, 3, True),
    (32, 128, 8, 512): (2, 64, 4, 4, 3, False),
    (32, 128, 32, 512): (1, 128, 2, 4, 2, True),
    (32, 128, 32, 2048): (1, 64, 2, 4, 4, True),
    (32, 128, 64, 512): (1, 64, 1, 4, 4, True),
    (32, 128, 64, 2048): (1, 128, 1, 4, 3, True),
}
