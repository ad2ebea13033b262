"""Multi-process jobs on CPU: two processes of 4 CPU devices each form one 8-device mesh (gloo collectives).

Every process runs the same command; only process 0 prints. A process that dies ends the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cpu_xla_flags, run_cli
from gptjax import distributed
from launchers import slurm_localhost

ROOT = Path(__file__).parent.parent
HOLD = Path(__file__).parent / "launchers" / "hold.py"
PROMPTS = ["5,17,99,3", "7"]
GENERATE = ["generate", *(a for p in PROMPTS for a in ("--prompt-ids", p)), "--max-new-tokens", "8",
            "--mesh", "tensor=8", "--greedy", "--json"]
CPU4 = {"XLA_FLAGS": cpu_xla_flags(4), "JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    return slurm_localhost.free_port()


def slurm_env(rank: int, port: int, n: int = 2) -> dict:
    """What srun sets for task `rank` of an n-task step on one node."""
    return {**os.environ, **CPU4, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(n), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "JAX_COORDINATOR_PORT": str(port), "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def single_process_lines():
    """What one process with 8 devices prints: the reference for every multi-process run."""
    out = run_cli(*GENERATE).stdout.splitlines()
    assert len(out) == len(PROMPTS) and all(json.loads(line)["output_ids"] for line in out)
    return out


def check_job(results, single_process_lines):
    """results: [(returncode, stdout, stderr)] by process index."""
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {rank} exited {rc}:\n{err[-3000:]}"
    assert results[0][1].splitlines() == single_process_lines
    assert all(not out.strip() for _, out, _ in results[1:])


def test_host_arrays_cross_as_one_pytree_and_come_back_as_numpy():
    """What the engine sends a call (prompts, lengths, sampling arrays; some already on the device) arrives
    replicated over the mesh, and what it reads back arrives as numpy, whatever the pytree."""
    import jax
    import numpy as np

    from gptjax.engine_api import SamplingArrays

    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 50257, (3, 5)).astype(np.int32)
    samp = SamplingArrays(rng.random(3, np.float32), np.arange(3, dtype=np.int32), rng.random(3, np.float32),
                          np.arange(3, dtype=np.uint32))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_device = jax.device_put(np.arange(3, dtype=np.int32), replicated)
    sent = distributed.to_global((prompts, samp, on_device), mesh)
    assert isinstance(sent[1], SamplingArrays)
    for leaf in jax.tree.leaves(sent):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated and leaf.sharding.mesh == mesh
    back = distributed.to_host(sent)
    assert isinstance(back[1], SamplingArrays)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves((prompts, samp, np.arange(3, dtype=np.int32)))):
        assert isinstance(got, np.ndarray) and np.array_equal(got, want) and got.dtype == want.dtype


# ---- reading the launchers' environments ------------------------------------------------------------------
def test_srun_environment():
    env = {"SLURM_JOB_ID": "1000", "SLURM_STEP_NODELIST": "gpu[07-09,12],login1", "SLURM_NTASKS": "8",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    got = distributed.launcher_env(env)
    port = distributed.coordinator_port("1000.0", {})
    assert got == dict(launcher="srun", coordinator=f"gpu07:{port}", num_processes=8,
                       process_id=5, local_rank=1, local_size=2)
    # another step of the job (srun inside one allocation) picks another port
    assert distributed.launcher_env({**env, "SLURM_STEP_ID": "1"})["coordinator"] != f"gpu07:{port}"
    assert distributed.launcher_env({**env, "SLURM_NODEID": "3"})["local_size"] == 1
    assert distributed.launcher_env({**env, "JAX_COORDINATOR_PORT": "1234"})["coordinator"] == "gpu07:1234"
    assert distributed.launcher_env({**env, "SLURM_NTASKS": "1"}) is None  # one task: nothing to start


def test_mpirun_environment():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "2906324992.0;tcp://10.1.2.3,172.17.0.1:45001"}
    got = distributed.launcher_env(env)
    assert got == dict(launcher="mpirun", coordinator=f"10.1.2.3:{distributed.coordinator_port('2906324992.0', {})}",
                       num_processes=4, process_id=3, local_rank=1, local_size=2)
    # two mpirun jobs: Open MPI's job ids end in 16 zero bits, and the ports must still differ
    other = distributed.launcher_env({**env, "OMPI_MCA_orte_hnp_uri": "2906390528.0;tcp://10.1.2.3:45002"})
    assert other["coordinator"] != got["coordinator"]
    assert {int(c.rsplit(":")[1]) for c in (got["coordinator"], other["coordinator"])} <= set(
        distributed.COORDINATOR_PORTS)
    # one rank is a lone process, even inside a Slurm step of several tasks
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    assert distributed.launcher_env({**slurm, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None


SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
MPIRUN = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}


@pytest.mark.parametrize("env, name", [
    (SRUN, "SLURM_NTASKS"), ({**SRUN, "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS"), (SRUN, "SLURM_PROCID"),
    (SRUN, "SLURM_LOCALID"), (SRUN, "SLURM_NODEID"), (MPIRUN, "OMPI_COMM_WORLD_SIZE"),
    (MPIRUN, "OMPI_COMM_WORLD_RANK"), (MPIRUN, "OMPI_COMM_WORLD_LOCAL_RANK"), (MPIRUN, "OMPI_COMM_WORLD_LOCAL_SIZE"),
])
@pytest.mark.parametrize("value", ["two", "2.0", "-1", "1_0", "\u0663"])
def test_a_launcher_variable_that_is_not_a_whole_number_is_named_with_its_value(env, name, value):
    """int() said "invalid literal for int() with base 10: 'two'", naming no variable (and read "1_0" as 10)."""
    with pytest.raises(ValueError, match=f"^{name} must be a whole number.*, got {value!r}$"):
        distributed.launcher_env({**env, name: value})


def test_a_rank_outside_the_job_or_missing_is_named():
    """A missing rank was a KeyError traceback; one past the job's size was blamed on --process-id."""
    for env, rank, size in ((SRUN, "SLURM_PROCID", "SLURM_NTASKS"), (MPIRUN, "OMPI_COMM_WORLD_RANK",
                                                                     "OMPI_COMM_WORLD_SIZE")):
        with pytest.raises(ValueError, match=f"{rank} must be a whole number in \\[0, {size}=2\\), got '2'"):
            distributed.launcher_env({**env, rank: "2"})
        with pytest.raises(ValueError, match=f"{rank} is not set, but {size}=2 is"):
            distributed.launcher_env({k: v for k, v in env.items() if k != rank})
    assert distributed.launcher_env({**SRUN, "SLURM_PROCID": " 1 "})["process_id"] == 1


