"""The GPU scripts of benchmarks/: they run only on a lent GPU, so a typo would cost a device call. Here each
parses, and the flag sweep's plumbing runs on the CPU with a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_xla_flag_sweep_runs_the_defaults_then_each_flag(tmp_path):
    """One decode_probe line for the defaults and one per known flag, each tagged with its flags; a flag this
    jaxlib does not know ends its own process only, and the log says so."""
    env = dict(os.environ, OUT=str(tmp_path), MODEL="gpt2-tiny", DTYPE="float32", BATCHES="1", T="300",
               FLAGS="--xla_gpu_experimental_force_split_k=1\n--xla_gpu_no_such_flag=1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(ROOT / "benchmarks" / "xla_flags_gpu.sh")], env=env, check=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "flags.jsonl").read_text().splitlines()]
    assert [r["xla_flags"] for r in rows] == ["", "--xla_gpu_experimental_force_split_k=1"]
    assert rows[0]["first_row_tokens"] == rows[1]["first_row_tokens"]
    log = (tmp_path / "flags.err").read_text()
    assert "XLA_FLAGS='--xla_gpu_no_such_flag=1': exit 1" in log and "Unknown flag" in log
