"""gptjax.warmup: a restarted engine loads every serving program it prepared before (nothing traced, lowered or
compiled) and those programs give the same tokens as the jitted functions.

Each engine runs in a fresh process with the compilation cache on in a tmp folder (JAX settles its cache at the
first compile; this test process keeps none).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from test_compile_cache import clean_env

SCRIPT = """
import json, sys
import numpy as np
from gptjax import compile_cache
compile_cache.enable(sys.argv[1])
if len(sys.argv) > 4:  # another version of the code: another store
    def code_fingerprint():
        return sys.argv[4]
    compile_cache.code_fingerprint = code_fingerprint
from gptjax import Engine, EngineConfig, sampling
from gptjax.engine_api import SamplingArrays

engine = Engine.from_preset("gpt2-tiny", engine_config=EngineConfig(max_slots=4, max_seq_len=64,
                                                                   **json.loads(sys.argv[3])))
state = engine.new_state()
engine.compile_prefill(2, 16, state)
engine.compile_decode(state, 3, False, 2)
prompts = np.array(json.loads(sys.argv[2]), np.int32)
samp = SamplingArrays.from_params([sampling.SamplingParams(temperature=0.0)] * 2)
prefix = engine.prefill(np.pad(prompts, ((0, 0), (0, 16 - prompts.shape[1]))), np.full(2, prompts.shape[1]), samp)
state = engine.insert(prefix, state, np.array([0, 1]))
state, tokens, _ = engine.generate_steps(state, 3, sampled=False, live=[True, True])
store = engine._store
print(json.dumps({"loaded": store.loaded, "compiled": store.compiled_now,
                  "first": np.asarray(prefix.first_tokens).tolist(), "steps": np.asarray(tokens)[:, :2].T.tolist()}))
"""


def run_engine(cache, prompts, code_version=None, **engine_config) -> dict:
    version = [code_version] if code_version else []
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), json.dumps(prompts), json.dumps(engine_config),
                           *version], capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_loads_every_program_and_gives_the_same_tokens(tmp_path):
    from gptjax import Engine

    prompts = np.random.default_rng(7).integers(0, 50257, (2, 5)).tolist()
    cold = run_engine(tmp_path, prompts)
    assert cold["compiled"] == 3 and cold["loaded"] == 0  # prefill, insert, decode
    # request defaults are in no program: an engine that differs only in them loads the same ones
    warm = run_engine(tmp_path, prompts, temperature=0.7, top_k=40, max_new_tokens=5)
    assert warm["compiled"] == 0 and warm["loaded"] == 3
    assert warm["first"] == cold["first"] and warm["steps"] == cold["steps"]
    # the programs' tokens are the notebook path's (jit, no store) greedy tokens
    results = Engine.from_preset("gpt2-tiny").generate(prompts, max_new_tokens=4, greedy=True, stop_token_ids=[])
    assert [[f, *s] for f, s in zip(cold["first"], cold["steps"])] == [r.output_ids for r in results]


def test_a_program_that_jax_cache_served_is_not_kept_whole(tmp_path):
    # an executable JAX's persistent cache hands back fails once serialized again and loaded (XLA:CPU): the store
    # keeps only programs compiled afresh, and the next start still runs (through JAX's cache)
    import shutil

    prompts = np.random.default_rng(8).integers(0, 50257, (2, 5)).tolist()
    cold = run_engine(tmp_path, prompts)
    shutil.rmtree(tmp_path / "gptjax-programs")
    served = run_engine(tmp_path, prompts)
    assert served["compiled"] == 3 and not list((tmp_path / "gptjax-programs").rglob("*.bin"))
    again = run_engine(tmp_path, prompts)
    assert served["first"] == again["first"] == cold["first"] and served["steps"] == again["steps"] == cold["steps"]


def test_new_code_keeps_its_programs_though_jax_cache_holds_the_old_ones(tmp_path):
    # an upgrade changes the store (its name hashes the code) but not the programs: JAX's cache keys of a store's
    # compiles carry the store's name, so the new store compiles afresh and keeps what it compiled
    prompts = np.random.default_rng(9).integers(0, 50257, (2, 5)).tolist()
    old = run_engine(tmp_path, prompts, code_version="old")
    new = run_engine(tmp_path, prompts, code_version="new")
    assert new["compiled"] == 3 and new["loaded"] == 0
    restarted = run_engine(tmp_path, prompts, code_version="new")
    assert restarted["compiled"] == 0 and restarted["loaded"] == 3
    assert old["first"] == new["first"] == restarted["first"] and old["steps"] == new["steps"] == restarted["steps"]
