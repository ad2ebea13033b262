"""Compiled programs kept on disk between runs, so that a restarted server is ready in seconds.

Two layers. `enable` turns on JAX's persistent compilation cache for `serve`, `generate` and `bench`: a
restart reads XLA's output from disk instead of compiling again. That skips XLA's compile, but every program is
still traced and lowered to StableHLO first (the cache's key is a hash of that module), and that Python work,
one thread at a time, became most of a restart. `ProgramStore` keeps whole executables under names the caller
chooses (`jax.experimental.serialize_executable`), and loads them with no tracing or lowering at all.

    from gptjax import compile_cache
    compile_cache.enable()            # before the first compile; $GPTJAX_CACHE_DIR/xla by default
    ...
    log.info("%d of %d programs from the compilation cache", compile_cache.hits(), compile_cache.lookups())

    store = compile_cache.program_store(compile_cache.identity(config, mesh, arrays=params))  # None: cache off
    programs = compile_cache.Programs()
    programs.prepare(("step", 16), partial(step_jit.lower, params, state), store)  # loaded, or compiled + saved
    programs.get(("step", 16))(params, state)       # no jit lookup, no trace (static arguments are built in)

Every program is cached, however quick its compile or small its executable: a server compiles dozens of small
ones, and their count is what a restart pays for. A folder JAX was given already (`JAX_COMPILATION_CACHE_DIR`,
or `jax.config`) is kept, so one cache can be shared across tools. The cache is trusted code: keep it private
to the user (JAX's warning: whoever can write to it can run code in the processes that read it).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
import threading
from pathlib import Path
from typing import Callable

import jax
import jax.monitoring
import jaxlib
from jax.experimental import serialize_executable

from gptjax import paths

_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"  # a compile that consulted the cache
_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # ... and found its program there
_LOADED = "programs loaded whole"  # by a ProgramStore, in this process
_counts = {_REQUEST_EVENT: 0, _HIT_EVENT: 0, _LOADED: 0}
_lock = threading.Lock()  # warm-up compiles on several threads
_listening = False
log = logging.getLogger("gptjax.compile_cache")


def default_dir() -> Path:
    return paths.cache_dir() / "xla"


_this_thread = threading.local()  # .cache_hit: this thread's last compile came from the persistent cache


def _count(event: str, **_metadata) -> None:
    if event == _HIT_EVENT:  # JAX records it in the thread that compiles
        _this_thread.cache_hit = True
    if event in _counts:
        with _lock:
            _counts[event] += 1


def _listen() -> None:
    """Count the cache's events (the same names in jax 0.10 and 0.11), salt its keys (`_salt_cache_keys`) and
    give every process of a job the same keys (`_same_keys_on_every_process`), once per process."""
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _salt_cache_keys()
            _same_keys_on_every_process()
            _listening = True


def _same_keys_on_every_process() -> None:
    """Only process 0 writes JAX's cache, and JAX's key of a program that spans processes hashes the devices'
    topology as each process sees it, which differs between them (on XLA:CPU at least): so the other processes
    never found a program process 0 wrote, and every restart of a multi-process job compiled everything again
    on each of them. For such programs the key takes the devices' kinds instead, as JAX does for a backend
    without a topology, and which process holds each device."""
    try:
        from jax._src import cache_key
    except ImportError:
        return
    per_process = getattr(cache_key, "_hash_accelerator_config", None)
    if per_process is None or not hasattr(cache_key, "_hash_devices"):
        return

    def hash_devices(hash_obj, devices) -> None:
        if len({d.process_index for d in devices.flat}) > 1:
            cache_key._hash_devices(hash_obj, devices)
            # which process holds which device, the same on every process: a job of 2 x 4 devices and one of 4 x 2
            # never share a program
            hash_obj.update(repr([(d.id, d.process_index) for d in devices.flat]).encode())
        else:
            per_process(hash_obj, devices)
    cache_key._hash_accelerator_config = hash_devices


def _salt_cache_keys() -> None:
    """JAX's cache key takes a string from `cache_key.custom_hook`: while a ProgramStore compiles on a thread,
    that string is the store's name, so the store's programs have keys of their own in JAX's cache. A store of
    new code (an upgrade) then compiles its programs afresh, and can keep them, instead of being handed the
    old entries, which it could not keep (see ProgramStore.compiled). Without the hook (another jax), nothing
    is salted and such programs go through JAX's cache."""
    try:
        from jax._src import cache_key
    except ImportError:
        return
    plain = getattr(cache_key, "custom_hook", None)
    if plain is None:
        return

    def salted() -> str:
        return plain() + getattr(_this_thread, "salt", "")
    cache_key.custom_hook = salted


