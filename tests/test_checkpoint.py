"""The checkpoint folder (`gptjax/checkpoint.py`): what is written reads back whole, and a config.json that the
saved parameters do not back is refused before anything is built from it, naming the field."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import Future

import jax
import numpy as np
import pytest

from gptjax import Engine, cli, decode_block
from gptjax import engine as engine_module
from gptjax.checkpoint import CheckpointError, save_checkpoint
from gptjax.config import EngineConfig, ModelConfig
from gptjax.layout import Layout
from gptjax.model import init_params

CONFIG = ModelConfig(n_layers=2, hidden=32, n_heads=4, vocab_size=300, n_positions=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of CONFIG with random weights, and those weights."""
    params = jax.tree.map(np.asarray, init_params(CONFIG, seed=3))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CONFIG, params), params


def edited(saved, tmp_path, **model):
    """A copy of the saved checkpoint whose config.json's model fields are changed to `model`."""
    folder = shutil.copytree(saved[0], tmp_path / "edited")
    data = json.loads((folder / "config.json").read_text())
    data["model"].update(model)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def generate_fails(capsys, folder) -> tuple[str, float]:
    """`gptjax generate --checkpoint folder` run in-process: exit 2 with one error line -> (that line, seconds)."""
    start = time.monotonic()
    code = cli.main(["generate", "--checkpoint", str(folder), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                     "--no-compile-cache"])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gptjax generate: error: "), err
    return lines[0], seconds


def test_saved_parameters_load_back_unchanged(saved):
    """Read back exactly, then folded as the engine holds them (`decode_block.fold_layer_norms`)."""
    folder, params = saved
    engine = Engine.load(folder)
    assert engine.config == CONFIG
    got = engine.model_params()
    params = decode_block.fold_layer_norms(params)
    for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(have), want, err_msg=jax.tree_util.keystr(path))


def test_a_checkpoint_is_read_while_the_programs_compile(saved, monkeypatch):
    """`Engine.load` returns once the checkpoint is checked; the programs compile against the layout while the
    weights are read, and the first call that runs one waits for them (the same tokens as weights in memory)."""
    folder, params = saved
    compiled, assemble = threading.Event(), Layout.assemble

    def assemble_once_compiled(self, *args):
        assert compiled.wait(30), "the weights were waited for before any program compiled"
        return assemble(self, *args)

    monkeypatch.setattr(Layout, "assemble", assemble_once_compiled)
    config = EngineConfig(max_slots=2, max_seq_len=32)
    engine = Engine.load(folder, engine_config=config)  # would wait 30 s here if the read came first
    state = engine.new_state()
    engine.compile_prefill(1, engine.prefill_bucket(3), state)
    engine.compile_decode(state, 2, False, engine.decode_buckets()[-1])
    compiled.set()
    prompt = [[5, 17, 99]]
    got = engine.generate(prompt, max_new_tokens=5, greedy=True)[0].output_ids
    assert got == Engine(CONFIG, params, config).generate(prompt, max_new_tokens=5, greedy=True)[0].output_ids


def test_a_read_that_fails_behind_the_compiles_fails_the_first_use(saved, monkeypatch):
    def unreadable(self, *args):
        raise CheckpointError("params/h_1/qkv: the file ends early")

    monkeypatch.setattr(Layout, "assemble", unreadable)
    engine = Engine.load(saved[0])
    with pytest.raises(CheckpointError, match="ends early"):
        engine.params


def test_a_read_that_has_failed_stops_the_warmup_at_the_next_program(saved, monkeypatch):
    failed = Future()
    failed.set_exception(CheckpointError("params/h_1/qkv: the file ends early"))
    monkeypatch.setattr(engine_module, "restore_in_background", lambda restore: failed)
    engine = Engine.load(saved[0], engine_config=EngineConfig(max_slots=2, max_seq_len=32))
    with pytest.raises(CheckpointError, match="ends early"):
        engine.compile_decode(engine.new_state(), 2, False, 2)


