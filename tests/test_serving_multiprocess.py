"""`gptjax serve` as a two-process job on localhost: process 0 serves, process 1 follows its step commands.

Each process sees 4 CPU devices and the mesh spans all 8 (`--mesh tensor=8`), as two hosts of 4 GPUs would.
The job is started the way srun starts it (SLURM_* environment), or by explicit flags; SIGTERM to process 0
drains, and both processes exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import cpu_xla_flags, run_cli
from gptjax import distributed
from gptjax.config import MeshShape
from serving.client import Client
from test_serving import REPO, free_port, ft_inputs, wait_serving

PROMPT = [464, 2068, 7586, 21831]
N_NEW = 10


def free_srun_job() -> tuple[int, int]:
    """A SLURM_JOB_ID whose coordinator port (gptjax.distributed.coordinator_port) is free here, and that port."""
    for job in range(os.getpid(), os.getpid() + 4000):
        port = distributed.coordinator_port(f"{job}.0", {})
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return job, port
            except OSError:
                continue
    raise RuntimeError("no free port for the coordinator")


# `gptjax` whose prefills fail on this process only, as a host's own out-of-memory would
FAILING_PREFILL = """
import sys
from gptjax.engine import Engine
def prefill(self, *args, **kwargs):
    raise RuntimeError("injected: out of device memory on this host")
Engine.prefill = prefill
from gptjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(launcher: str, port: int, tmp_path, mesh: str = "tensor=8", failing_rank: int | None = None,
           env_extra: dict | None = None):
    job, coordinator = free_srun_job()
    # two slots and a cache of one 32-token prompt bucket: four shapes for each process to compile at start
    config = tmp_path / "serve.toml"
    config.write_text("[engine]\nmax_slots = 2\nmax_seq_len = 32\nmin_prefill_bucket = 32\n")
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": cpu_xla_flags(4),
               **(env_extra or {})}
        # no HTTP or metrics listener: this job speaks gRPC only, and fixed ports would clash with other servers
        program = ["-c", FAILING_PREFILL] if rank == failing_rank else ["-m", "gptjax"]
        args = [sys.executable, *program, "serve", "--port", str(port), "--http-port", "0", "--metrics-port", "0",
                "--mesh", mesh, "--config", str(config)]
        if launcher == "srun":
            env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                       SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0")
        else:
            args += ["--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", str(rank)]
        log = open(tmp_path / f"rank{rank}.log", "w+")
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log))
        logs.append(log)
    return procs, logs


@contextlib.contextmanager
def running_job(launcher: str, port: int, tmp_path, mesh: str = "tensor=8", failing_rank: int | None = None,
                env_extra: dict | None = None):
    """The two processes of `launch`, killed on the way out if they still run."""
    procs, logs = launch(launcher, port, tmp_path, mesh, failing_rank, env_extra)
    try:
        yield procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def reference():
    """Greedy new tokens of PROMPT from `gptjax generate` (one process, no server): what both jobs must give."""
    out = run_cli("generate", "--greedy", "--json", "--no-stop", "--max-new-tokens", str(N_NEW), "--prompt-ids",
                  ",".join(map(str, PROMPT)), env={"JAX_PLATFORMS": "cpu"}).stdout
    return json.loads(out)["output_ids"]