def test_a_launcher_variable_error_ends_the_command_with_exit_2():
    proc = run_cli("generate", "--prompt", "x", "--max-new-tokens", "1", env={**SRUN, "SLURM_NTASKS": "two"},
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gptjax generate: error: SLURM_NTASKS must be a whole number >= 1, got 'two'"]


def test_no_launcher_and_partial_flags(monkeypatch):
    assert distributed.launcher_env({"PATH": "/bin"}) is None
    for name in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(name)
    distributed.initialize()  # a lone process: nothing to do
    with pytest.raises(ValueError, match="--coordinator, --num-processes and --process-id go together"):
        distributed.initialize(coordinator="localhost:1234")


def test_heartbeat_timeout_from_the_environment():
    assert distributed.heartbeat_timeout_s({}) == distributed.HEARTBEAT_TIMEOUT_S
    assert distributed.heartbeat_timeout_s({"GPTJAX_HEARTBEAT_TIMEOUT_S": " 40 "}) == 40
    for bad in ("0", "-3", "2.5", "ten", "\u0663"):  # the last: an Arabic-Indic digit, which int() would take
        with pytest.raises(ValueError, match="GPTJAX_HEARTBEAT_TIMEOUT_S"):
            distributed.heartbeat_timeout_s({"GPTJAX_HEARTBEAT_TIMEOUT_S": bad})


def test_a_coordinator_port_from_the_environment_is_checked_naming_it():
    """"abc" was int()'s message, naming nothing; 99999 an OverflowError traceback from bind()."""
    assert distributed.coordinator_port("1.0", {"JAX_COORDINATOR_PORT": " 1234 "}) == 1234
    for bad in ("abc", "0", "99999", "-1", "\u0663"):
        with pytest.raises(ValueError, match=f"JAX_COORDINATOR_PORT must be a port number between 1 and 65535, "
                                             f"got {bad!r}"):
            distributed.coordinator_port("1.0", {"JAX_COORDINATOR_PORT": bad})


def test_a_job_of_no_processes_is_named(monkeypatch):
    """It said "--process-id 0 is outside [0, 0)", blaming the flag that was right."""
    for name in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="--num-processes must be at least 1, got 0"):
        distributed.initialize(coordinator="localhost:1234", num_processes=0, process_id=0)


