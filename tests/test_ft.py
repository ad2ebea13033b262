"""FasterTransformer c-model folders (config.ini + raw model.*.bin, split per GPU) written from a random Hugging
Face GPT-2, converted with the real command line: Hugging Face's greedy tokens exactly; bad folders: exit 2."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from checkpoint_writers import convert_failure, write_ft
from checkpoints.ft import INI_LIMIT, read_ft
from conftest import hf_greedy, run_cli
from gptjax import cli
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
    data = f.read_bytes()
    f.write_bytes(data[:100])
    line = convert_fails(capsys, tmp_path, folder)
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin: 100 bytes, expected 32768" in line
    f.write_bytes(data + bytes(4))  # longer than its shape: not the file config.ini describes either
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin: 32772 bytes, expected 32768" in convert_fails(
        capsys, tmp_path, folder)


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


def set_field(folder, key, value):
    """config.ini with `key = value` in [gpt], in place of the line it had."""
    ini = folder / "config.ini"
    kept = [line for line in ini.read_text().splitlines() if not line.startswith(key + " ")]
    ini.write_text("\n".join(kept).replace("[gpt]", f"[gpt]\n{key} = {value}", 1) + "\n")


@pytest.mark.parametrize("key, value, words", [
    ("head_num", "4%", "head_num = '4%' is not a valid int"),  # was configparser's InterpolationSyntaxError
    ("weight_data_type", "%(fp)s", "weight_data_type = '%(fp)s' is not one of fp32, fp16"),  # and its KeyError
    ("head_num", "0_4", "head_num = '0_4' is not a valid int"),  # int() read 4, FasterTransformer's strtol 0
    ("head_num", "\u0664", "head_num = '\u0664' is not a valid int"),  # an Arabic-Indic 4, which int() took
    ("inter_size", "0", "inter_size = 0 must be at least 1"),  # was taken for 4 x hidden
    ("num_layer", "-1", "num_layer = -1 must be at least 1"),  # named ModelConfig.n_layers, not the field
    ("head_num", "9" * 5000, "head_num = '" + "9" * 40 + "...' is not a valid int"),  # the message held it all
], ids=["percent", "interpolation", "underscore", "other-digits", "inter-zero", "layers-negative", "long"])
def test_config_values_read_otherwise_than_fastertransformer_does_are_refused(capsys, tmp_path, folder, key,
                                                                                value, words):
    set_field(folder, key, value)
    line = convert_fails(capsys, tmp_path, folder)
    assert f"config.ini: {words}" in line and len(line) < 300, line


def test_nested_references_in_config_ini_are_not_expanded(tmp_path, folder):
    """configparser's default interpolation expanded %(name)s references: nine lines of forty references each
    grew to 40**8 copies (the command hung, filling memory). FasterTransformer's INI reader has no references."""
    ini = folder / "config.ini"
    text = ini.read_text() + "a0 = xxxxxxxxxx\n"
    text += "".join(f"a{i} = " + f"%(a{i - 1})s" * 40 + "\n" for i in range(1, 9))
    ini.write_text(text.replace("[gpt]", "[gpt]\nactivation_type = %(a8)s", 1))
    proc = run_cli("convert", "ft", str(folder), str(tmp_path / "out"), check=False, timeout=60)
    assert proc.returncode == 2 and "activation_type = '%(a8)s' is not supported" in proc.stderr, proc.stderr


def test_a_config_ini_too_large_to_be_one_is_not_read_whole(capsys, tmp_path, folder):
    """It was read whole (a link to a huge file filled memory: a MemoryError traceback)."""
    ini = folder / "config.ini"
    ini.write_text(ini.read_text() + "; " + "x" * INI_LIMIT + "\n")
    assert "config.ini: larger than 1048576 bytes" in convert_fails(capsys, tmp_path, folder)


def test_sizes_whose_product_is_past_64_bits_are_refused_naming_the_file(capsys, tmp_path, folder):
    """numpy's prod wrapped: hidden 64 + 2**58 made model.wte.bin's size come out as the file's, and reading it
    was an OverflowError traceback."""
    set_field(folder, "head_num", str(4 + 2**54))
    line = convert_fails(capsys, tmp_path, folder)
    assert f"model.wte.bin: 12910592 bytes, expected {50432 * (64 + 2**58) * 4} " in line


@pytest.mark.parametrize("copy, to, words", [
    ("layers.1.attention.dense.bias", "layers.2.attention.dense.bias",
     "num_layer = 2, but the folder holds layer 2 (model.layers.2.attention.dense.bias.bin)"),
    ("layers.1.input_layernorm.weight", "layers.7.input_layernorm.weight",
     "num_layer = 2, but the folder holds layer 7"),
    ("layers.0.mlp.dense_4h_to_h.weight.1", "layers.0.mlp.dense_4h_to_h.weight.2",
     "tensor_para_size = 2, but the folder holds rank 2 (model.layers.0.mlp.dense_4h_to_h.weight.2.bin)"),
], ids=["next-layer", "far-layer", "rank"])
def test_files_past_what_config_ini_names_are_refused(capsys, tmp_path, folder, copy, to, words):
    """They were left out without a word: config.ini is not the folder's, or two conversions share it."""
    shutil.copyfile(folder / f"model.{copy}.bin", folder / f"model.{to}.bin")
    assert f"config.ini: {words}" in convert_fails(capsys, tmp_path, folder)


def test_files_of_the_other_precision_are_named(capsys, tmp_path, folder):
    set_field(folder, "weight_data_type", "fp16")
    line = convert_fails(capsys, tmp_path, folder)
    assert "model.wte.bin: 12910592 bytes, expected 6455296" in line
    assert line.endswith("(weight_data_type = fp32 would fit its size)")


def test_an_existing_output_folder_is_refused_before_any_weight_is_read(capsys, tmp_path, folder):
    """It was refused only once every weight had been read; here a weight is damaged, and the message was its."""
    (folder / "model.wte.bin").write_bytes(b"1234")
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["convert", "ft", str(folder), str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"gptjax convert: error: output folder {out} already exists"]