def test_a_damaged_parameter_file_exits_2_naming_the_array(saved, tmp_path, capsys):
    folder = shutil.copytree(saved[0], tmp_path / "damaged")
    largest = max((p for p in (folder / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)
    line, _ = generate_fails(capsys, folder)
    assert "the saved parameters could not be read" in line and re.search(r'reading "(wte|wpe|h_\d+)', line), line


@pytest.mark.parametrize("dtype, value, words", [(None, np.nan, "parameter ['h_1']['mlp_out']['kernel']"),
                                                  ("float16", 1e6, "(read as float16)")])
def test_weights_that_are_not_finite_as_loaded_exit_2_naming_the_parameter(saved, tmp_path, capsys, dtype, value,
                                                                          words):
    """A folder not written by the converters (which refuse such weights) can hold NaN; and float32 weights past
    float16's range turn to infinity when loaded as float16. Either loads and gives token 0 for every prompt."""
    params = jax.tree.map(np.array, saved[1])
    params["h_1"]["mlp_out"]["kernel"][3, 1] = value
    folder = save_checkpoint(tmp_path / "bad", CONFIG, params)
    code = cli.main(["generate", "--checkpoint", str(folder), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                     "--no-compile-cache", *(["--dtype", dtype] if dtype else [])])
    err = capsys.readouterr().err
    assert code == 2 and "holds NaN or infinity" in err and words in err, err


@pytest.mark.parametrize("missing, words", [("params", "params is missing: not a folder that `gptjax convert` wrote"),
                                             ("params/_METADATA", "params: not an orbax checkpoint (no parameters")])
def test_a_folder_without_its_parameter_list_exits_2(saved, tmp_path, capsys, missing, words):
    folder = shutil.copytree(saved[0], tmp_path / "partial")
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    line, _ = generate_fails(capsys, folder)
    assert words in line, line


def test_an_absurd_layer_count_exits_2_at_once_naming_the_mismatch(saved, tmp_path, capsys):
    line, seconds = generate_fails(capsys, edited(saved, tmp_path, n_layers=10**6))
    assert "n_layers = 1000000" in line and "hold 2" in line
    assert seconds < 5  # the bound the config check exists for: no model of 10^6 layers is built first


def test_a_config_nested_too_deeply_is_refused_naming_the_file(saved, tmp_path):
    """A config.json of 100000 opening brackets made json.loads recurse until a RecursionError traceback."""
    from gptjax.checkpoint import read_config

    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100000)
    with pytest.raises(CheckpointError, match="config.json: not a config: nested too deeply"):
        read_config(folder)


@pytest.mark.parametrize("field, value, words", [
    ("n_layers", "4", "ModelConfig.n_layers must be an integer, got '4'"),
    ("hidden", 32.5, "ModelConfig.hidden must be an integer"),
    ("layer_norm_eps", "small", "ModelConfig.layer_norm_eps must be a finite number"),
    ("dtype", 16, "ModelConfig.dtype must be a string"),
    ("n_heads", True, "ModelConfig.n_heads must be an integer"),
    ("layer_norm_eps", float("nan"), "ModelConfig.layer_norm_eps must be a finite number, got nan"),
    ("layer_norm_eps", -1e-5, "ModelConfig.layer_norm_eps must be a positive finite number"),  # both gave token 0
])
def test_a_value_of_the_wrong_type_exits_2_naming_the_field(saved, tmp_path, capsys, field, value, words):
    line, _ = generate_fails(capsys, edited(saved, tmp_path, **{field: value}))
    assert words in line


@pytest.mark.parametrize("model, words", [
    (dict(hidden=64), "hidden = 64, but the saved parameters hold 32"),
    (dict(n_heads=8), "n_heads = 8, but the saved parameters hold 4"),
    (dict(vocab_size=301), "vocab_size = 301, but the saved parameters hold 300"),
    (dict(n_positions=10**12), "n_positions = 1000000000000, but the saved parameters hold 64"),
    (dict(ffn_hidden=64), "ffn_hidden = 64, but the saved parameters hold 128"),
])
def test_sizes_the_parameters_do_not_hold_are_refused(saved, tmp_path, model, words):
    with pytest.raises(CheckpointError, match=words):
        Engine.load(edited(saved, tmp_path, **model))


@pytest.mark.parametrize("text, words", [("[" * 100_000, "RecursionError"), ("{}", "KeyError: 'tree_metadata'")],
                         ids=["nested", "empty"])
def test_a_parameter_list_that_is_not_orbax_s_exits_2_naming_it(saved, tmp_path, capsys, text, words):
    """orbax's reading of it raised through (a RecursionError or KeyError traceback)."""
    folder = shutil.copytree(saved[0], tmp_path / "listed")
    (folder / "params" / "_METADATA").write_text(text)
    line, _ = generate_fails(capsys, folder)
    assert f"{folder}/params: not an orbax checkpoint ({words}" in line, line


def test_parameters_saved_as_integers_exit_2_naming_the_parameter(saved, tmp_path, capsys):
    """A restore casts what it finds to the config's dtype: integer weights loaded as floats, without a word."""
    params = jax.tree.map(np.array, saved[1])
    params["h_1"]["mlp_in"]["kernel"] = (params["h_1"]["mlp_in"]["kernel"] * 100).astype(np.int32)
    folder = save_checkpoint(tmp_path / "ints", CONFIG, params)
    line, _ = generate_fails(capsys, folder)
    assert "parameter ['h_1']['mlp_in']['kernel'] is saved as int32: the weights must be floating point" in line