@pytest.mark.parametrize("shutdown_fails", [False, True])
def test_a_job_ends_at_its_shutdown_barrier_and_leaves_at_once(monkeypatch, capsys, shutdown_fails):
    """After the barrier the process exits without tearing its backend down; a barrier that fails (a process
    lost at the very end) still ends it, non-zero, saying so."""
    import jax

    calls = []

    def shutdown():
        calls.append("shutdown")
        if shutdown_fails:
            raise RuntimeError("injected: task 1 is gone")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "shutdown", shutdown)
    monkeypatch.setattr(distributed.os, "_exit", lambda code: calls.append(("exit", code)))
    distributed.end_job(0)
    assert calls == ["shutdown", ("exit", 1 if shutdown_fails else 0)]
    assert ("injected: task 1 is gone" in capsys.readouterr().err) == shutdown_fails


def test_process_0_refuses_a_coordinator_port_another_job_holds():
    """JAX's coordination service would bind beside a running job's coordinator (it shares its port) and that
    job would end; process 0 refuses the port first. A free port passes."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC server binds
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=f"coordinator's port {port} is in use"):
            distributed.check_coordinator_port(f"localhost:{port}")
    distributed.check_coordinator_port(f"localhost:{free_port()}")


SIGTERM_AFTER_START = """
import os, signal, sys, time
from gptjax import distributed
distributed.initialize(coordinator="127.0.0.1:" + sys.argv[1], num_processes=1, process_id=0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running 5 s after SIGTERM")
"""


def test_sigterm_still_ends_a_process_once_the_job_has_started():
    """jax.distributed takes SIGTERM for its preemption notice, which would leave a loading server, or a whole
    `generate`, deaf to it; the handler that was there comes back."""
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_START, str(free_port())], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env={**os.environ, **CPU4, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGTERM and "still running" not in proc.stdout, proc.stderr[-2000:]


# ---- real jobs -------------------------------------------------------------------------------------------
def run_job(envs, args, timeout=240):
    procs = [subprocess.Popen([sys.executable, "-m", "gptjax", *args], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in envs]
    try:
        return [_wait(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _wait(p, timeout):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_a_checkpoint_whose_stages_span_processes_loads(converted_dir):
    """README's multi-host example: `--checkpoint` with the stage axis across processes. Each process reads the
    layers its own devices hold, and the job gives one process's tokens."""
    args = ["generate", "--checkpoint", str(converted_dir), *(a for p in PROMPTS for a in ("--prompt-ids", p)),
            "--max-new-tokens", "4", "--greedy", "--json"]
    port = free_port()
    results = run_job([slurm_env(0, port), slurm_env(1, port)], [*args, "--mesh", "stage=2,tensor=4"])
    check_job(results, run_cli(*args).stdout.splitlines())


# `gptjax` whose model fails to load on this process alone (its host's copy of a checkpoint is damaged, say)
FAILING_LOAD = """
import sys
from gptjax.engine import Engine
def from_preset(*args, **kwargs):
    raise ValueError("injected: this host's copy of the weights is damaged")
Engine.from_preset = from_preset
from gptjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_that_fails_at_start_ends_the_job_at_once():
    """Its one-line error and exit 2 at once, not after waiting at the job's shutdown barrier (up to 5 minutes)
    for the others; the other process then ends by the heartbeats."""
    port, fast = free_port(), {"GPTJAX_HEARTBEAT_TIMEOUT_S": "5"}
    args = ["generate", "--prompt-ids", "5,17", "--max-new-tokens", "2", "--mesh", "tensor=8"]
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, *program, *args], env={**slurm_env(rank, port), **fast},
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank, program in ((0, ["-m", "gptjax"]), (1, ["-c", FAILING_LOAD]))]
    ended = {}
    try:
        while len(ended) < 2 and time.monotonic() - start < 200:
            ended.update({rank: time.monotonic() for rank, p in enumerate(procs) if p.poll() is not None
                          and rank not in ended})
            time.sleep(0.2)
        results = [_wait(p, 10) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert results[1][0] == 2 and "gptjax generate: error:" in results[1][2], results[1][2][-2000:]
    assert results[0][0] != 0 and ended[1] < ended[0]  # the failed process did not wait for the other


def test_a_job_without_a_mesh_over_all_its_devices_says_so():
    port = free_port()
    results = run_job([slurm_env(0, port), slurm_env(1, port)], ["generate", "--prompt-ids", "5", "--max-new-tokens",
                                                                 "1"], timeout=120)
    for rc, _, err in results:
        assert rc == 2 and "runs one model over all 8 devices: give --mesh with data*stage*tensor = 8" in err, err


def test_a_bad_prompt_in_a_job_is_refused_by_every_process():
    """Every process meets it alike after the job started: each says so and exits 2 (process 0, which holds the
    job's coordination, lets the others say it first)."""
    port = free_port()
    results = run_job([slurm_env(0, port), slurm_env(1, port)], ["generate", "--prompt-ids", "5,99999999",
                                                                 "--max-new-tokens", "2", "--mesh", "tensor=8"])
    for rc, _, err in results:
        assert rc == 2 and "prompts[0][1] = 99999999 is outside the vocabulary" in err, err[-2000:]


def test_processes_started_with_different_settings_are_refused():
    port, args = free_port(), ["generate", "--prompt-ids", "5", "--max-new-tokens", "1", "--mesh", "tensor=8"]
    procs = [subprocess.Popen([sys.executable, "-m", "gptjax", *args, *extra], env=slurm_env(rank, port), cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank, extra in ((0, []), (1, ["--dtype", "bfloat16"]))]
    try:
        results = [_wait(p, 120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, _, err in results:
        assert rc == 2 and "the processes of this job were started with different models or settings" in err, \
            err[-2000:]


def test_two_processes_with_srun_environment(single_process_lines):
    port = free_port()
    check_job(run_job([slurm_env(0, port), slurm_env(1, port)], GENERATE), single_process_lines)


@pytest.mark.parametrize("victim, flags", [(1, True), (0, False)],
                         ids=["follower dies (explicit flags)", "process 0 dies (srun environment)"])
def test_a_dead_process_ends_the_job(victim, flags):
    port = free_port()
    quick = {"GPTJAX_HEARTBEAT_TIMEOUT_S": "5"}  # the survivor gives up 5 s after the last heartbeat, not 15
    if flags:  # --coordinator/--num-processes/--process-id, as `gptjax ... --coordinator` passes them
        cmds = [[str(HOLD), f"localhost:{port}", "2", str(i)] for i in range(2)]
        envs = [{**os.environ, **CPU4, **quick, "PYTHONPATH": str(ROOT)}] * 2
    else:
        cmds = [[str(HOLD)]] * 2
        envs = [{**slurm_env(i, port), **quick} for i in range(2)]
    procs = [subprocess.Popen([sys.executable, *cmd], env=env, cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for cmd, env in zip(cmds, envs)]
    try:
        for p in procs:  # both are past start-up and running collectives
            line = p.stderr.readline()
            while line and not line.startswith("running"):
                line = p.stderr.readline()
            assert line, f"a process exited before running: {p.wait()}"
        procs[victim].send_signal(signal.SIGKILL)
        start = time.monotonic()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=60)
        assert rc != 0
        assert time.monotonic() - start < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (Debian package openmpi-bin)")
def test_two_processes_under_mpirun(single_process_lines):
    env = {**os.environ, **CPU4, "JAX_COORDINATOR_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = ["mpirun", "-n", "2", *root, "--oversubscribe", "--bind-to", "none",
           *(a for k in (*CPU4, "JAX_COORDINATOR_PORT", "PYTHONPATH") for a in ("-x", k)),
           sys.executable, "-m", "gptjax", *GENERATE]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == single_process_lines  # process 1 printed nothing


@pytest.mark.skipif(bool(slurm_localhost.missing()),
                    reason=f"Slurm not installed ({', '.join(slurm_localhost.missing())} missing; Debian "
                           "packages slurm-wlm and munge)")
def test_two_processes_under_srun(single_process_lines):
    if os.geteuid() != 0:
        pytest.skip("a localhost slurmd must run as root")
    with slurm_localhost.slurm_cluster() as env:
        env = {**env, **CPU4, "JAX_COORDINATOR_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(["srun", "-n", "2", "--overcommit", "--kill-on-bad-exit=1", sys.executable, "-m",
                               "gptjax", *GENERATE], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == single_process_lines
