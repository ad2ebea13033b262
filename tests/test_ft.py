"""FasterTransformer c-model folders (config.ini + raw model.*.bin, split per GPU) written from a random Hugging
Face GPT-2, converted with the real command line: Hugging Face's greedy tokens exactly; bad folders: exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoint_writers import convert_failure, write_ft
from checkpoints.ft import read_ft
from conftest import hf_greedy, run_cli
from gptjax.engine import Engine

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [15496, 995], [40, 588, 257, 1310, 286]]


def test_two_gpu_c_model_gives_hugging_face_tokens(hf_model, tmp_path):
    write_ft(hf_model, tmp_path / "c-model", tp=2)
    # the converter's output root holds one `2-gpu` folder; either may be given
    run_cli("convert", "ft", str(tmp_path / "c-model"), str(tmp_path / "out"))
    engine = Engine.load(tmp_path / "out")
    assert engine.config.vocab_size == 50257  # Megatron's padding of GPT-2's vocabulary is dropped
    results = engine.generate(PROMPTS, max_new_tokens=10, greedy=True, stop_token_ids=[])
    assert [r.output_ids for r in results] == [hf_greedy(hf_model, p, 10) for p in PROMPTS]


def test_fp16_files_stay_fp16(hf_model, tmp_path):
    folder = write_ft(hf_model, tmp_path / "c", tp=4, weight_data_type="fp16")
    config, params = read_ft(folder)
    assert config.dtype == "float16" and params["h_1"]["qkv"]["kernel"].dtype == np.float16
    np.testing.assert_allclose(params["h_1"]["qkv"]["kernel"].reshape(64, -1).astype(np.float32),
                               hf_model.state_dict()["transformer.h.1.attn.c_attn.weight"].numpy(), atol=2e-3)


def convert_fails(capsys, tmp_path, src) -> str:
    return convert_failure(capsys, tmp_path, "ft", src)


@pytest.fixture
def folder(hf_model, tmp_path):
    return write_ft(hf_model, tmp_path / "c", tp=2)


def test_truncated_file(capsys, tmp_path, folder):
    f = folder / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    f.write_bytes(f.read_bytes()[:100])
    line = convert_fails(capsys, tmp_path, folder)
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin: 100 bytes, expected 32768" in line


def test_missing_file(capsys, tmp_path, folder):
    (folder / "model.layers.0.attention.query_key_value.bias.1.bin").unlink()
    assert "model.layers.0.attention.query_key_value.bias.1.bin is missing" in convert_fails(capsys, tmp_path, folder)


def test_config_that_does_not_match_the_files(capsys, tmp_path, folder):
    ini = folder / "config.ini"
    ini.write_text(ini.read_text().replace("head_num = 4", "head_num = 2"))  # hidden 64 -> 32
    assert "bytes, expected" in convert_fails(capsys, tmp_path, folder)
    ini.write_text(ini.read_text().replace("head_num = 2\n", ""))
    assert "field head_num is missing" in convert_fails(capsys, tmp_path, folder)
    ini.write_text("not an ini file")
    assert "config.ini" in convert_fails(capsys, tmp_path, folder)


def test_not_a_c_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.ini" in convert_fails(capsys, tmp_path, tmp_path / "empty")


@pytest.mark.parametrize("line, words", [
    ("has_pre_decoder_layernorm = True", "has_pre_decoder_layernorm = True is not supported"),
    ("use_attention_linear_bias = 1", "use_attention_linear_bias = 1 is not supported"),
    ("has_positional_encoding = False", "has_positional_encoding = False is not supported"),
    ("has_post_decoder_layernorm = no", "has_post_decoder_layernorm = no is not supported"),
    ("has_pre_decoder_layernorm = maybe", "has_pre_decoder_layernorm = 'maybe' is not true or false"),
    ("end_id = abc", "config.ini: end_id = 'abc' is not a valid int"),
])
def test_options_of_other_models_are_refused(capsys, tmp_path, folder, line, words):
    """FasterTransformer reads these to run another model (BLOOM's embedding LayerNorm, ALiBi, no positions);
    converted as this GPT they would run wrong, so each is refused, naming it."""
    ini = folder / "config.ini"
    key = line.split(" = ")[0]
    kept = [l for l in ini.read_text().splitlines() if not l.startswith(key + " ")]
    ini.write_text("\n".join(kept).replace("[gpt]", f"[gpt]\n{line}", 1) + "\n")
    assert words in convert_fails(capsys, tmp_path, folder)


def test_an_output_layer_of_its_own_is_refused(capsys, tmp_path, folder):
    (folder / "model.lm_head.weight.bin").write_bytes((folder / "model.wte.bin").read_bytes())
    assert "model.lm_head.weight.bin is an output layer of its own" in convert_fails(capsys, tmp_path, folder)


@pytest.mark.parametrize("old, new, words", [("tensor_para_size = 2", "tensor_para_size = 0",
                                              "tensor_para_size = 0 must be at least 1"),
                                             ("size_per_head = 16", "size_per_head = 0", "size_per_head = 0 must be"),
                                             ("num_layer = 2", "num_layer = 1", "num_layer = 1, but the folder holds")])
def test_sizes_the_files_contradict_are_refused(capsys, tmp_path, folder, old, new, words):
    ini = folder / "config.ini"
    assert old in ini.read_text()
    ini.write_text(ini.read_text().replace(old, new))
    assert words in convert_fails(capsys, tmp_path, folder)


def test_non_finite_weights_are_refused_naming_the_file(capsys, tmp_path, folder):
    f = folder / "model.layers.1.mlp.dense_h_to_4h.weight.0.bin"
    values = np.fromfile(f, np.float32)
    values[70] = np.nan
    values.tofile(f)
    line = convert_fails(capsys, tmp_path, folder)
    assert "model.layers.1.mlp.dense_h_to_4h.weight.0.bin: holds nan at [0, 70]" in line


def test_a_layer_count_the_folder_does_not_hold_is_refused_before_reading(capsys, tmp_path, folder):
    ini = folder / "config.ini"
    ini.write_text(ini.read_text().replace("num_layer = 2", "num_layer = " + "9" * 30))  # was an OverflowError
    assert "num_layer = 999999999999999999999999999999, but the folder holds no layer" in convert_fails(
        capsys, tmp_path, folder)
