"""Multi-process start-up and the one place that knows which process is process 0.

A job is one process per host (seeing all of its GPUs) or one per GPU, started by srun, by mpirun or by hand
with `--coordinator HOST:PORT --num-processes N --process-id I`. Every process runs the same program; the
jitted calls span every device of every process. `initialize` must run before anything touches a JAX
backend. A process that dies takes the job down: the others miss its heartbeats and exit non-zero within
`HEARTBEAT_TIMEOUT_S` (or `$GPTJAX_HEARTBEAT_TIMEOUT_S` seconds), so a launcher can restart the job instead of
waiting on a hang.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sys
import time
import zlib

import jax
import numpy as np

LEADER_GRACE_S = 2.0  # how long process 0 of a job it leaves early lets the others print their own error first
COORDINATOR_PORTS = range(61440, 65536)  # where a launcher's job puts its coordinator (unless JAX_COORDINATOR_PORT)
HEARTBEAT_TIMEOUT_S = 15  # a process silent this long is dead, and the job ends ($GPTJAX_HEARTBEAT_TIMEOUT_S)
INIT_TIMEOUT_S = 300  # how long processes wait for each other at start-up


def _slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[03-05,7],gpu1` -> `node03`."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not m:
        raise ValueError(f"can't read a host from SLURM_STEP_NODELIST={nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def env_int(env, name: str, default: int | None = None, low: int = 0, high: int | None = None,
            what: str = "") -> int:
    """The whole number a launcher (or the user) put in environment variable `name`; `default` when it is unset
    (None: it must be set). ValueError naming the variable and its value otherwise: int() said only "invalid
    literal", and a variable that was missing a KeyError traceback."""
    text = env.get(name)
    if text is None or (not text.strip() and default is not None):
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    text = text.strip()
    value = int(text) if text.isascii() and text.isdigit() else None  # int() also reads "1_0" and other digits
    if value is None or value < low or (high is not None and value > high):
        what = what or (f"a whole number between {low} and {high}" if high is not None else f"a whole number >= {low}")
        raise ValueError(f"{name} must be {what}, got {text!r}")
    return value


def _local_tasks_slurm(env) -> int:
    """Tasks of this step on this node (SLURM_STEP_TASKS_PER_NODE is like `2(x3),1`)."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    node = env_int(env, "SLURM_NODEID", 0)
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            break
        count, repeat = int(m.group(1)), int(m.group(2) or 1)
        if node < repeat:
            return count
        node -= repeat
    return 1


def launcher_rank(process_id: int | None = None) -> int:
    """This process's index as --process-id or the launcher tells it, known before jax.distributed starts
    (process 0 listens for clients while the model loads)."""
    if process_id is not None:
        return int(process_id)
    launched = launcher_env()
    return launched["process_id"] if launched else 0


def launcher_env(env=None) -> dict | None:
    """What srun or mpirun tells a process: {launcher, coordinator, num_processes, process_id, local_rank,
    local_size}; None when no multi-process launcher started this one. The coordinator is the first host
    (srun) or mpirun's own host, on a port derived from the job id unless JAX_COORDINATOR_PORT says."""
    env = os.environ if env is None else env
    if "OMPI_COMM_WORLD_SIZE" in env:
        size = env_int(env, "OMPI_COMM_WORLD_SIZE", low=1)
        if size < 2:
            return None  # one rank of mpirun: a lone process, whatever else its environment says
        uri = env.get("OMPI_MCA_orte_hnp_uri", "")  # Open MPI 4: `<jobid>.0;tcp://IP[,IP...]:PORT`
        m = re.search(r"tcp://([^,:;]+)", uri)
        coordinator = f"{m.group(1)}:{coordinator_port(uri.split(';')[0], env)}" if m else None
        return dict(launcher="mpirun", coordinator=coordinator, num_processes=size,
                    process_id=_rank(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", size),
                    local_rank=env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                    local_size=env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, low=1))
    size_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and env.get(size_name):
        size = env_int(env, size_name, low=1)
        if size < 2:
            return None
        port = coordinator_port(f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}", env)
        local_size = _local_tasks_slurm(env)
        return dict(launcher="srun", coordinator=f"{_slurm_first_host(env['SLURM_STEP_NODELIST'])}:{port}",
                    num_processes=size, process_id=_rank(env, "SLURM_PROCID", size_name, size),
                    local_rank=env_int(env, "SLURM_LOCALID", 0), local_size=local_size)
    return None


def _rank(env, name: str, size_name: str, size: int) -> int:
    """This process's index from the launcher's variable `name`, inside the job of `size` (`size_name`)."""
    if env.get(name) is None:
        raise ValueError(f"{name} is not set, but {size_name}={size} is: start every process with the launcher")
    return env_int(env, name, high=size - 1, what=f"a whole number in [0, {size_name}={size})")