def enable(cache_dir: Path | str | None = None) -> Path | None:
    """Turn the persistent cache on -> the folder in use. `cache_dir` None: the folder JAX was already given,
    else `$GPTJAX_CACHE_DIR/xla` (`~/.cache/gptjax/xla`). Call it before the first compile: JAX settles whether
    it uses a cache at its first compile, and keeps to that. A folder that can't be made leaves the cache off,
    with a warning, -> None: a cache saves time, and its folder is never a reason not to start."""
    if cache_dir is None:
        cache_dir = jax.config.jax_compilation_cache_dir or default_dir()
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        log.warning("no compilation cache: its folder %s can't be made (%s); every program compiles", folder, e)
        disable()
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, none chosen for us
    _listen()
    return folder


def disable() -> None:
    """No persistent cache in this process (`--no-compile-cache`), whatever the environment says."""
    jax.config.update("jax_enable_compilation_cache", False)


def hits() -> int:
    """Programs this process read from the persistent cache instead of compiling (since `enable`)."""
    with _lock:
        return _counts[_HIT_EVENT]


def lookups() -> int:
    """Compiles that looked in the persistent cache (hits and misses; since `enable`)."""
    with _lock:
        return _counts[_REQUEST_EVENT]


def loaded() -> int:
    """Programs this process loaded whole from a ProgramStore: no tracing, lowering or compile lookup."""
    with _lock:
        return _counts[_LOADED]


# ---- whole executables under the caller's names ------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PROGRAM_CODE = Path(__file__).resolve().parent  # the package whose code makes the programs: gptjax/
# jax settings that change a program without changing its name or the engine's configuration
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable")
# this project's module switches that kernels read as they are traced: (module, attribute)
_KERNEL_SWITCHES = (("gptjax.kernels.early_launch", "EARLY_LAUNCH"), ("gptjax.kernels.decode_attention", "SINGLE_LOOP"),
                    ("gptjax.decode_block", "KERNEL_MAX_BYTES"))


class ProgramStore:
    """Executables in one folder, one file per name. The folder's name is a fingerprint of everything that
    determines the programs besides their names (`program_store`), so a name alone picks the program."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self.loaded = 0  # programs read from disk
        self.compiled_now = 0  # programs compiled (and saved) because no file held them

    def compiled(self, name: str, lower: Callable[[], "jax.stages.Lowered"]) -> "jax.stages.Compiled":
        """The program `name`: read from disk if saved (no tracing, no lowering), else `lower()` compiled now
        and saved. A file that does not load (from another jax, say, or cut short) is compiled again."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"program name {name!r}: use letters, digits, '.', '_' and '-'")
        path = self.folder / f"{name}.bin"
        if path.exists():
            try:
                program = _load(path, self._label(name))
                with self._lock:
                    self.loaded += 1
                _count(_LOADED)
                return program
            except Exception as e:  # a stale or broken file costs a compile, never a start
                log.warning("compiling %s again: its saved program did not load (%s: %s)", name, type(e).__name__, e)
        _this_thread.cache_hit, _this_thread.salt = False, f"gptjax-program-store:{self.folder.name}"
        try:
            program = lower().compile()
        finally:
            _this_thread.salt = ""
        # an executable that JAX's cache handed back does not survive serializing again on XLA:CPU (its loaded
        # copy fails with "Function ... not found"): only a program compiled afresh is kept whole
        if not _this_thread.cache_hit:
            _save(program, path, self._label(name))
        with self._lock:
            self.compiled_now += 1
        return program

    def _label(self, name: str) -> str:
        """What a file holds, written into it: a file copied or renamed from another name or store (whose
        program may take the same arguments and compute something else) is never loaded as this one."""
        return f"{self.folder.name}/{name}"


def _load(path: Path, label: str) -> "jax.stages.Compiled":
    _load_kernel_runtimes()
    with open(path, "rb") as f:
        saved_as, (blob, in_tree, out_tree), device_ids = pickle.load(f)
    if saved_as != label:
        raise ValueError(f"the file holds the program {saved_as!r}")
    by_id = {d.id: d for d in jax.devices()}
    # onto the devices it was compiled for, in their order (by default it would expect one shard per device)
    return serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                     execution_devices=[by_id[i] for i in device_ids])