def test_two_processes_serve_and_stop_on_sigterm(reference, tmp_path):
    """A job started by srun's environment, its mesh over both processes' devices, answers native and Triton gRPC
    requests as one process does, and drains on SIGTERM. (The tests below start their jobs by flags with this mesh:
    the programs compiled here are in the session's compilation cache for them. A mesh that splits data and stages
    over the processes is test_distributed's, for a checkpoint whose stages span them, and test_engine's, in one
    process.)"""
    import tritonclient.grpc as triton_grpc

    mesh = "tensor=8"
    port = free_port()
    target = f"127.0.0.1:{port}"
    with running_job("srun", port, tmp_path, mesh) as (procs, logs):
        wait_serving(procs[0], target, logs[0], timeout=300)
        assert procs[1].poll() is None, "process 1 exited"
        with Client(target) as client:
            info = client.model_info()
            assert info.num_processes == 2 and info.mesh == str(MeshShape.parse(mesh))
            unary = client.generate(PROMPT, N_NEW, temperature=0, ignore_eos=True).token_ids
            streamed = [t for p in client.stream(PROMPT, N_NEW, temperature=0, ignore_eos=True) for t in p.token_ids]
            sampled = client.generate(PROMPT, N_NEW, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True).token_ids
        triton = triton_grpc.InferenceServerClient(target)
        ids = np.array([PROMPT, PROMPT], np.uint32)  # two rows in one prefill: their first tokens on both shards
        result = triton.infer("fastertransformer", ft_inputs(ids, [len(PROMPT)] * 2, N_NEW,
                                                             end_id=(np.full((2, 1), 50255, np.uint32), "UINT32")))
        triton.close()
        assert unary == streamed == reference
        assert result.as_numpy("output_ids")[:, 0].tolist() == [PROMPT + reference] * 2
        assert len(sampled) == N_NEW

        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [0, 0], [open(log.name).read()[-3000:] for log in logs]


def test_a_command_that_fails_on_one_follower_ends_the_job(tmp_path):
    """Process 0 would wait for that follower in a collective that never completes: the follower ends itself, the
    heartbeats end process 0, and the client gets an answer (UNAVAILABLE) instead of a hang."""
    import grpc

    port = free_port()
    target = f"127.0.0.1:{port}"
    with running_job("flags", port, tmp_path, failing_rank=1) as (procs, logs):
        wait_serving(procs[0], target, logs[0], timeout=300)
        with Client(target) as client, pytest.raises(grpc.RpcError):
            client.generate(PROMPT, N_NEW, temperature=0, ignore_eos=True, timeout=120)
        codes = [p.wait(timeout=120) for p in procs]
        assert codes[1] == 1 and codes[0] != 0, codes
        assert "ending this process, and so the job" in open(logs[1].name).read()



def test_a_follower_killed_while_serving_ends_process_0_with_one_line(tmp_path):
    """The next request finds the follower gone: it gets UNAVAILABLE, and process 0 exits 1 at once with a
    line saying why, rather than waiting at the job's shutdown barrier until the heartbeats abort it (exit
    134, a crash dump) or printing the engine loop's traceback."""
    import grpc

    port = free_port()
    target = f"127.0.0.1:{port}"
    # heartbeats slower than the test, so that only process 0's own exit can end it
    with running_job("flags", port, tmp_path, env_extra={"GPTJAX_HEARTBEAT_TIMEOUT_S": "120"}) as (procs, logs):
        wait_serving(procs[0], target, logs[0], timeout=300)
        procs[1].kill()
        procs[1].wait()
        with Client(target) as client, pytest.raises(grpc.RpcError) as failed:
            client.generate(PROMPT, N_NEW, temperature=0, ignore_eos=True, timeout=60)
        code = procs[0].wait(timeout=60)
    log = open(logs[0].name).read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    assert code == 1, log[-3000:]
    assert "the job is going down" in log and "Traceback" not in log and "Check failure" not in log, log[-3000:]


def test_a_port_in_use_on_process_0_ends_the_whole_job(tmp_path):
    """Process 0 can't listen: it says so and exits 2, and its follower, which waits for process 0 to start the
    job, ends too, by the heartbeats, rather than waiting out the start's 5-minute limit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with running_job("flags", port, tmp_path, env_extra={"GPTJAX_HEARTBEAT_TIMEOUT_S": "5"}) as (procs, logs):
            codes = [p.wait(timeout=150) for p in procs]
    assert codes[0] == 2 and f"can't listen on 127.0.0.1:{port}" in open(logs[0].name).read(), codes
    assert codes[1] != 0, open(logs[1].name).read()[-2000:]