def coordinator_port(job: str, env) -> int:
    """The coordinator's port of a launcher's job: $JAX_COORDINATOR_PORT, else one of COORDINATOR_PORTS picked by
    a hash of the job's whole id (mpirun's job family and number; srun's job and step), so that two jobs, or two
    steps of one job, on one host rarely pick the same port. (The job id modulo the range collided: Open MPI's
    ids end in 16 zero bits, so every mpirun job took the same port.)"""
    port = env_int(env, "JAX_COORDINATOR_PORT", 0, low=1, high=65535, what="a port number between 1 and 65535")
    return port or COORDINATOR_PORTS[zlib.crc32(job.encode()) % len(COORDINATOR_PORTS)]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed for a multi-process job: from explicit flags, else from srun's or mpirun's
    environment; a lone process needs nothing. Flags given override what the launcher says. Once started, a
    second call does nothing."""
    if jax.distributed.is_initialized():
        return
    launched = launcher_env()
    explicit = (coordinator, num_processes, process_id)
    if launched is None and explicit == (None, None, None):
        return
    launched = launched or {}
    coordinator = coordinator or launched.get("coordinator")
    num_processes = launched.get("num_processes") if num_processes is None else num_processes
    process_id = launched.get("process_id") if process_id is None else process_id
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("--coordinator, --num-processes and --process-id go together (or start every process "
                         "with srun or mpirun; under an mpirun that does not say where it runs, such as Open MPI 5, "
                         "pass --coordinator HOST:PORT of rank 0's host)")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is outside [0, {num_processes})")
    # several processes on one node: each takes one GPU (its local rank); one process per node takes them all
    local_devices = [launched["local_rank"]] if launched.get("local_size", 1) > 1 else None
    if process_id == 0:
        check_coordinator_port(coordinator)
    try:  # cross-process collectives between CPU devices too (so a job runs on CPU-only hosts)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    _results_only_on_stdout()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_devices,
                               cluster_detection_method="deactivate", initialization_timeout=INIT_TIMEOUT_S,
                               heartbeat_timeout_seconds=heartbeat_timeout_s())
    # JAX's preemption notice takes SIGTERM for itself (in C: Python still reports its own handler), and a job
    # would then ignore it while it loads, or for a whole `generate`: the handlers that were there come back (the
    # server installs its drain later)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def check_coordinator_port(coordinator: str) -> None:
    """Raise ValueError when process 0 can't have the coordinator's port: JAX's coordination service would bind
    it beside another job's coordinator (it shares ports), and that job would end when this one's processes
    connect to it. (This job's other processes may still reach that coordinator before this one fails: each job
    needs a port of its own.)"""
    port = int(coordinator.rsplit(":", 1)[1])
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host: the service binds IPv4
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                s.bind(address)
                return
            except OSError as e:
                if e.errno != errno.EADDRINUSE:  # IPv6 off, say: the next family
                    continue
                raise ValueError(f"the coordinator's port {port} is in use: another job's coordinator? Give this "
                                 "job its own with --coordinator HOST:PORT or $JAX_COORDINATOR_PORT") from None


def leave_job(code: int) -> int:
    """`code`; but a process of a multi-process job ends at once: a clean exit would first wait, up to 5 minutes,
    at the job's shutdown barrier for processes still loading, which the heartbeats end instead. Process 0 holds
    the job's coordination service: it waits a moment first, so that processes failing alike say why themselves."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        if jax.process_index() == 0:
            time.sleep(LEADER_GRACE_S)
        os._exit(code)
    return code


def end_job(code: int) -> int:
    """`code`; but a process of a multi-process job meets the others at the job's shutdown barrier and then ends
    at once, its backend left to the operating system. Torn down by the interpreter's last garbage collection,
    after the coordination service had gone, a CPU backend's thread pool hung a process's exit for good (a
    refused job's arrays had kept the backend alive until then: 1 of 5 such jobs under load)."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            jax.distributed.shutdown()
        except Exception as e:  # a process lost at the very end: this one's work is done, the job's is not
            print(f"gptjax: the job did not end cleanly: {e}", file=sys.stderr, flush=True)
            code = code or 1
        os._exit(code)
    return code


def heartbeat_timeout_s(env=None) -> int:
    """Seconds of silence after which a process counts as dead: `$GPTJAX_HEARTBEAT_TIMEOUT_S`, else
    `HEARTBEAT_TIMEOUT_S`. Shorter ends a broken job sooner; longer rides out a busy host's stalls."""
    return env_int(os.environ if env is None else env, "GPTJAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S, low=1,
                   what="a whole number of seconds >= 1")


def _results_only_on_stdout() -> None:
    """Native libraries of a multi-process job (gloo's rendezvous, say) log to file descriptor 1; send that
    to stderr and keep the real stdout for what Python prints, so `--json` output stays parseable."""
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(results, "w", buffering=1)


def is_main_process() -> bool:
    """Process 0 prints results and serves clients; every other process only follows."""
    return jax.process_index() == 0


def broadcast_from_main(x: np.ndarray) -> np.ndarray:
    """Process 0's array, on every process: how the server's step commands reach the followers."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def same_on_every_process(text: str) -> bool:
    """Whether every process of the job holds the same `text` (its hash, gathered to every process)."""
    from jax.experimental import multihost_utils

    mine = np.uint32(zlib.crc32(text.encode()))
    return len(set(np.asarray(multihost_utils.process_allgather(mine)).tolist())) == 1


def to_global(tree, mesh):
    """Host arrays that every process holds the same copy of (one, or a pytree of them; device arrays pass as
    they are) -> arrays replicated over `mesh`, sent by one call (a transfer an array). (`jnp.asarray` would run
    a small program per array: about half a millisecond each on the GPU, RESULTS run 18.)"""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated)

    def one(x):
        return x if isinstance(x, jax.Array) else jax.make_array_from_callback(
            x.shape, replicated, lambda index: x[index])

    return jax.tree.map(one, tree)


def to_host(tree):
    """Replicated arrays (one, or a pytree of them) -> numpy, on every process (each reads its own copy); all
    of them fetched at once."""
    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:  # this process's piece would be read as if it were the whole
            raise ValueError(f"to_host reads replicated arrays; this one is split as {x.sharding.spec}")
        return x.addressable_data(0)

    return jax.device_get(jax.tree.map(local, tree))
