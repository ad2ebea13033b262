"""Decode attention's launch parameters by shape, as the sweep measured them (`benchmarks/decode_sweep.py`
writes this file; edit the sweep, not the table).

(heads, head_dim, batch, max_seq) -> (heads_per_program, block_k, num_splits, num_warps, num_stages, use_dot)
"""

DEVICE = ""
TABLE: dict[tuple[int, int, int, int], tuple[int, int, int, int, int, bool]] = {}
