"""Shared fixtures: tiny random models built in memory or in tmp, never downloaded."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# several CPU devices for the sharding tests, set before jax is imported anywhere; and XLA's CPU backend at its
# cheapest compile: the tests check what the programs compute, not how fast a CPU runs them, and half the suite's
# CPU time is XLA compiling. Level 0 took the default server's warm-up from 59 s to 41 on a 2-core machine; the
# older loop emitters, LLVM without its expensive passes and one codegen unit took 10.8 s of compiles to 7.5.
CHEAP_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                 "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_parallel_codegen_split_count=1")


def cpu_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's process (or a subprocess of its own device count): `devices` CPU devices, compiled
    cheaply (`CHEAP_COMPILE`)."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *CHEAP_COMPILE))


os.environ.setdefault("XLA_FLAGS", cpu_xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The processes the tests start (CLI runs, servers, launcher jobs) compile the same small programs again and
# again: they share one compilation cache for the session. This process keeps none, so the tests that count
# compiles see every compile.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="gptjax-tests-jax-cache-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

HF_VOCAB = 50257

# The order the workers of `make test` (xdist, --dist loadfile) take files in: the longest first (seconds on a
# two-core machine in comments, from a run's --junitxml), so that no worker is left with a long file while the other
# is idle. Pairs that start the same server engine are kept apart, the compiling one first, so that the second loads
# its programs from the shared compilation cache instead of compiling them at the same time: test_serving /
# test_kserve, test_load / test_fuzz / test_serving_bench, test_http / test_openai. Files not listed follow, in their
# usual order.
FILE_ORDER = [
    "test_kernel_benchmarks.py",  # 185
    "test_distributed.py",  # 135
    "test_serving.py",  # 125, the default server's 26 shapes compiled
    "test_serving_multiprocess.py",  # 125
    "test_kernels.py",  # 120
    "test_sharding.py",  # 105
    "test_engine.py",  # 100
    "test_http.py",  # 75
    "test_load.py",  # 60, a server's start (test_fuzz's and test_serving_bench's engine) and its mixed-door load
    "test_megatron.py",  # 60
    "test_cli.py",  # 55
    "test_kserve.py",  # 50
    "test_bench.py",  # 45
    "test_warmup.py",  # 40
    "test_model.py",  # 35
    "test_sampling.py",  # 35
    "test_decode_matmul.py",  # 30
    "test_fuzz.py",  # 30
    "test_hub.py",  # 25
    "test_gpu_scripts.py",  # 25
    "test_compile_cache.py",  # 25
    "test_checkpoint.py",  # 15
    "test_ft.py",  # 15
    "test_notebook.py",  # 15
    "test_untrusted_files.py",  # 10
    "test_batch_matmul.py",  # 10
    "test_decode_block.py",  # 10
    "test_residual_norm.py",  # 10
    "test_serving_bench.py",  # 5
    "test_openai.py",  # 5
    "test_prompts.py",  # 5
    "test_planning.py",  # 5
]


def pytest_configure(config):
    # xdist queues files by their number of tests unless told not to: FILE_ORDER's order is kept instead
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FILE_ORDER)))  # stable: a file's tests keep their order


def make_hf_gpt2(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=HF_VOCAB, seed=0, scale=0.3):
    """A random Hugging Face GPT-2 whose greedy tokens vary: weights are drawn wider than GPT-2's 0.02."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, initializer_range=scale, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random LayerNorm and biases too, so a wrong mapping of any tensor shows
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_model():
    return make_hf_gpt2()


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def converted_dir(hf_dir, tmp_path_factory):
    """The HF model converted with the real CLI."""
    dst = tmp_path_factory.mktemp("ckpt") / "gpt2"
    run_cli("convert", "hf-gpt2", str(hf_dir), str(dst))
    return dst


def run_cli(*args, check=True, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "gptjax", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptjax {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """`gptjax ARGS` in this process, its stdout and stderr captured: for arguments refused before any work, where
    a fresh interpreter would cost seconds of imports. `run_cli` checks what a whole process prints."""
    from gptjax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_greedy(model, prompt_ids, n_new):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=n_new)
    return out[0, len(prompt_ids):].tolist()


def forward_logits(config, params, tokens):
    """Float32 logits at every position of `tokens` [batch, seq] from the model's own parameter tree, with no
    cache and the plain jnp attention: the reference the engine's cached, sharded paths are checked against."""
    import jax.numpy as jnp

    return _forward_logits_program(config)(params, jnp.asarray(tokens, jnp.int32))


@functools.lru_cache(maxsize=None)
def _forward_logits_program(config):
    """forward_logits compiled whole (op by op, each new shape compiled every op of the model again)."""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels import flash_attention_reference
    from gptjax.model import GPT

    def attend(layer, qkv):
        return flash_attention_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths=None, causal=True), None

    @jax.jit
    def logits(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        model = GPT(config, vocab_rows=params["wte"].shape[0])
        x, _ = model.apply({"params": params}, tokens, positions, attend)
        return model.apply({"params": params}, x, method=GPT.logits)

    return logits


# ---- gpt2-tiny on meshes of the 8 CPU devices, shared by the sharding and engine tests ---------------------
MESH_PROMPTS = [[5, 17, 99, 3], list(range(1, 20)), [7]]  # 3 rows: does not divide data=2, padded inside
MESH_NEW_TOKENS = 8
_mesh_engines: dict = {}


def mesh_engine(layout):
    """gpt2-tiny (random weights from its fixed seed) on a (data, stage, tensor) mesh, built once a session."""
    import jax

    from gptjax import Engine, make_mesh

    if layout not in _mesh_engines:
        d, s, t = layout
        mesh = make_mesh(d, s, t, devices=jax.devices()[: d * s * t])
        _mesh_engines[layout] = Engine.from_preset("gpt2-tiny", mesh=mesh)
    return _mesh_engines[layout]


def greedy_tokens(engine, prompts=MESH_PROMPTS):
    return [r.output_ids for r in engine.generate(prompts, max_new_tokens=MESH_NEW_TOKENS, greedy=True,
                                                  stop_token_ids=[])]


@pytest.fixture(scope="session")
def mesh_reference():
    """The greedy tokens of MESH_PROMPTS on one device: what every layout must give."""
    tokens = greedy_tokens(mesh_engine((1, 1, 1)))
    assert len({tuple(t) for t in tokens}) == len(tokens)  # the prompts really lead different ways
    return tokens


# ---- a running server's clients, for the modules that define `target` (HOST:PORT) ------------------------------
@pytest.fixture(scope="module")
def client(target):
    from serving.client import Client

    with Client(target) as c:
        yield c


@pytest.fixture(scope="module")
def triton(target):
    import tritonclient.grpc

    c = tritonclient.grpc.InferenceServerClient(target)
    yield c
    c.close()
