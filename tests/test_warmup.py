"""gptjax.warmup: a restarted engine loads every serving program it prepared before (nothing traced, lowered or
compiled) and those programs give the same tokens as the jitted functions.

Each engine runs in a fresh process with the compilation cache on in a tmp folder (JAX settles its cache at the
first compile; this test process keeps none).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_compile_cache import clean_env

PROMPTS = np.random.default_rng(7).integers(0, 50257, (2, 5)).tolist()

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


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """One engine started on an empty cache -> (its result, the folder it filled, a copy of that folder). The cold
    start compiles every program, the slowest run here: it is made once for the module's tests."""
    folder = tmp_path_factory.mktemp("warmup") / "cache"
    result = run_engine(folder, PROMPTS)
    return result, folder, shutil.copytree(folder, folder.parent / "after-cold-start")


@pytest.fixture
def cold(cold_start):
    """The cold start's result and its folder as the cold start left it, whatever an earlier test did to it: put
    back in place, not copied elsewhere, for JAX's cache keys hold the folder's path (a copy gets no hits)."""
    result, folder, saved = cold_start
    shutil.rmtree(folder)
    shutil.copytree(saved, folder)
    return result, folder


def test_a_restart_loads_every_program_and_gives_the_same_tokens(cold):
    from gptjax import Engine

    cold, cache = cold
    assert cold["compiled"] == 3 and cold["loaded"] == 0  # prefill, insert, decode
    # request defaults are in no program: an engine that differs only in them loads the same ones
    warm = run_engine(cache, PROMPTS, temperature=0.7, top_k=40, max_new_tokens=5)
    assert warm["compiled"] == 0 and warm["loaded"] == 3
    assert warm["first"] == cold["first"] and warm["steps"] == cold["steps"]
    # the programs' tokens are the notebook path's (jit, no store) greedy tokens
    results = Engine.from_preset("gpt2-tiny").generate(PROMPTS, max_new_tokens=4, greedy=True, stop_token_ids=[])
    assert [[f, *s] for f, s in zip(cold["first"], cold["steps"])] == [r.output_ids for r in results]


def test_a_program_that_jax_cache_served_is_not_kept_whole(cold):
    # an executable JAX's persistent cache hands back fails once serialized again and loaded (XLA:CPU): the store
    # keeps only programs compiled afresh, and the next start still runs (through JAX's cache)
    cold, cache = cold
    shutil.rmtree(cache / "gptjax-programs")
    served = run_engine(cache, PROMPTS)
    assert served["compiled"] == 3 and not list((cache / "gptjax-programs").rglob("*.bin"))
    again = run_engine(cache, PROMPTS)
    assert served["first"] == again["first"] == cold["first"] and served["steps"] == again["steps"] == cold["steps"]


def test_new_code_keeps_its_programs_though_jax_cache_holds_the_old_ones(cold):
    # an upgrade changes the store (its name hashes the code) but not the programs: JAX's cache keys of a store's
    # compiles carry the store's name, so the new store compiles afresh and keeps what it compiled. The cold
    # start is the old code (this code's own fingerprint).
    old, cache = cold
    new = run_engine(cache, PROMPTS, code_version="new")
    assert new["compiled"] == 3 and new["loaded"] == 0
    restarted = run_engine(cache, PROMPTS, code_version="new")
    assert restarted["compiled"] == 0 and restarted["loaded"] == 3
    assert old["first"] == new["first"] == restarted["first"] and old["steps"] == new["steps"] == restarted["steps"]
