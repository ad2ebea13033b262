"""benchmarks.kernels, benchmarks.decode_sweep, benchmarks.decode_probe and benchmarks.startup_probe on the CPU:
the device-time fields beside the host clock's, the sweep's choice by device time only when every candidate
has one, the time limit that still leaves rows, and the probes' rows. (The profiler's GPU kernels exist only
on a GPU: here `gpu_busy_seconds` is replaced by a fixed answer.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import decode_sweep, kernels
from gptjax.kernels import decode_table


def test_timed_device_divides_the_traced_dispatch_by_the_input_sets(monkeypatch):
    sets = [(jnp.ones(4),) for _ in range(3)]
    monkeypatch.setattr(kernels, "gpu_busy_seconds", lambda run, s, kernel=None: 3e-4 if s is sets else None)
    host, device = kernels.timed_device(lambda x: x * 2, sets, reps=2, warmup=1)
    assert host > 0 and device == pytest.approx(1e-4)
    assert kernels.device_fields(device, 2e5, "gbps", 1e9) == pytest.approx({"gpu_us": 100.0, "gpu_gbps": 2.0})
    assert set(kernels.device_fields(device, 1e9, "tflops", 1e12)) == {"gpu_ms", "gpu_tflops"}


def test_timed_device_keeps_the_host_time_when_the_trace_fails_or_has_no_kernels(monkeypatch):
    sets = [(jnp.ones(4),), (jnp.ones(4),)]
    for answer in (None, 0.0, RuntimeError("no profiler")):
        def busy(run, s, kernel=None, answer=answer):
            if isinstance(answer, Exception):
                raise answer
            return answer
        monkeypatch.setattr(kernels, "gpu_busy_seconds", busy)
        host, device = kernels.timed_device(lambda x: x + 1, sets, reps=1, warmup=1)
        assert host > 0 and device is None and kernels.device_fields(device, 1.0, "gbps", 1e9) == {}


def test_on_cpu_the_trace_is_not_taken():
    if jax.default_backend() == "gpu":
        pytest.skip("the CPU's answer")
    assert kernels.gpu_busy_seconds(lambda s: s, [1]) is None


def test_sweep_picks_by_device_time_only_when_every_candidate_has_one():
    fast_host = {"params": (1,), "rel_err": 1e-3, "us": 10.0, "gpu_us": 9.0}
    fast_device = {"params": (2,), "rel_err": 1e-3, "us": 12.0, "gpu_us": 5.0}
    wrong = {"params": (3,), "rel_err": 0.5, "us": 1.0, "gpu_us": 1.0}
    failed = {"params": (4,), "error": "shared memory"}
    best = decode_sweep.pick_best([fast_host, fast_device, wrong, failed])
    assert best["params"] == (2,) and best["chosen_by"] == "gpu_us"
    untraced = dict(fast_host, us=11.0)
    del untraced["gpu_us"]
    best = decode_sweep.pick_best([untraced, fast_device])  # one clock for all: the host's
    assert best["params"] == (1,) and best["chosen_by"] == "us"
    assert decode_sweep.pick_best([wrong, failed]) is None


def test_sweep_rows_carry_both_clocks():
    row = decode_sweep.timing_fields(2e-5, 1e-5, 40_000, 4e9)
    assert row == pytest.approx({"us": 20.0, "gbps": 2.0, "of_bandwidth": 0.5, "gpu_us": 10.0, "gpu_gbps": 4.0,
                                 "gpu_of_bandwidth": 1.0})
    assert set(decode_sweep.timing_fields(2e-5, None, 40_000, 4e9)) == {"us", "gbps", "of_bandwidth"}


def test_prefill_device_times_are_medians_of_interleaved_rounds(monkeypatch):
    calls = []
    drift = iter(range(1, 100))  # the device slows with every trace: a back-to-back order would favour the first

    def busy(run, sets, kernel=None):
        calls.append(run)
        return 1e-3 * next(drift) * len(sets)
    monkeypatch.setattr(kernels, "gpu_busy_seconds", busy)
    rows = kernels.prefill([(1, 128, 1, 16)], False, True, 1, jnp.float32, only=["xla", "pallas"], rounds=3)
    xla, pallas = rows[0]["impl"]["xla"], rows[0]["impl"]["pallas"]
    assert len(calls) == 6 and calls[0] is not calls[1] and calls[2] is calls[1]  # the order rotates each round
    assert xla["gpu_ms_rounds"] == [1.0, 4.0, 5.0] and pallas["gpu_ms_rounds"] == [2.0, 3.0, 6.0]
    assert xla["gpu_ms"] == 4.0 and pallas["gpu_ms"] == 3.0 and xla["rel_err"] < 1e-5


def test_prefill_keeps_host_times_when_the_device_has_none(monkeypatch):
    monkeypatch.setattr(kernels, "gpu_busy_seconds", lambda run, sets, kernel=None: None)
    rows = kernels.prefill([(1, 128, 1, 16)], False, True, 1, jnp.float32, only=["xla"], rounds=3)
    assert rows[0]["impl"]["xla"]["ms"] > 0 and "gpu_ms" not in rows[0]["impl"]["xla"]


def test_prefill_past_its_deadline_marks_rows_skipped():
    rows = kernels.prefill([(1, 128, 1, 16)], False, True, 1, jnp.float32, only=["xla"],
                           deadline=time.perf_counter() - 1)
    assert rows[0]["impl"] == {"xla": {"skipped": "time limit"}}
    assert kernels.decode(True, False, 1, True, deadline=time.perf_counter() - 1) == []


def test_only_takes_names_and_starred_prefixes():
    only = ["cudnn", "hopper*"]
    assert kernels.selected("cudnn", only) and kernels.selected("hopper", only)
    assert kernels.selected("hopper(wait in PV)", only)
    assert not kernels.selected("cudnn(sweep)", only) and not kernels.selected("xla", only)
    # a comma inside a variant's parentheses is part of its name
    assert kernels.only_names("cudnn,hopper(wait in PV, fence),hopper(7 programs)") == [
        "cudnn", "hopper(wait in PV, fence)", "hopper(7 programs)"]


def test_hopper_variants_fit_shared_memory():
    from gptjax.kernels.flash_attention_hopper import check_blocks

    for head_dim, variants in kernels.HOPPER_SWEEP.items():
        for kw in variants.values():
            check_blocks(kw.get("block_kv", 128), kw.get("stages", 2), head_dim,
                         q_buffers=1 if kw.get("prefetch_q") is False else 2)
    for kw, dims in kernels.HOPPER_CHECKS.values():
        for head_dim in dims:
            check_blocks(kw.get("block_kv", 128), kw.get("stages", 2), head_dim,
                         q_buffers=1 if kw.get("prefetch_q") is False else 2)


def test_ragged_sweep_counts_only_the_valid_keys(monkeypatch):
    import io
    import json

    # one candidate, no peers, two input sets: enough to see what a ragged row counts
    monkeypatch.setattr(kernels, "n_sets", lambda *a, **k: 2)
    monkeypatch.setattr(decode_sweep, "peers", lambda: {})
    first = decode_sweep.candidates
    monkeypatch.setattr(decode_sweep, "candidates", lambda *a: first(*a)[:1])
    out = io.StringIO()
    best = decode_sweep.sweep_shape(2, 4, 16, 64, 1e10, True, 1, out, ragged=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    timed = [r for r in rows if "params" in r and "us" in r]
    assert timed and best and all(r["ragged"] and r["rel_err"] < 3e-2 for r in timed)
    # the rate is the valid bytes over the time: fewer than the full caches' 2 x 2 x 64 x 4 x 16 x 2 bytes
    assert all(0 < r["gbps"] * 1e9 * r["us"] * 1e-6 < 2 * 2 * 64 * 4 * 16 * 2 for r in timed)


def test_sweep_writes_the_table_it_picks_from(monkeypatch, tmp_path):
    """A swept shape's winner replaces its TABLE entry and the other entries stay; the written file reads back,
    and is the checked-in table's form (written from that table, the same text but for the date)."""
    import importlib.util
    import io
    import re

    def written(best_rows, device):
        path = tmp_path / "decode_table.py"
        decode_sweep.write_table(str(path), best_rows, device)
        spec = importlib.util.spec_from_file_location("written", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, path.read_text()

    def undated(text):  # the header's date is the day the table was written
        return re.sub(r"\d{4}-\d{2}-\d{2}", "DATE", text)

    checked_in = Path(decode_table.__file__).read_text()
    _, text = written([], decode_table.DEVICE)
    assert undated(text) == undated(checked_in)
    monkeypatch.setattr(kernels, "n_sets", lambda *a, **k: 2)
    monkeypatch.setattr(decode_sweep, "peers", lambda: {})
    found = decode_sweep.sweep_shape(8, 4, 16, 64, 1e10, True, 1, io.StringIO())
    assert len(found["params"]) == 6
    best = dict(found, params=(1, 32, 1, 4, 3, True))
    monkeypatch.setattr(decode_table, "TABLE", {(4, 16, 8, 64): (1, 16, 1, 4, 3, True),
                                                (4, 16, 16, 64): (1, 64, 1, 4, 2, True)})
    module, _ = written([best], "a test device")
    assert module.TABLE == {(4, 16, 8, 64): (1, 32, 1, 4, 3, True), (4, 16, 16, 64): (1, 64, 1, 4, 2, True)}
    assert module.DEVICE == "a test device" and [n for n in vars(module) if n.isupper()] == ["DEVICE", "TABLE"]


def _probe(tmp_path, *args):
    """`benchmarks.decode_probe` on gpt2-tiny float32 (2 prompts of 5 tokens, one run), in a process of its own (its
    variants patch modules) on the CPU."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_probe", "--model", "gpt2-tiny", "--dtype", "float32", "--batch", "2",
         "--input-len", "5", "--runs", "1", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", "GPTJAX_CACHE_DIR": str(tmp_path)})


def test_decode_probe_rows_and_the_two_step_variant_give_the_same_tokens(tmp_path):
    """The probe as the GPU runs use it (in a process of its own: its variants patch modules), on gpt2-tiny's
    Pallas kernels in interpret mode: the step that stores K/V in the attention kernel, and the one that scatters
    them first with the attention walking its blocks in two loops (each change alone is test_kernels'), must give
    the same greedy tokens."""
    rows = []
    for extra in ([], ["--two-step-decode", "--two-loop-attention"]):
        proc = _probe(tmp_path, "--steps", "3", "--attention", "pallas", "--decode-matmuls", "xla", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [(r["two_step_decode"], r["two_loop_attention"]) for r in rows] == [(False, False), (True, True)]
    assert all(r["attention"] == "pallas" and r["decode_ms_per_token"] > 0 for r in rows)
    assert all(r["first_row_tokens"] == rows[0]["first_row_tokens"] for r in rows)
    assert len(rows[0]["first_row_tokens"]) == 5  # the timed call: steps + 2 tokens


def test_decode_probe_times_sampling_steps(tmp_path):
    """`--sampling`: every row draws (a temperature alone, or with top-p: the step that runs the filter), a line
    each in one process, and the line says which; a name the probe does not know stops it, naming it."""
    proc = _probe(tmp_path, "--steps", "3", "--sampling", "temperature,top-p")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith('{"model"')]
    assert [r["sampling"] for r in rows] == ["temperature", "top-p"]
    assert all(r["decode_ms_per_token"] > 0 and len(r["first_row_tokens"]) == 5 for r in rows)
    proc = _probe(tmp_path, "--steps", "3", "--sampling", "greedy,nucleus")
    assert proc.returncode == 2 and "nucleus" in proc.stderr


def test_decode_probe_times_variants_of_xla_options_in_turn_in_one_process(tmp_path):
    """`--xla-options`: one line per variant (`batch_off`: traced without decode_block's batch kernels;
    `prefill_norm`: the prefill's LayerNorms as the kernel, interpreted here), each timed in every round, all with
    the same greedy tokens; a `halves` variant whose step would not run `batch_block` (here XLA's decode matmuls,
    the CPU's) is that variant's error line. A name the probe does not know, or `streams` without `halves`, stops
    it before any compile, naming the name."""
    variants = ["off", "block_level+unroll+no_split_k", "batch_off+prefill_norm"]
    proc = _probe(tmp_path, "--steps", "3", "--rounds", "2", "--xla-options", ",".join(["halves+streams", *variants]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    error, *rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert error["xla_options"] == "halves+streams" and "batch_block in two halves" in error["error"]
    assert [r["xla_options"] for r in rows] == variants
    assert all(len(r["rounds_decode_ms_per_token"]) == 2 for r in rows)
    assert len({tuple(r["first_row_tokens"]) for r in rows}) == 1 and len(rows[0]["first_row_tokens"]) == 5
    for bad, named in (("off,fastest", "fastest"), ("off,streams", "go with halves")):
        proc = _probe(tmp_path, "--steps", "3", "--xla-options", bad)
        assert proc.returncode != 0 and named in proc.stderr


def test_sampling_probe_forms_keep_what_the_sort_keeps():
    """benchmarks.sampling_probe on the CPU (the kernel interpreted): every filter that replaces the sort keeps
    the sort's tokens on the probe's logits, flat and peaked."""
    from benchmarks import sampling_probe

    for spread in ("1.0", "6.0"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sampling_probe.main(["--rows", "3", "--reps", "1", "--spread", spread, "--only",
                                 "sort_top_p,sort_top_k,kernel_top_p,kernel_top_k,bisect_top_p,search16_top_p"])
        rows = {r["form"]: r for r in map(json.loads, out.getvalue().splitlines())}
        assert rows["sort_top_k"]["kept_per_row"] == 40 and 1 <= rows["sort_top_p"]["kept_per_row"] < 50257
        assert all(rows[f]["rows_unlike_sort"] == 0 for f in ("kernel_top_p", "kernel_top_k", "bisect_top_p",
                                                               "search16_top_p"))


def test_startup_probe_times_a_checkpoint_read_beside_the_warmup_and_before_it(tmp_path):
    """Both orders of the read and the warm-up, timed; the second run reads the first's programs from the cache."""
    import numpy as np

    from gptjax.checkpoint import save_checkpoint
    from gptjax.config import preset
    from gptjax.model import init_params

    config = preset("gpt2-tiny")
    folder = save_checkpoint(tmp_path / "tiny", config, jax.tree.map(np.asarray, init_params(config, seed=1)))
    rows = []
    for extra in ([], ["--read-first"]):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.startup_probe", "--checkpoint", str(folder), "--slots", "2",
             "--seq", "32", "--cache-dir", str(tmp_path / "cache"), *extra], cwd=Path(__file__).resolve().parents[1],
            capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["read_first"] for r in rows] == [False, True]
    assert all(r["model"] == str(folder) and r["programs_compiled_or_read"] > 0 and r["weights_wait_s"] >= 0
               and r["total_s"] >= r["engine_s"] + r["warmup_s"] for r in rows)


def test_profile_kernels_are_told_apart_by_what_they_do():
    """Names from the H200 traces of RESULTS runs 16-18, and the kind each one's time is summed under."""
    from benchmarks.decode_probe import kernel_kind

    kinds = {"nvjet_sm90_hsh_128x128_64x6_2x1_v_bz_bias_NNT": "products", "gemm_fusion_dot": "products",
             "decode_matmul_1024x3072": "products", "decode_attention": "attention",
             "anonymous_mosaic_gpu_kernel": "mosaic", "input_reduce_fusion": "reductions",
             "input_add_reduce_fusion": "reductions", "MemcpyD2D": "copies", "Memset 0": "copies",
             "memcpy32_post": "copies", "loop_multiply_fusion": "elementwise", "loop_slice_fusion": "elementwise",
             "loop_dynamic_update_slice_fusion": "elementwise", "loop_convert_fusion": "elementwise"}
    assert {name: kernel_kind(name) for name in kinds} == kinds


def test_pack_out_bundles_what_a_device_call_would_drop(tmp_path):
    from benchmarks import pack_out

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    for i in range(7):
        (out / f"rows{i}.jsonl").write_text(json.dumps({"i": i, "source": "its own"}) + "\n\n[1, 2]\n")
    (out / "logs" / "serve.log").write_text("listening\nready\n")
    assert pack_out.pack(out) == []  # eight files: all come back as they are
    (out / "decode_table.py").write_text("TABLE = {}\n")
    assert len(pack_out.pack(out, keep=["decode_table.py"])) == 8
    assert sorted(p.name for p in out.rglob("*")) == ["bundle.jsonl", "decode_table.py"]  # logs/ went too
    rows = [json.loads(line) for line in (out / "bundle.jsonl").read_text().splitlines()]
    assert rows[0] == {"source": "logs/serve.log", "line": "listening"}
    assert {"source": "rows3.jsonl", "i": 3, "row_source": "its own"} in rows
    assert {"source": "rows3.jsonl", "line": "[1, 2]"} in rows
    assert len(rows) == 2 + 7 * 2  # blank lines dropped

    results = tmp_path / "results.jsonl"  # the form of the results files: everything, nothing removed
    assert pack_out.pack(out, into=results) == ["bundle.jsonl", "decode_table.py"]
    assert (out / "decode_table.py").exists() and results.read_text().count('"source": "bundle.jsonl"') == len(rows)
    (out / "bundle.jsonl").unlink()  # packed again into the same results file: it holds only what is there now
    assert pack_out.pack(out, into=results) == ["decode_table.py"]
    assert results.read_text().splitlines() == ['{"source": "decode_table.py", "line": "TABLE = {}"}']


def test_loops_rows_time_both_walks_against_the_reference():
    (b, ctx, cache_len, h, d), = kernels.LOOP_SHAPES_QUICK
    row = kernels.decode_one(b, ctx, h, d, kernels.loop_impls(True), 1, cache_len=cache_len)
    assert set(row["impl"]) == {"pallas(one loop)", "pallas(two loops)"}
    assert row["cache_len"] == cache_len and all(v["rel_err"] < 1e-2 and v["us"] > 0 for v in row["impl"].values())


def test_ragged_checks_share_their_inputs_and_float64_answers(monkeypatch, capsys):
    import numpy as np

    from gptjax.kernels import flash_attention_reference

    calls = []
    reference64 = kernels.prefill_reference64
    monkeypatch.setattr(kernels, "prefill_reference64", lambda *a: calls.append(1) or reference64(*a))
    cases = kernels.RaggedCases(np.random.default_rng(0))
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
    right = lambda q, k, v, n: flash_attention_reference(q, k, v, lengths=n, causal=True)  # noqa: E731
    wrong = lambda q, k, v, n: flash_attention_reference(q, k, v, lengths=n, causal=False)  # noqa: E731
    rows = (kernels.check_prefill("right", right, (jnp.float32, jnp.bfloat16), [(2, 40, 2, 16)], cases, tol)
            + kernels.check_prefill("wrong", wrong, (jnp.float32,), [(2, 40, 2, 16)], cases, tol))
    assert len(calls) == 2  # one answer per dtype, not per kernel
    assert [r[4] for r in rows] == [True, True, False] and rows[0][2] == (2, 40, 2, 16)
    assert capsys.readouterr().out.count("check ") == 3


def test_ncu_prefill_names_the_implementations_it_knows(capsys):
    # the Nsight Compute script's one call refuses an unknown implementation before it touches a device
    from benchmarks import ncu_prefill

    with pytest.raises(SystemExit) as exit_info:
        ncu_prefill.main(["--impl", "flashy", "--shape", "1x128x2x64", "--dtype", "float32"])
    assert exit_info.value.code == 2 and "--impl must be one of" in capsys.readouterr().err


NCU_COLUMNS = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
               "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value")
NCU_METRICS = [  # (launch, kernel, section, metric, unit, value), as ncu's details page prints them
    ("0", "decode_attention", "GPU Speed Of Light Throughput", "Duration", "usecond", "55.30"),
    ("0", "decode_attention", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "71.92"),
    ("0", "decode_attention", "Memory Workload Analysis", "Memory Throughput", "Tbyte/s", "2.41"),
    ("0", "decode_attention", "Launch Statistics", "Grid Size", "", "4,096"),
    ("0", "decode_attention", "Source Counters", "Branch Instructions", "inst", "12,288"),
    ("1", "batch_matmul", "GPU Speed Of Light Throughput", "Duration", "ns", "6,480"),  # the short spelling
    ("1", "batch_matmul", "Occupancy", "Achieved Occupancy", "%", "11.8"),
]
NCU_CSV = "\n".join(["==PROF== Connected to process 4242", ",".join(f'"{c}"' for c in NCU_COLUMNS)] + [
    ",".join(f'"{c}"' for c in (i, "4242", "python3", "host", kernel, "1", "7", "(128, 1, 1)", "(16, 1, 256)", "0",
                                "9.0", section, metric, unit, value))
    for i, kernel, section, metric, unit, value in NCU_METRICS])


def test_ncu_decode_summary_reads_each_launchs_headline_counters():
    """`ncu_decode summary` turns ncu's details CSV (after whatever ncu printed before it) into one record per
    launch: durations in microseconds whatever their unit's spelling, thousands separators read, a throughput in Tbyte/s
    in GB/s, metrics outside the summary left out unless every one is asked for."""
    from benchmarks.ncu_decode import summarize

    attention, product = summarize(NCU_CSV)
    assert attention == {"kernel": "decode_attention", "duration_us": 55.3, "dram_pct": 71.92,
                         "dram_gb_s": pytest.approx(2410.0), "grid": 4096.0}
    assert product == {"kernel": "batch_matmul", "duration_us": 6.48, "occupancy_pct": 11.8}
    every = summarize(NCU_CSV, every=True)[0]
    assert every["Source Counters: Branch Instructions [inst]"] == 12288.0 and len(every) == 6
    assert summarize("==PROF== Connected to process 4242\n") == []  # the profiled process died


def test_ncu_decode_checks_the_attention_launch_before_profiling(capsys):
    """Off a GPU `ncu_decode attention` runs the launch in interpret mode, checks it against the reference and
    profiles nothing; a launch's parameters come as a JSON object, and anything else is refused by name, as is the
    product (a Mosaic GPU kernel) off a GPU."""
    import json

    from benchmarks import ncu_decode

    for extra in ([], ["--append"], ["--params", '{"block_k": 16, "num_splits": 2}']):
        assert ncu_decode.main(["attention", "--shape", "2x40x64", "--heads", "2x16", *extra]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["rel_err"] < 1e-3 and row["profiled"] is False
    for argv, message in ((["attention", "--params", "[16]"], "must be a JSON object"),
                          (["attention", "--params", "{block_k: 16}"], "is not JSON"),
                          (["attention", "--shape", "2x40"], "--shape '2x40'"),
                          (["attention", "--heads", "16x0"], "--heads '16x0'"),
                          (["product"], "runs only on a Hopper GPU")):
        with pytest.raises(SystemExit) as exit_info:
            ncu_decode.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("barriers", [True, False])
@pytest.mark.parametrize("stream_k", [False, True])
def test_stream_probe_kernel_lowers_for_cuda(barriers, stream_k):
    """The streaming probe's Mosaic GPU kernel (Mosaic GPU's interpreter has no TMA copies, so the GPU run checks
    its outputs against float64): a megatron-345m layer's four products with grid barriers between them, and
    one product alone, each slab a CTA or stream-K, lower for CUDA."""
    import jax.numpy as jnp

    from benchmarks.stream_probe import ROWS, layer_shapes, streaming_call
    from gptjax.config import preset

    shapes = layer_shapes(preset("megatron-345m"))[:4 if barriers else 1]
    call = streaming_call(shapes, jnp.float16, barriers=barriers, stream_k=stream_k)
    args = [jax.ShapeDtypeStruct((ROWS, 4096), jnp.float16), *(jax.ShapeDtypeStruct(s, jnp.float16) for s in shapes)]
    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("tile_k, stages", [(128, 4), (64, 8), (128, 8)])
def test_stream_probe_pipeline_variants_lower_for_cuda(tile_k, stages):
    """`--pipelines`' deeper and wider stream-K layers lower for CUDA (at 128 x 8 they take 192 KB of shared memory
    with the rows, under the 227 KB a block may have); the CLI names them."""
    import jax.numpy as jnp

    from benchmarks.stream_probe import ROWS, forms, layer_shapes, streaming_call
    from gptjax.config import preset

    shapes = layer_shapes(preset("megatron-345m"))
    call = streaming_call(shapes, jnp.float16, barriers=True, stream_k=True, tile_k=tile_k, stages=stages)
    args = [jax.ShapeDtypeStruct((ROWS, 4096), jnp.float16), *(jax.ShapeDtypeStruct(s, jnp.float16) for s in shapes)]
    assert "mosaic_gpu" in jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert f"layer_stream_k_{tile_k}x{stages}" in forms(shapes, jnp.float16, 1, True, [(tile_k, stages)])


@pytest.mark.parametrize("barrier_every, multiply, tiled, deferred", [
    (1, True, False, False), (0, True, False, False), (0, False, False, False), (0, True, True, False),
    (1, True, False, True), (2, True, False, False)])
def test_stream_probe_warp_specialized_layer_lowers_for_cuda(barrier_every, multiply, tiled, deferred):
    """The stream-K layer with its weights streamed by a producer warpgroup of its own (a ring of 8 slots, which
    the consumer frees as it multiplies) lowers for CUDA, as do its forms without the barriers between products
    and without the products, from weights laid out tile by tile, and with each wgmma waited a step late; the
    probe times them as "layer_stream_k_ws", "..._free", "ws_loads_only", "..._tiled" and "..._deferred"."""
    import jax.numpy as jnp

    from benchmarks.stream_probe import ROWS, SLAB, forms, layer_shapes, warp_specialized_call
    from gptjax.config import preset

    shapes = layer_shapes(preset("megatron-345m"))
    call = warp_specialized_call(shapes, jnp.float16, barrier_every=barrier_every, multiply=multiply, tiled=tiled,
                                 deferred=deferred)
    weights = [(k * n // SLAB, SLAB) if tiled else (k, n) for k, n in shapes]
    args = [jax.ShapeDtypeStruct((ROWS, 4096), jnp.float16), *(jax.ShapeDtypeStruct(s, jnp.float16) for s in weights)]
    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert {"layer_stream_k_ws", "layer_stream_k_ws_free", "ws_loads_only", "layer_stream_k_ws_free_tiled",
            "ws_loads_only_tiled", "layers_4_stream_k_ws", "ws_loads_only_4_layers",
            "layer_stream_k_ws_deferred", "layers_24_stream_k_ws_2_barriers", "ws_loads_only_24_layers_barriers",
            "grid_barriers_only"} <= set(
        forms(shapes, jnp.float16, 1, False))


def test_stream_probe_barriers_only_lowers_for_cuda():
    """The launch of grid barriers alone (the probe's "grid_barriers_only", a barrier's own cost) lowers for
    CUDA, its count a loop bound."""
    from benchmarks.stream_probe import barriers_call

    text = jax.jit(barriers_call(96)).trace().lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_stream_probe_checks_each_form_against_float64(capsys):
    """The probe's main loop on the CPU: a line per (rows, form), its outputs checked against float64 (a
    form that cannot run here, such as Mosaic GPU's off the GPU, gives an error line and the rest still run)."""
    import json

    from benchmarks import stream_probe

    assert stream_probe.main(["--model", "gpt2-tiny", "--rows", "1,3", "--copies", "2", "--only", "triton,xla"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["rows"], r["form"]) for r in rows] == [(1, "triton"), (1, "xla"), (3, "triton"), (3, "xla")]
    assert all(r["rel_err"] < 1e-5 and r["us_per_layer"] > 0 for r in rows)


def test_call_probe_times_each_part_of_a_generate_call(capsys):
    """A line with each part of the call timed (gpt2-tiny on the CPU: no device time from a profiler there)."""
    import json

    from benchmarks import call_probe

    assert call_probe.main(["--model", "gpt2-tiny", "--dtype", "float32", "--shapes", "2,8,3", "--runs", "1",
                            "--no-compile-cache"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["model"], row["batch"], row["input_len"], row["output_len"]) == ("gpt2-tiny", 2, 8, 3)
    assert all(row[k] > 0 for k in ("generate_ms", "complete_ms", "put_ms", "program_ms"))
    assert "device_ms" not in row


def test_gemm_probe_checks_xla_forms_against_float64_and_its_mosaic_forms_lower_for_cuda(capsys, monkeypatch):
    """benchmarks.gemm_probe on the CPU: a line per (product, form), XLA's outputs checked against float64 (the
    epilogue included where the form has it); the Mosaic GPU forms (JAX's Hopper matmul, `batch_matmul`), which
    need the GPU to run, lower for CUDA at the batch-256 shapes of megatron-345m."""
    import json

    import jax.numpy as jnp

    from benchmarks import gemm_probe
    from gptjax.config import preset
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu

    assert gemm_probe.main(["--model", "gpt2-tiny", "--dtype", "float32", "--rows", "8", "--copies", "2",
                            "--only", "xla,xla_f32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["product"], r["form"]) for r in rows] == [
        (p, f) for p in ("qkv", "attn_out", "mlp_in", "mlp_out") for f in ("xla", "xla_f32")]
    assert all(r["rel_err"] < 1e-5 for r in rows)
    monkeypatch.setattr(hopper_matmul_mgpu, "get_num_sms", lambda: 132)
    for product, (k, n) in gemm_probe.shapes_of(preset("megatron-345m")).items():
        mosaic = {name: fn for name, fn in gemm_probe.forms(256, k, n, product).items()
                  if name.startswith(("mgpu_", "bm_"))}
        x = jax.ShapeDtypeStruct((256, k), jnp.float16)
        ws = [(jax.ShapeDtypeStruct((k, n), jnp.float16), jax.ShapeDtypeStruct((n,), jnp.float16),
               jax.ShapeDtypeStruct((256, n), jnp.float16))]
        for name in ("mgpu_128x128_m", "mgpu_64x64_m_cm", "bm_64x64_s4_d0", "bm_64x64_s6_d2"):
            assert "mosaic_gpu" in mosaic[name].trace(x, ws).lower(lowering_platforms=("cuda",)).as_text()


def test_tiled_weights_put_each_tile_in_one_run():
    """`tiled_weights` rows (slab * K tiles + kk) * tile_k onwards hold w's tile (kk, slab), as the tiled
    producer reads them."""
    import numpy as np

    from benchmarks.stream_probe import SLAB, tiled_weights

    k, n, tile_k = 192, 3 * SLAB, 64
    w = np.random.default_rng(0).standard_normal((k, n))
    t = tiled_weights(w, tile_k)
    for slab in range(n // SLAB):
        for kk in range(k // tile_k):
            row = (slab * (k // tile_k) + kk) * tile_k
            np.testing.assert_array_equal(t[row:row + tile_k], w[kk * tile_k:(kk + 1) * tile_k,
                                                                 slab * SLAB:(slab + 1) * SLAB])


@pytest.mark.parametrize("k_tiles, slabs", [(16, 48), (16, 16), (64, 16), (16, 64), (3, 5)])
def test_stream_k_deal_adds_every_tile_once(k_tiles, slabs):
    """The stream-K kernel's deal, run on the host as the kernel runs it: each CTA's accumulator runs on over
    its steps and adds (sum so far - sum added before) where `stream_k_step` says; every slab then holds the
    sum of its own K tiles, whatever the runs' ends (345M's products on 132 multiprocessors, and an odd one)."""
    import numpy as np

    from benchmarks.stream_probe import NUM_SMS, stream_k_step

    rng = np.random.default_rng()
    values = rng.standard_normal((slabs, k_tiles))
    total = k_tiles * slabs
    run = -(-total // NUM_SMS)
    out = np.zeros(slabs)
    for sm in range(NUM_SMS):
        first = sm * run
        if first >= total:
            continue
        acc = added = 0.0
        for i in range(run):
            kk, slab, flush = (int(v) for v in stream_k_step(first, i, run, k_tiles, total))
            acc += values[slab, kk]
            if flush:
                out[slab] += acc - added
                added = acc
    np.testing.assert_allclose(out, values.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_device_busy_time_counts_overlapping_kernels_once():
    """Kernels launched early run beside the one before them: the busy time is their intervals' union, drawn at
    random here against a millisecond-by-millisecond count."""
    from benchmarks.gpu_time import covered_ns

    rng = np.random.default_rng()
    starts = rng.integers(0, 1000, 40)
    intervals = [(int(s), int(s + d)) for s, d in zip(starts, rng.integers(1, 60, 40))]
    covered = np.zeros(1100, bool)
    for s, e in intervals:
        covered[s:e] = True
    assert covered_ns(intervals) == covered.sum() < sum(e - s for s, e in intervals)
    assert covered_ns([]) == 0


def test_attention_probe_checks_each_launch_against_the_reference(capsys):
    """benchmarks.attention_probe on the CPU (interpreted): a line per (length, variant), each checked against the
    `jnp` reference; a length past the cache is refused, naming the flag."""
    from benchmarks import attention_probe

    assert attention_probe.main(["--batch", "2", "--cache-len", "32", "--lengths", "1,20", "--heads", "4x16",
                                 "--variants", "table,heads_2,splits_2,append", "--reps", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["length"], r["variant"]) for r in rows] == [
        (n, v) for n in (1, 20) for v in ("table", "heads_2", "splits_2", "append")]
    assert [r for r in rows if "error" in r or not r["rel_err"] < 1e-2 or not r["us"] > 0] == []
    with pytest.raises(SystemExit):
        attention_probe.main(["--cache-len", "32", "--lengths", "40"])
    assert "--lengths" in capsys.readouterr().err


def test_decode_probe_halves_give_the_whole_steps_tokens(monkeypatch):
    """`decode_probe`'s `halves` variants (a `batch_block` step as two halves of its slots, each half's attention
    on its own rows of the caches; with a stream annotation, which the CPU ignores; the read-only form's attention
    kernel interpreted; pipelined, the second half's products after attention run in the next layer or after the
    last) give the whole step's greedy tokens in every row: the halves' rows, caches and residuals are wired back
    in order. (Row tiles of 8 here, where the GPU's are 64: off a GPU the products are the kernel's reference.)"""
    import gptjax
    from benchmarks import decode_probe
    from gptjax import decode_block

    monkeypatch.setattr(decode_block, "BATCH_TILE", 8)
    monkeypatch.setattr(decode_block, "BATCH_ROWS", 16)
    monkeypatch.setattr(decode_block, "choose", lambda *a, **k: "auto")
    traced, halves_layer = [], decode_probe._halves_layer
    monkeypatch.setattr(decode_probe, "_halves_layer", lambda *a: traced.append(a[3:]) or halves_layer(*a))
    engine = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla"))
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    prompts = [rng.integers(0, engine.config.vocab_size, int(n)).tolist() for n in rng.integers(1, 20, 16)]

    def tokens(v):
        engine._generate_jit = decode_probe._generate_jit(engine, v)
        return [r.output_ids for r in engine.generate(prompts, max_new_tokens=4, greedy=True, stop_token_ids=[])]

    want = tokens("off")
    assert len({tuple(t) for t in want}) > 8
    assert tokens("halves+streams") == want and tokens("halves+read_streams+pipelined") == want
    assert traced == [("streams", False), ("read_streams", True)]  # one decode program each


@pytest.mark.parametrize("api", ["compute_on2", "compute_on"], ids=["jax-0.10", "jax-0.11"])
def test_decode_probe_annotates_a_stream_under_either_spelling_of_compute_on(monkeypatch, api):
    """`_on_stream` takes jax 0.10's `compute_on2` or, where it is gone, 0.11's keyword-only `compute_on` (the GPU
    image's): the function's result, and XLA's stream annotation in the program."""
    from jax.experimental import compute_on

    from benchmarks.decode_probe import _on_stream

    keyword_form = compute_on.compute_on2
    if api == "compute_on":
        monkeypatch.delattr(compute_on, "compute_on2")
        monkeypatch.setattr(compute_on, "compute_on", keyword_form)
    f = jax.jit(lambda x: _on_stream(lambda y: (y * 2, y + 1), x, stream=2))
    x = jnp.arange(4.0)
    doubled, plus_one = f(x)
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(plus_one, x + 1)
    assert '_xla_stream_annotation = "2"' in f.lower(x).as_text()
