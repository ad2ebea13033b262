"""Reading PyTorch pickles (`.pt`, `.bin`) without letting them run code.

`torch.load(weights_only=True)` builds tensors and plain containers only. When it refuses a file, its message
first explains how to turn the protection off; a refusal here names the file and what it tried to load, and
never repeats that advice.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from gptjax.checkpoint import CheckpointError


def safe_load(path: Path, *, allowed: tuple[type, ...] = ()):
    """The object pickled in `path`, built from tensors, plain containers and the `allowed` classes only.

    Files in torch's zip format are memory-mapped: a tensor is read when touched, so optimizer state that is
    never used is never read.
    """
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated, corrupt, or a pickle that asks for more than tensors
        raise _refusal(path, e, allowed) from None


def _refusal(path: Path, e: Exception, allowed: tuple[type, ...]) -> CheckpointError:
    text = str(e)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        kinds = " and ".join(["tensors", *(c.__module__ + "." + c.__qualname__ for c in allowed)])
        return CheckpointError(f"{path}: refusing to load {unsafe.group(1)}: only {kinds} are allowed in a "
                               "checkpoint (the file may try to run code)")
    # torch's explanation of weights_only comes first; the cause is on the lines after it
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
             and not line.startswith(("Please file an issue", "Check the documentation"))]
    cause = lines[0] if lines else "no details"
    return CheckpointError(f"{path}: cannot read: truncated, corrupt or not a PyTorch file "
                           f"({type(e).__name__}: {cause})")


def torch_to_numpy(t) -> np.ndarray:
    """A tensor's values as numpy, without a copy where the dtype allows; bf16 as ml_dtypes.bfloat16."""
    import torch

    t = t.detach()  # a saved nn.Parameter requires grad, and numpy() refuses those
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
