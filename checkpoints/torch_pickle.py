"""Reading PyTorch pickles (`.pt`, `.bin`) without letting them run code.

`torch.load(weights_only=True)` builds tensors and plain containers only. When it refuses a file, its message
first explains how to turn the protection off; a refusal here names the file and what it tried to load, and
never repeats that advice.
"""

from __future__ import annotations

import re
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from gptjax.checkpoint import CheckpointError


class ExtraState:
    """What an io.BytesIO in a checkpoint loads as, where the reader asks for it: TransformerEngine's
    `_extra_state` entries (FP8 scaling metadata, pickled into the BytesIO), which hold no weights. Its bytes are
    dropped unread, so no code in them runs; nothing but this class is built."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return "ExtraState(TransformerEngine's _extra_state, not read)"


def _no_bytes(*args, **kwargs) -> bytes:
    """What a call of bytes() in a checkpoint loads as (protocol 2 pickles an empty BytesIO's value as one): the
    real bytes(n) would allocate whatever size the file asks for."""
    return b""


_EXTRA_STATE = [(ExtraState, "_io.BytesIO"), (_no_bytes, "builtins.bytes")]


def safe_load(path: Path, *, allowed: tuple[type, ...] = (), extra_state: bool = False):
    """The object pickled in `path`, built from tensors, plain containers and the `allowed` classes only; with
    `extra_state`, an io.BytesIO loads as an ExtraState.

    Files in torch's zip format are memory-mapped: a tensor is read when touched, so optimizer state that is
    never used is never read.
    """
    import torch

    mmap = zipfile.is_zipfile(path)
    safe = [*allowed, *(_EXTRA_STATE if extra_state else [])]
    try:
        # a plain pickle of protocol 3 or later draws a two-line warning from torch first: the refusal says it all
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt, or a pickle that asks for more than tensors
        raise _refusal(path, e, allowed) from None
    if mmap:
        _check_records(path, state)
    return state


def _check_records(path: Path, state) -> None:
    """Each tensor's bytes a whole record of the zip. A memory-mapped load takes as many bytes as the pickle says
    from where the tensor's record starts, without the check on the record's size that a plain load makes: a
    record cut short (or a pickle that claims more) would lend the tensor the bytes of the records after it."""
    import torch

    storages: dict[int, int] = {}  # address -> bytes, one entry per storage however many tensors view it
    seen, todo = set(), [state]
    while todo:  # not recursive: a pickle can nest containers deeply, or put a list inside itself
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.layout == torch.strided and not x.is_meta and x.untyped_storage().nbytes():
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif hasattr(x, "__dict__"):  # argparse.Namespace
            todo.extend(vars(x).values())
    if not storages:
        return
    records = {}  # where each data record's bytes start in the file -> (name, size)
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.filename.split("/")[-2:-1] == ["data"]:
                f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                records[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.file_size)
    # the file is mapped whole: the lowest tensor address, less its record's offset, is where it starts
    first = min(storages)
    base = next((first - at for at in sorted(records) if all(a - first + at in records for a in storages)), None)
    if base is None:
        raise CheckpointError(f"{path}: cannot read: its tensors do not lie at its data records (corrupt file)")
    for address, size in storages.items():
        name, held = records[address - base]
        if held != size:
            raise CheckpointError(f"{path}: cannot read: record {name} holds {held} bytes, but its tensor takes "
                                  f"{size} (truncated or corrupt)")


def _refusal(path: Path, e: Exception, allowed: tuple[type, ...]) -> CheckpointError:
    text = str(e)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe and unsafe.group(1) == "_io.BytesIO":
        return CheckpointError(f"{path}: holds TransformerEngine's _extra_state (io.BytesIO): FP8 metadata in a "
                               "pickle of its own, not weights, which files of this kind never hold; refused unread "
                               "(unpickling it could run code)")
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


def torch_to_numpy(t, name: str) -> np.ndarray:
    """A tensor's values as numpy, without a copy where the dtype allows; bf16 as ml_dtypes.bfloat16. A tensor
    that numpy can't hold (sparse, saved without its values on the meta device, float8, complex32) is refused
    naming it (torch's own TypeError does not)."""
    import torch

    if t.layout != torch.strided or t.is_meta:
        layout = str(t.layout).removeprefix("torch.")
        kind = "a meta tensor (saved without its values)" if t.is_meta else f"a {layout} tensor"
        raise CheckpointError(f"tensor {name} is {kind}, expected dense weights")
    t = t.detach()  # a saved nn.Parameter requires grad, and numpy() refuses those
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return t.numpy()
    except TypeError:
        raise CheckpointError(f"tensor {name} is {str(t.dtype).removeprefix('torch.')}, expected one of float32, "
                              "bfloat16, float16") from None
