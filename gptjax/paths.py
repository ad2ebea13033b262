"""Where gptjax keeps files between runs: one folder, `$GPTJAX_CACHE_DIR` (default `~/.cache/gptjax`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder for everything gptjax keeps between runs (compiled programs, downloads); not created here."""
    configured = os.environ.get("GPTJAX_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "gptjax"
