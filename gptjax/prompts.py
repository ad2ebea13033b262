"""The checks every prompt passes, wherever it comes from (a notebook, the CLI, any server API).

Pure functions of the values and the model's sizes; each raises ValueError with a message that names the field
as the caller calls it (`field`), so a front end can pass the message on unchanged.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

MAX_STOP_IDS = 1024  # stop token ids one request may give


def check_prompt(ids, vocab_size: int, max_seq_len: int, field: str = "prompt") -> list[int]:
    """Token ids -> a list of ints: a sequence (or 1-d integer array) of 1 to `max_seq_len - 1` ids (one position
    is left for a new token), each in [0, vocab_size). The length is checked before any id is read."""
    ids = check_token_ids(ids, vocab_size, max_seq_len - 1, field,
                          f"tokens; the model holds {max_seq_len} positions, so a prompt may have at most "
                          f"{max_seq_len - 1}")
    if not ids:
        raise ValueError(f"{field} is empty")
    return ids


def check_token_ids(ids, vocab_size: int, most: int, field: str, what: str = "ids") -> list[int]:
    """Token ids -> a list of ints, each in [0, vocab_size); at most `most` of them, checked before any id is
    read (`what` ends the message: "{field} has {n} {what}")."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"{field} must be a list of integer token ids, got an array of {ids.dtype} "
                             f"{list(ids.shape)}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{field} must be a list of token ids, got {type(ids).__name__}")
    if len(ids) > most:
        raise ValueError(f"{field} has {len(ids)} {what}")
    if all(type(t) is int for t in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab_size)):
        return list(ids)  # the common case, checked in C loops (a 256-prompt batch: ~1 ms, not ~40)
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{field}[{i}] must be an integer token id, got {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}] = {int(t)} is outside the vocabulary [0, {vocab_size})")
        out.append(int(t))
    return out


def whole_number(value, field: str) -> int:
    """An integer argument as an int: a float with a fraction, a bool or a string is refused, not rounded."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field} must be a whole number, got {value!r}")
    return int(value)


def real_number(value, field: str) -> float:
    """A real argument as a float: a bool or a string is refused, not read as 1.0 or parsed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field} must be a number, got {value!r}")
    return float(value)


def default_new_tokens(configured: int, longest: int, max_seq_len: int) -> int:
    """New tokens for a call that asks for none: the config's default, capped by the positions the longest prompt
    leaves (a number asked for is checked instead, not capped)."""
    return min(configured, max(max_seq_len - longest, 1))


def check_new_tokens(n: int, prompt_len: int, max_seq_len: int, field: str = "max_new_tokens") -> int:
    """At least one new token, and room for all of them after the prompt."""
    if n < 1:
        raise ValueError(f"{field} must be at least 1, got {n}")
    if prompt_len + n > max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + {field} {n} exceeds the model's {max_seq_len} positions")
    return n
