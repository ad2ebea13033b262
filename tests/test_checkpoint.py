"""The checkpoint folder (`gptjax/checkpoint.py`): what is written reads back whole, and a config.json that the
saved parameters do not back is refused before anything is built from it, naming the field."""

from __future__ import annotations

import json
import shutil
import time

import jax
import numpy as np
import pytest

from gptjax import Engine, cli
from gptjax.checkpoint import CheckpointError, save_checkpoint
from gptjax.config import ModelConfig
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
    folder, params = saved
    engine = Engine.load(folder)
    assert engine.config == CONFIG
    got = engine.model_params()
    for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(have), want, err_msg=jax.tree_util.keystr(path))


def test_an_absurd_layer_count_exits_2_at_once_naming_the_mismatch(saved, tmp_path, capsys):
    line, seconds = generate_fails(capsys, edited(saved, tmp_path, n_layers=10**6))
    assert "n_layers = 1000000" in line and "hold 2" in line
    assert seconds < 5  # the bound the config check exists for: no model of 10^6 layers is built first


@pytest.mark.parametrize("field, value, words", [
    ("n_layers", "4", "ModelConfig.n_layers must be an integer, got '4'"),
    ("hidden", 32.5, "ModelConfig.hidden must be an integer"),
    ("layer_norm_eps", "small", "ModelConfig.layer_norm_eps must be a number"),
    ("dtype", 16, "ModelConfig.dtype must be a string"),
    ("n_heads", True, "ModelConfig.n_heads must be an integer"),
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
