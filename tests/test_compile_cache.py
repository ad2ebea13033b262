"""gptjax.compile_cache: JAX's persistent cache turned on for every program, counted; whole executables kept
under names and loaded with no tracing.

The persistent-cache tests run in fresh processes (JAX settles whether it uses a cache at its first compile,
and this test process keeps none); the program store works in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_xla_flags
from gptjax import compile_cache

# a program of several ops on random inputs, so a wrong executable would show in its numbers
SCRIPT = """
import json, sys
import numpy as np
from gptjax import compile_cache
import jax, jax.numpy as jnp
where = sys.argv[1]
folder = compile_cache.disable() if where == "off" else compile_cache.enable(None if where == "default" else where)
x = np.random.default_rng(int(sys.argv[2])).normal(size=(8, 16)).astype(np.float32)
y = jax.jit(lambda a: jnp.tanh(a @ a.T) * 3 + 1)(x)
z = jax.jit(lambda a: jnp.cumsum(a, axis=1))(x)
err = max(float(np.abs(np.asarray(y) - (np.tanh(x @ x.T) * 3 + 1)).max()),
          float(np.abs(np.asarray(z) - np.cumsum(x, 1)).max()))
print(json.dumps({"folder": str(folder), "hits": compile_cache.hits(), "lookups": compile_cache.lookups(), "err": err}))
"""


def run_script(where: str, seed: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, where, str(seed)], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clean_env(**extra) -> dict:
    """The environment without the tests' shared cache settings, so `enable` picks its own folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_a_second_process_reads_every_program_from_the_default_folder(tmp_path):
    env = clean_env(GPTJAX_CACHE_DIR=str(tmp_path / "home"))
    first = run_script("default", 0, env)
    second = run_script("default", 1, env)  # other inputs of the same shapes: the same programs
    assert first["folder"] == str(tmp_path / "home" / "xla")
    assert first["hits"] == 0 and first["lookups"] >= 2  # even programs that compile in microseconds are cached
    assert second["hits"] == second["lookups"] == first["lookups"]
    assert first["err"] < 1e-5 and second["err"] < 1e-5
    assert len(list((tmp_path / "home" / "xla").iterdir())) >= 2


PRESET_SCRIPT = """
import json, sys
import numpy as np
from gptjax import compile_cache
compile_cache.enable(sys.argv[1])
from gptjax import Engine
engine = Engine.from_preset("gpt2-tiny", mesh=sys.argv[2])
print(json.dumps({"loaded": compile_cache.loaded(), "wte": np.asarray(engine.params["wte"]).tolist()[:300]}))
"""


@pytest.mark.parametrize("mesh", ["tensor=1", "data=2,stage=2,tensor=2"])
def test_a_presets_random_weights_are_read_back_whole_at_the_next_start(tmp_path, mesh):
    """The program that makes a preset's random weights is kept whole (its Flax init not traced again, ~2 s of a
    start on a CPU): the next start reads it and makes the weights that an engine built without a cache has."""
    from gptjax import Engine

    env = clean_env(XLA_FLAGS=cpu_xla_flags(8))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", PRESET_SCRIPT, str(tmp_path), mesh], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["loaded"] for r in runs] == [0, 1]
    want = np.asarray(Engine.from_preset("gpt2-tiny", mesh=mesh).params["wte"])[:300]
    assert np.array_equal(runs[0]["wte"], want) and np.array_equal(runs[1]["wte"], want)


# one program over the devices of two processes (two CPU devices each), as a multi-host job runs them
TWO_PROCESS_SCRIPT = """
import json, sys
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
from gptjax import compile_cache
compile_cache.enable(folder)
x = np.arange(32, dtype=np.float32).reshape(8, 4)
sharded = jax.make_array_from_callback(x.shape, NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d")),
                                       lambda index: x[index])
mine = np.concatenate([np.asarray(s.data) for s in jax.jit(lambda a: (a * 2).sum(1))(sharded).addressable_shards])
print(json.dumps({"hits": compile_cache.hits(), "lookups": compile_cache.lookups(),
                  "ok": mine.tolist() == (x * 2).sum(1)[4 * rank:4 * rank + 4].tolist()}))
"""


def test_every_process_of_a_job_reads_what_process_0_wrote(tmp_path):
    # JAX lets process 0 alone write the cache, and its keys differed between processes: a restarted
    # multi-process job had no hits beyond process 0's
    from launchers.slurm_localhost import free_port

    env = clean_env(XLA_FLAGS=cpu_xla_flags(2))

    def job() -> list[dict]:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, str(rank), str(port), str(tmp_path)],
                                  stdout=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
        return [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]

    first, second = job(), job()
    # process 0 compiles afresh; process 1 may already find what process 0 wrote, if it looks later (a loaded
    # machine): the restart below is what must hit on both
    assert first[0]["hits"] == 0 and all(r["ok"] for r in first + second)
    assert [(r["hits"], r["lookups"]) for r in second] == [(1, 1), (1, 1)]


