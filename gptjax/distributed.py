"""Multi-process start-up and the one place that knows which process is process 0."""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when explicit flags ask for it; a single process needs nothing."""
    if coordinator is None and num_processes is None and process_id is None:
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_main_process() -> bool:
    """Process 0 prints results and serves clients; every other process only follows."""
    return jax.process_index() == 0


def broadcast_from_main(x: np.ndarray) -> np.ndarray:
    """Process 0's array, on every process: how the server's step commands reach the followers."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))
