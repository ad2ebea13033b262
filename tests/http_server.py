"""The real `gptjax serve` with its HTTP port, for the HTTP tests: a FasterTransformer v1 config.pbtxt of the 2021
example's form (candidate_num 1, i.e. greedy), free ports for gRPC, HTTP and metrics, an API key.

A pytest plugin (`pytest_plugins = ["http_server"]` in a test module): the `served` fixture is one server for
the whole session, shared by the modules that use it (its warm-up compiles are most of their time); it must
drain and exit 0 at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "fastertransformer"

# the parameters of the 2021 example config, for the gpt2-tiny preset (8 heads of 16, 4 layers); vocab_size is
# Megatron's padding of 50257. One slot of 64 positions keeps the shapes that warm-up compiles few (5).
SLOTS, MAX_SEQ_LEN = 1, 64
V1_PARAMETERS = dict(candidate_num=1, probability_threshold="0.0", tensor_para_size=1, layer_para_size=1,
                     layer_para_batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN, is_half=0, head_num=8, size_per_head=16,
                     vocab_size=50304, decoder_layers=4, model_name="gpt2_tiny", batch_size=SLOTS, is_fuse_QKV=1,
                     temperature="1.0", repetition_penalty="1.0")


def v1_config(max_batch_size: int = 4, **parameters) -> str:
    tensors = ('input [\n  { name: "INPUT_ID" data_type: TYPE_UINT32 dims: [ -1 ] },\n'
               '  { name: "REQUEST_INPUT_LEN" data_type: TYPE_UINT32 dims: [ 1 ] },\n'
               '  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_UINT32 dims: [ 1 ] }\n]\n'
               'output [\n  { name: "OUTPUT0" data_type: TYPE_UINT32 dims: [ -1 ] }\n]\n')
    params = "".join(f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}\n'
                     for k, v in {**V1_PARAMETERS, **parameters}.items())
    return (f'name: "{MODEL}"\nbackend: "fastertransformer"\ndefault_model_filename: "gpt2_tiny"\n'
            f"max_batch_size: {max_batch_size}\n{tensors}instance_group [\n  {{\n    count: 1\n    kind : KIND_CPU\n"
            f"  }}\n]\n{params}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    config: Path
    grpc: str  # HOST:PORT
    http: str  # http://HOST:PORT
    metrics: str
    key: str | None
    log: object
    slots: int = SLOTS
    max_seq_len: int = MAX_SEQ_LEN

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def start(tmp_path: Path, api_key: str | None = None, config: str | None = None, timeout_s: float = 600) -> Served:
    """`gptjax serve --config <v1 config.pbtxt>` on free ports; returns once HTTP health says ready."""
    path = tmp_path / "config.pbtxt"
    path.write_text(config or v1_config())
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    args = [sys.executable, "-m", "gptjax", "serve", "--config", str(path), "--port", str(grpc_port),
            "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("GPTJAX_API_KEY", None)
    if api_key:
        args += ["--api-key", api_key]
    served = Served(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log), path,
                    f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}",
                    api_key, log)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if served.proc.poll() is not None:
            raise AssertionError(f"gptjax serve exited {served.proc.returncode}:\n{served.output()}")
        try:
            if httpx.get(served.http + "/v2/health/ready", timeout=2).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    output = served.output()
    stop(served)
    raise AssertionError(f"gptjax serve was not ready in {timeout_s} s:\n{output}")


def stop(served: Served) -> int:
    """SIGTERM (a drain), then the exit status; killed if it does not end."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(60)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
    served.log.close()
    return served.proc.returncode


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("serve"), api_key="test-key-7f3a")
    try:
        yield s
    finally:
        output = s.output()
        assert stop(s) == 0, output