def test_a_folder_jax_was_given_is_kept(tmp_path):
    env = clean_env(GPTJAX_CACHE_DIR=str(tmp_path / "unused"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
    out = run_script("default", 0, env)
    assert out["folder"] == str(tmp_path / "jax") and not (tmp_path / "unused").exists()


def test_disabled_nothing_is_looked_up_or_written(tmp_path):
    env = clean_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
    out = run_script("off", 0, env)
    assert out["lookups"] == 0 and out["err"] < 1e-5
    assert not (tmp_path / "jax").exists() or not list((tmp_path / "jax").iterdir())


def test_a_folder_that_cannot_be_made_leaves_the_cache_off_and_everything_compiles(tmp_path):
    """A cache folder is a saving, never a reason not to start: one that can't be made (a read-only home, a file
    in the way) is a warning, and the programs compile."""
    (tmp_path / "a-file").write_text("")
    env = clean_env(GPTJAX_CACHE_DIR=str(tmp_path / "a-file" / "cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "default", "0"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["folder"] == "None" and out["lookups"] == 0 and out["err"] < 1e-5
    assert "no compilation cache" in proc.stderr and "a-file" in proc.stderr


class Traces:
    """Counts JAX's tracing events while installed."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _program(a, b):
    return {"sum": jnp.sin(a) @ b, "max": jnp.max(a, axis=0)}


def test_program_store_loads_a_saved_program_without_tracing(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    jitted = jax.jit(_program)
    store = compile_cache.ProgramStore(tmp_path)
    saved = store.compiled("prog-4x6", lambda: jitted.lower(a, b))
    assert (store.loaded, store.compiled_now) == (0, 1)

    again = compile_cache.ProgramStore(tmp_path)
    with Traces() as traces:
        loaded = again.compiled("prog-4x6", lambda: pytest.fail("a saved program was lowered again"))
    assert traces.count == 0 and (again.loaded, again.compiled_now) == (1, 0)
    a2, b2 = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    out = loaded(a2, b2)
    np.testing.assert_allclose(out["sum"], np.sin(a2) @ b2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["max"], a2.max(axis=0))
    np.testing.assert_array_equal(saved(a2, b2)["max"], out["max"])


def test_program_store_compiles_again_over_a_broken_file(tmp_path):
    a = np.random.default_rng(4).normal(size=(3, 3)).astype(np.float32)
    (tmp_path / "p.bin").write_bytes(b"not a program")
    store = compile_cache.ProgramStore(tmp_path)
    program = store.compiled("p", lambda: jax.jit(jnp.cumsum).lower(a))
    assert store.compiled_now == 1
    np.testing.assert_allclose(program(a), np.cumsum(a), rtol=1e-6)
    assert compile_cache.ProgramStore(tmp_path).compiled("p", lambda: pytest.fail("not saved")) is not None


def test_a_program_file_copied_from_another_name_or_store_is_never_loaded(tmp_path):
    """Two programs of one signature (a greedy and a sampled decode, say) differ only in what they compute: a file
    of one under the other's name, or from another store's folder, would run the wrong program silently."""
    a = np.random.default_rng(6).normal(size=(3, 3)).astype(np.float32)
    store = compile_cache.ProgramStore(tmp_path / "store")
    store.compiled("plus", lambda: jax.jit(lambda x: x + 1).lower(a))
    (tmp_path / "store" / "times.bin").write_bytes((tmp_path / "store" / "plus.bin").read_bytes())
    other = compile_cache.ProgramStore(tmp_path / "other")
    (tmp_path / "other" / "plus.bin").write_bytes((tmp_path / "store" / "plus.bin").read_bytes())

    again = compile_cache.ProgramStore(tmp_path / "store")
    times = again.compiled("times", lambda: jax.jit(lambda x: x * 2).lower(a))
    np.testing.assert_allclose(times(a), a * 2, rtol=1e-6)
    minus = other.compiled("plus", lambda: jax.jit(lambda x: x - 1).lower(a))  # another store's "plus"
    np.testing.assert_allclose(minus(a), a - 1, rtol=1e-6)
    assert (again.loaded, again.compiled_now, other.loaded, other.compiled_now) == (0, 1, 0, 1)
    assert compile_cache.ProgramStore(tmp_path / "store").compiled("plus", lambda: pytest.fail("not loaded"))(a) \
        == pytest.approx(a + 1)


def test_a_store_folder_that_cannot_take_a_program_still_gives_it(tmp_path, caplog):
    """The folder deleted while a server starts (or read-only, or full): the program compiled runs, unsaved."""
    import shutil

    a = np.random.default_rng(7).normal(size=(3, 3)).astype(np.float32)
    store = compile_cache.ProgramStore(tmp_path / "store")
    shutil.rmtree(tmp_path / "store")
    program = store.compiled("p", lambda: jax.jit(jnp.cumsum).lower(a))
    np.testing.assert_allclose(program(a), np.cumsum(a), rtol=1e-6)
    assert store.compiled_now == 1 and "not saving p" in caplog.text
    (tmp_path / "blocked").write_text("")  # the stores' root can't be made: no store, the programs compile
    jax.config.update("jax_enable_compilation_cache", True)
    try:
        assert compile_cache.program_store("engine A", root=tmp_path / "blocked" / "programs") is None
    finally:
        jax.config.update("jax_enable_compilation_cache", False)
    assert "not keeping whole programs" in caplog.text


def test_program_store_refuses_names_that_are_not_file_names(tmp_path):
    with pytest.raises(ValueError, match="program name"):
        compile_cache.ProgramStore(tmp_path).compiled("../escape", lambda: None)


def test_program_store_folder_follows_identity_and_is_off_with_the_cache(tmp_path):
    assert compile_cache.program_store("engine A", root=tmp_path) is None  # this process keeps no cache
    jax.config.update("jax_enable_compilation_cache", True)
    try:  # nothing compiles here, so JAX's own choice of cache for this process is not made now
        a1 = compile_cache.program_store("engine A", root=tmp_path)
        a2 = compile_cache.program_store("engine A", root=tmp_path)
        b = compile_cache.program_store("engine B", root=tmp_path)
    finally:
        jax.config.update("jax_enable_compilation_cache", False)
    assert a1.folder == a2.folder != b.folder and a1.folder.parent == tmp_path


def test_identity_sees_layouts_not_values():
    a, b = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    assert compile_cache.identity("cfg", arrays={"w": a}) == compile_cache.identity("cfg", arrays={"w": b})
    assert compile_cache.identity("cfg", arrays={"w": a}) != compile_cache.identity("cfg", arrays={"w": a[:1]})
    assert compile_cache.identity("cfg", arrays={"w": a}) != compile_cache.identity("cfg", arrays={"w": a.astype(int)})
    assert compile_cache.identity("cfg") != compile_cache.identity("other")


def test_programs_run_a_loaded_program_by_key(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    scale = jax.jit(lambda a, k: a * k + jnp.arange(4.0), static_argnames=("k",))
    first = compile_cache.Programs()
    first.prepare(("scale", 3, 2), lambda: scale.lower(x, k=2), compile_cache.ProgramStore(tmp_path))
    assert first.get(("scale", 3, 5)) is None and len(first) == 1

    restarted = compile_cache.Programs()
    with Traces() as traces:
        restarted.prepare(("scale", 3, 2), lambda: pytest.fail("lowered again"), compile_cache.ProgramStore(tmp_path))
        x2 = rng.normal(size=(3, 4)).astype(np.float32)
        out = restarted.get(("scale", 3, 2))(x2)  # the static argument is part of the program
    assert traces.count == 0
    np.testing.assert_allclose(out, x2 * 2 + np.arange(4.0), rtol=1e-6)


def test_fingerprint_follows_the_kernel_switches(monkeypatch):
    """A kernel switch (`GPTJAX_EARLY_LAUNCH`, the decode attention's walk) changes the programs traced, so a
    stored executable made with it off must not be loaded with it on."""
    import importlib

    from gptjax.kernels import early_launch

    decode_attention = importlib.import_module("gptjax.kernels.decode_attention")  # the package's name: a function
    base = compile_cache.code_fingerprint()
    monkeypatch.setattr(early_launch, "EARLY_LAUNCH", "" if early_launch.EARLY_LAUNCH else "end")
    launched = compile_cache.code_fingerprint()
    monkeypatch.setattr(decode_attention, "SINGLE_LOOP", not decode_attention.SINGLE_LOOP)
    assert len({base, launched, compile_cache.code_fingerprint()}) == 3


def test_a_multi_process_programs_key_names_which_process_holds_each_device():
    """Two jobs whose devices are spread over their processes differently never share a program; every process
    of one job computes the same key."""
    import hashlib
    from types import SimpleNamespace

    from jax._src import cache_key

    compile_cache._listen()

    def key(processes):
        devices = np.array([SimpleNamespace(id=i, process_index=p, device_kind="cpu") for i, p in enumerate(processes)])
        h = hashlib.sha256()
        cache_key._hash_accelerator_config(h, devices)
        return h.hexdigest()

    assert key([0, 0, 1, 1]) == key([0, 0, 1, 1])
    assert key([0, 0, 1, 1]) != key([0, 1, 0, 1]) != key([0, 1, 2, 3])