def _load_kernel_runtimes() -> None:
    """A Mosaic GPU kernel calls into a runtime library that loads with its Python module: a saved program
    holding one finds its host symbols only once that module is imported (a compile imports it; a load must)."""
    if jax.devices()[0].platform == "gpu":
        try:
            importlib.import_module("jax.experimental.pallas.mosaic_gpu")
        except ImportError:  # no Mosaic GPU in this jax: no saved program can hold its kernels
            pass


def _save(program: "jax.stages.Compiled", path: Path, label: str) -> None:
    """Written beside, then renamed: a reader never sees half a file, and two writers leave one whole file. A
    folder that can't take it (read-only, full, deleted meanwhile) costs the next start a compile, not this one."""
    try:
        device_ids = [d.id for d in program.runtime_executable().local_devices()]
        data = pickle.dumps((label, serialize_executable.serialize(program), device_ids))
    except (ValueError, NotImplementedError, pickle.PicklingError) as e:  # a program that can't be saved runs
        log.warning("not saving %s: %s", path.stem, e)
        return
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as e:
        log.warning("not saving %s: %s", path.stem, e)
        partial.unlink(missing_ok=True)


class Programs:
    """An engine's warm-up programs by key (a shape), each loaded from a store or compiled once, and called
    directly rather than through `jax.jit`: a program loaded whole is in no jit's cache, so a jitted call of its
    shape would trace, lower and compile again."""

    def __init__(self):
        self._by_key: dict[tuple, "jax.stages.Compiled"] = {}

    def prepare(self, key: tuple, lower: Callable[[], "jax.stages.Lowered"],
                store: ProgramStore | None = None) -> "jax.stages.Compiled":
        """The program of `key`: from `store` (saved under the key's name) when it has it, else lowered and
        compiled now (and saved to `store`). Any thread may call it."""
        name = "-".join(str(part) for part in key)
        program = store.compiled(name, lower) if store is not None else lower().compile()
        self._by_key[key] = program
        return program

    def get(self, key: tuple) -> "jax.stages.Compiled | None":
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)


def identity(*parts, arrays=None) -> str:
    """What determines a set of programs besides their names and the code, as text for `program_store`: the
    parts' reprs (configurations, a mesh) and each array's shape, dtype and sharding (never its values)."""
    layout = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", None))), arrays)
    return repr((parts, layout))


def code_fingerprint() -> str:
    """A hash of the source that makes the programs (gptjax/*.py and its kernels), the jax and XLA in use, the
    devices, and the settings that change programs (`XLA_FLAGS`, x64, matmul precision, PRNG, the kernels'
    switches: `GPTJAX_EARLY_LAUNCH` sets one)."""
    h = hashlib.sha256()
    for source in sorted(_PROGRAM_CODE.rglob("*.py")):
        h.update(source.relative_to(_PROGRAM_CODE).as_posix().encode())
        h.update(source.read_bytes())
    devices = jax.devices()
    h.update(repr((jax.__version__, jaxlib.__version__,
                   devices[0].client.platform_version, [d.device_kind for d in devices], jax.process_count(),
                   os.environ.get("XLA_FLAGS", ""), [getattr(jax.config, k, None) for k in _JAX_SETTINGS],
                   [getattr(importlib.import_module(m), a) for m, a in _KERNEL_SWITCHES])).encode())
    return h.hexdigest()


def program_store(identity: str, root: Path | None = None) -> ProgramStore | None:
    """The store for the programs of one engine: `identity` names what else determines them (the model and
    engine configuration, the mesh, the attention implementation). None when the persistent cache is off, or
    with several processes (each would need its own copy of every executable; JAX's cache serves them)."""
    if not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
        return None
    if root is None:
        if not jax.config.jax_compilation_cache_dir:
            return None
        # inside JAX's folder, as JAX keeps its autotuning cache: JAX's eviction reads only its own top-level files
        root = Path(jax.config.jax_compilation_cache_dir) / "gptjax-programs"
    key = hashlib.sha256((code_fingerprint() + identity).encode()).hexdigest()[:24]
    try:
        return ProgramStore(Path(root) / key)
    except OSError as e:  # a read-only cache: the programs compile (JAX's cache may still serve them)
        log.warning("not keeping whole programs: their folder can't be made (%s)", e)
        return None
